"""River-valley parameters of a real trajectory, and the theory's prediction of every merge's loss.

The model is THEORY.md's, written for any affine weight vector w over checkpoints 1..N (§d'):

    L(wᵀθ) = F(tᵀw) + ω₀ · wᵀw + ω₁ · wᵀΓ(ρ)w,        Γ(ρ)_jl = ρ^{|j−l|},   t = (1..N)

- the river: F(s) = F0 + F1 (s − N) + ½ F2 (s − N)² is the loss of the de-noised trajectory at position s
  (in checkpoints), so a merge whose centre of mass is tᵀw sits lag(w) = N − tᵀw behind the newest one;
  F1 = −c²ηs of the linear river (the loss drop per checkpoint), F2 its curvature (§d, curved river);
- the valley: ω = ω₀ + ω₁ is the expected valley loss of one checkpoint (Σ_i ω_i of §d), split into two
  groups of directions that stand for the valley's spectrum: steep ones that decorrelate between
  checkpoints (ρ = 0, keep wᵀw of their variance) and slow ones with one effective ρ (keep wᵀΓw; G_K for
  an SMA, §b). A single group (ω₀ = 0) cannot explain both the gain of averaging two neighbours and that of
  a long average on real runs; two groups can, and stay linear in the unknowns.

Hence, relative to the newest checkpoint (THEORY.md §d', plus the curved-river term):

    ΔL(w) = F(N − lag(w)) − F(N) − ω₀(1 − wᵀw) − ω₁(1 − wᵀΓw)
          = −F1·lag + ½F2·lag² − ω₀(1 − wᵀw) − ω₁(1 − wᵀΓw).

With F2 = 0 this is ``rivervalley.theory.weights_delta_loss`` with c²ηs = −F1 at η = s = 1, curvatures
λ = (1, 1 − ρ) and noises σ_i² = 2ω_i(2 − λ_i) (the tests check the identity), and for Extra-Merge it is the
quadratic ΔL(α) of §d, so α* has a closed form.

The parameters are fitted from *calibration* losses, never from the merges being predicted: the loss of every
raw checkpoint (w = e_j: F(j) + ω), of points on the least-squares line through the checkpoints (trend
weights: F(t) + ω·g(t), g small), and of midpoints of consecutive checkpoints (F(j+½) + ω(1+ρ)/2, which is
what pins down ρ as the loss sees it). Given ρ the model is linear in (F0, F1, F2, ω): ordinary least
squares (a negative ω is dropped and the rest refitted), with ρ from a grid search (``fit``) or fixed, e.g.
to the geometric estimate from the Gram matrix (``extramerge.select.estimate_river``), which weighs valley
directions by their variance, not their loss.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from rivervalley import weights as _weights

__all__ = [
    "RiverFit",
    "calibration_weights",
    "fit",
    "predict_delta",
    "predict_stderr",
    "optimal_extra_alpha",
    "retention",
]


def retention(w, rho: float) -> float:
    """wᵀΓ(ρ)w: the share of one checkpoint's valley variance an affine merge keeps (G_K for an SMA)."""
    w = np.asarray(w, dtype=float)
    return float(w @ _weights.correlation_matrix(rho, w.size) @ w)


def _features(w, rho: float) -> np.ndarray:
    """Row of the linear model for weights w: [1, s, s²/2, wᵀw, wᵀΓw] with s = tᵀw − N = −lag(w)."""
    w = np.asarray(w, dtype=float)
    s = -_weights.lag(w)
    return np.array([1.0, s, 0.5 * s * s, float(w @ w), retention(w, rho)])


@dataclass(frozen=True)
class RiverFit:
    """Fitted river profile F0, F1, F2 (loss, per checkpoint, per checkpoint²), valley losses ω₀ (ρ = 0)
    and ω₁ (at ρ), and ρ. ``omega`` = ω₀ + ω₁ is one checkpoint's expected valley loss.

    ``cov`` is the least-squares covariance of (F0, F1, F2, ω₀, ω₁) at the fitted ρ (ρ itself taken as
    known); ``rmse`` the calibration residual; ``rho_source`` 'losses' (fitted) or where a fixed ρ came from.
    """

    F0: float
    F1: float
    F2: float
    omega_fast: float
    omega_slow: float
    rho: float
    rho_source: str
    rmse: float
    n: int
    n_calibration: int
    cov: tuple

    @property
    def omega(self) -> float:
        return self.omega_fast + self.omega_slow

    @property
    def beta(self) -> np.ndarray:
        return np.array([self.F0, self.F1, self.F2, self.omega_fast, self.omega_slow])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cov"] = [list(r) for r in self.cov]
        d["omega"] = self.omega
        d["slope_per_checkpoint"] = -self.F1
        return d

    def theory_params(self) -> dict | None:
        """Arguments of ``rivervalley.theory`` (slope, lr, interval, curvatures, noise) reproducing the
        linear part of this fit (F2 = 0), or None where no linear river matches (F1 ≥ 0, ω = 0, |ρ| ≥ 1)."""
        if self.F1 >= 0 or self.omega <= 0 or not -1 < self.rho < 1:
            return None
        lam = np.array([1.0, 1.0 - self.rho])
        omegas = np.array([self.omega_fast, self.omega_slow])
        return {
            "slope": math.sqrt(-self.F1),
            "lr": 1.0,
            "interval": 1,
            "curvatures": lam.tolist(),
            "noise": np.sqrt(2.0 * omegas * (2.0 - lam)).tolist(),
        }


def calibration_weights(n: int, *, line_offsets=None) -> dict[str, np.ndarray]:
    """The calibration evaluations: every checkpoint, line points, and consecutive midpoints (name → w).

    Line points are the least-squares line through all N checkpoints evaluated ``o`` checkpoints past the
    newest (default o ∈ {−N/2, −N/4, 0, N/4, N/2}: the merges of a study land near this range).
    """
    if n < 3:
        raise ValueError(f"calibration needs at least 3 checkpoints, got {n}")
    if line_offsets is None:
        line_offsets = sorted({round(f * n) for f in (-0.5, -0.25, 0.0, 0.25, 0.5)})
    out: dict[str, np.ndarray] = {}
    for j in range(n):
        out[f"ckpt {j + 1}"] = np.eye(n)[j]
    for o in line_offsets:
        out[f"line {o:+g}"] = _weights.trend(n, n, ahead=float(o))
    for j in range(n - 1):
        w = np.zeros(n)
        w[j] = w[j + 1] = 0.5
        out[f"mid {j + 1}-{j + 2}"] = w
    return out


def _solve(W: list[np.ndarray], y: np.ndarray, rho: float):
    """Least squares for (F0, F1, F2, ω₀, ω₁) at ρ; valley losses kept ≥ 0 (a negative one is dropped)."""
    X = np.stack([_features(w, rho) for w in W])
    keep = [0, 1, 2, 3, 4]
    while True:
        b, *_ = np.linalg.lstsq(X[:, keep], y, rcond=None)
        beta = np.zeros(5)
        beta[keep] = b
        neg = [k for k in (3, 4) if k in keep and beta[k] < 0]
        if not neg:
            break
        keep.remove(min(neg, key=lambda k: beta[k]))
    resid = y - X @ beta
    return beta, X, float(resid @ resid), keep


def fit(weights_list, losses, *, rho: float | None = None, rho_source: str = "fixed") -> RiverFit:
    """Least-squares fit of (F0, F1, F2, ω₀, ω₁) at ρ; also of ρ (grid on [−0.9, 0.99]) if rho is None."""
    W = [np.asarray(w, dtype=float) for w in weights_list]
    y = np.asarray(losses, dtype=float)
    if len(W) != y.size or y.size < 6:
        raise ValueError(f"fit needs one loss per weight vector, at least 6, got {len(W)}/{y.size}")
    if not np.all(np.isfinite(y)):
        raise ValueError("fit: a calibration loss is not finite")
    n = W[0].size
    if rho is None:
        grid = np.linspace(-0.9, 0.99, 190)
        sse = [_solve(W, y, r)[2] for r in grid]
        rho, rho_source = float(grid[int(np.argmin(sse))]), "losses"
    beta, X, sse, keep = _solve(W, y, float(rho))
    dof = max(y.size - len(keep) - (rho_source == "losses"), 1)
    cov = np.zeros((5, 5))
    Xk = X[:, keep]
    cov[np.ix_(keep, keep)] = sse / dof * np.linalg.pinv(Xk.T @ Xk)
    return RiverFit(
        F0=float(beta[0]),
        F1=float(beta[1]),
        F2=float(beta[2]),
        omega_fast=float(beta[3]),
        omega_slow=float(beta[4]),
        rho=float(rho),
        rho_source=rho_source,
        rmse=math.sqrt(sse / y.size),
        n=n,
        n_calibration=int(y.size),
        cov=tuple(tuple(float(v) for v in r) for r in cov),
    )


def _contrast(w, f: RiverFit) -> np.ndarray:
    last = np.zeros(f.n)
    last[-1] = 1.0
    return _features(w, f.rho) - _features(last, f.rho)


def predict_delta(w, f: RiverFit) -> float:
    """Predicted ΔL(w) = L(wᵀθ) − L(θ_N) = −F1·lag + ½F2·lag² − ω₀(1 − wᵀw) − ω₁(1 − wᵀΓw)."""
    return float(_contrast(w, f) @ f.beta)


def predict_stderr(w, f: RiverFit) -> float:
    """Standard error of ``predict_delta`` from the fit's covariance (ρ held fixed): √(cᵀ Cov c)."""
    c = _contrast(w, f)
    return float(math.sqrt(max(c @ np.asarray(f.cov) @ c, 0.0)))


def optimal_extra_alpha(f: RiverFit, window: int, offset: int) -> float:
    """argmin_α ΔL(extra(K, d, α)): ΔL is quadratic in α (lag and wᵀΓw are), so three values fix it.

    Returns ±inf where the quadratic has no minimum (no valley loss and a river that keeps descending).
    """
    n = f.n
    a = np.array([-1.0, 0.0, 1.0])
    v = np.array([predict_delta(_weights.extra(n, window, offset, x), f) for x in a])
    c2 = (v[2] + v[0] - 2 * v[1]) / 2
    c1 = (v[2] - v[0]) / 2
    if c2 <= 1e-15 * max(abs(c1), 1e-300):
        return math.copysign(math.inf, -c1) if c1 != 0 else 0.0
    return float(-c1 / (2 * c2))
