"""River-valley parameters of a real (or simulated) trajectory from the losses of merges inside it.

The model is THEORY.md's §g (any learning-rate schedule) written for an affine weight vector w over
checkpoints 1..N at steps t_j with learning rates η_j:

    L(w) = F(s(w)) + ω₀ · Σ_j w_j² r_j + ω₁ · Σ_jl w_j w_l √(r_j r_l) ρ^{|A_j − A_l|}

- ``A_j``: the learning-rate area Σ_{k<t_j} η_k from the first checkpoint, in units of the mean area
  between consecutive checkpoints (A_1 = 0, A_N = N − 1; with a constant learning rate A_j = j − 1);
  s(w) = Σ_j w_j A_j − A_N ≤ 0 is the merge's position along the river relative to the newest checkpoint
  (−lag in area units, §g), and F(s) = F0 + F1·s + ½F2·s² the river profile (F1 < 0: loss falls along it);
- ``r_j = η_j / max η``: the valley variance of a checkpoint follows its learning rate (§a and §g's
  adiabatic limit, V ∝ η), so under a decaying schedule older checkpoints are noisier;
- two groups of valley directions: steep ones that decorrelate between checkpoints (ω₀) and slow ones that
  decorrelate with the area between them at rate ρ per checkpoint interval of area (ω₁, §g: P ≈ e^{−λΔA}).

- a path that bends: if the trajectory's floor curves, θ(A) ≈ θ_N + a·(A − A_N) + ½·b·(A − A_N)² with b
  across the valley, then the merge Σw_jθ(A_j) = θ(s̄) + ½·b·B(w) leaves the floor by ½·b·B(w), with
  B(w) = Σw_j(A_j − A_N)² − s(w)², and pays κ·B(w)² (κ = λ_b|b|²/8 ≥ 0, λ_b the curvature across). Pair
  averages h apart pay κh⁴/16 (the sagitta of the chord); an extrapolation α·d past the window pays
  ~κα²(1+α)²d⁴: this term is what makes long extrapolations blow up on real runs.

Relative to the newest checkpoint, ΔL(w) = F1·s + ½F2·s² + ω₀(Σw_j²r_j − r_N) + ω₁(wᵀΓw − r_N) + κB(w)²;
with a constant learning rate and F2 = κ = 0 this is §d' (``theory.weights_delta_loss``).

The fit uses *calibration* merges that stay inside the data (nonnegative weights, s ≤ 0): every checkpoint,
pair averages of checkpoints h = 1, 2, 4, 8 apart, and uniform windows of 4 and 8 checkpoints. Points past
the newest checkpoint are never used
(on a curved path their loss explodes and dominates a least-squares fit). Given ρ the model is linear in
(F0, F1, F2, ω₀, ω₁, κ): least squares with ω, κ ≥ 0. ρ is profiled over a grid (0.02 … 0.99); its 90%
confidence set is {ρ: SSE(ρ) ≤ SSE_min · (1 + F₀.₉(1, dof)/dof)}. ρ is *identified* when that set stays off
the grid's upper edge (a slow group that never decorrelates inside the window cannot be told from the
river's curvature). Every prediction is the union, over ρ in its confidence set, of the least-squares
interval at that ρ: the interval includes the uncertainty in ρ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "Grid",
    "Fit",
    "Interval",
    "calibration_weights",
    "fit",
    "RHO_GRID",
]

RHO_GRID = np.round(np.concatenate([np.linspace(0.02, 0.9, 45), np.linspace(0.91, 0.99, 9)]), 4)


@dataclass(frozen=True)
class Grid:
    """Where the checkpoints sit: ``area`` (normalised learning-rate area, A_1 = 0, A_N = N − 1) and
    ``lr_ratio`` (η_j / max η) of each checkpoint, oldest first; ``history``: (area, lr_ratio) points
    before the first checkpoint (area < 0), where the schedule is known, for the slow group's memory."""

    area: np.ndarray
    lr_ratio: np.ndarray
    history: tuple = ((), ())

    @property
    def n(self) -> int:
        return int(self.area.size)

    @property
    def constant_lr(self) -> bool:
        return bool(np.all(self.lr_ratio == 1.0)) and all(r == 1.0 for r in self.history[1])

    @classmethod
    def constant(cls, n: int) -> Grid:
        return cls(np.arange(n, dtype=float), np.ones(n))

    @classmethod
    def from_schedule(cls, steps, lr, *, history_intervals: float = 8.0) -> Grid:
        """From checkpoint steps and a learning rate: a callable step -> lr, or (steps, lrs) samples that
        cover the checkpoints (the area between two checkpoints is the trapezoid over every sample
        between them). Up to ``history_intervals`` mean checkpoint intervals of the schedule before the
        first checkpoint are kept, where known."""
        steps = np.asarray(steps, dtype=float)
        if steps.ndim != 1 or steps.size < 2 or np.any(np.diff(steps) <= 0):
            raise ValueError("checkpoint steps must be increasing, at least 2")
        if callable(lr):
            span = (steps[-1] - steps[0]) / (steps.size - 1) * history_intervals
            xs = np.arange(max(0.0, steps[0] - span), steps[-1] + 1)
            ys = np.asarray([lr(int(x)) for x in xs], dtype=float)
        else:
            xs, ys = (np.asarray(a, dtype=float) for a in lr)
            order = np.argsort(xs, kind="stable")
            xs, ys = xs[order], ys[order]
            if xs.size == 0 or xs[0] > steps[0] or xs[-1] < steps[-1]:
                have = f"{xs[0]:g}..{xs[-1]:g}" if xs.size else "no steps"
                raise ValueError(
                    f"the learning-rate schedule covers {have}, not the checkpoints' steps "
                    f"{steps[0]:g}..{steps[-1]:g}"
                )
        if not np.all(np.isfinite(ys)) or np.any(ys < 0):
            raise ValueError("learning rates must be finite and >= 0")
        at = np.interp(steps, xs, ys)
        cum = np.concatenate([[0.0], np.cumsum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2)])
        cum -= np.interp(steps[0], xs, cum)
        total = np.interp(steps[-1], xs, cum)
        if total <= 0 or at.max() <= 0:
            raise ValueError("the learning rate is zero over the checkpoints: no river progress to measure")
        unit = total / (steps.size - 1)
        pre = xs < steps[0]
        hist_area = cum[pre] / unit
        keep = hist_area >= -history_intervals
        return cls(
            np.interp(steps, xs, cum) / unit,
            at / at.max(),
            (tuple(hist_area[keep]), tuple(ys[pre][keep] / at.max())),
        )

    def slow_variance(self, rho: float) -> np.ndarray:
        """Valley variance of the slow group at each checkpoint, relative to its stationary variance at
        the largest learning rate: the relaxation dV/dA = −2κ(V − r(A)), κ = −ln ρ per unit of area
        (§g: V_{t+1} = (1 − ηλ)² V_t + η²σ² for small ηλ), from stationarity at the earliest known point."""
        xa = np.concatenate([np.asarray(self.history[0], dtype=float), self.area])
        xr = np.concatenate([np.asarray(self.history[1], dtype=float), self.lr_ratio])
        kappa = -math.log(rho)
        V = xr[0]
        out = []
        first = len(self.history[0])
        if first == 0:
            out.append(V)
        for i in range(1, xa.size):
            da = xa[i] - xa[i - 1]
            m = max(1, int(math.ceil(da * 8)))
            for k in range(m):  # r linear in area between known points; exact for constant r per piece
                r = xr[i - 1] + (xr[i] - xr[i - 1]) * (k + 0.5) / m
                V = r + (V - r) * math.exp(-2 * kappa * da / m)
            if i >= first:
                out.append(V)
        return np.asarray(out[-self.n :], dtype=float)


def calibration_weights(n: int, distances=(1, 2, 4, 8), windows=(4, 8)) -> dict[str, np.ndarray]:
    """The calibration merges (name → w), all inside the data: every checkpoint; pair averages of
    checkpoints h apart (all pairs for h = 1; for h > 1, pairs starting every ⌈h/2⌉ checkpoints and always
    the pair ending at the newest); uniform windows of K checkpoints ending at every other checkpoint and
    at the newest (the building blocks of SMA and Extra-Merge)."""
    if n < 3:
        raise ValueError(f"calibration needs at least 3 checkpoints, got {n}")
    out: dict[str, np.ndarray] = {}
    eye = np.eye(n)
    for j in range(n):
        out[f"ckpt {j + 1}"] = eye[j]
    for h in distances:
        if h >= n:
            continue
        starts = set(range(0, n - h, 1 if h == 1 else -(-h // 2))) | {n - 1 - h}
        for j in sorted(starts):
            out[f"pair {j + 1}+{j + 1 + h}"] = 0.5 * (eye[j] + eye[j + h])
    for k in windows:
        if k >= n:
            continue
        for end in sorted({*range(n, k - 1, -2)}):
            w = np.zeros(n)
            w[end - k : end] = 1.0 / k
            out[f"window {end - k + 1}-{end}"] = w
    return out


def _slow(grid: Grid, rho: float) -> np.ndarray:
    """Cov of the slow group between checkpoints: V_min(j,l) · ρ^|A_j − A_l| (§g, Cov = V_t P(t, t'))."""
    dist = np.abs(grid.area[:, None] - grid.area[None, :])
    if grid.constant_lr:
        return rho**dist
    V = grid.slow_variance(rho)
    return np.minimum.outer(V, V) * rho**dist


_SLOW_CACHE: dict = {}


def _slow_cached(grid: Grid, rho: float) -> np.ndarray:
    key = (grid.area.tobytes(), grid.lr_ratio.tobytes(), grid.history, rho)
    K = _SLOW_CACHE.get(key)
    if K is None:
        if len(_SLOW_CACHE) > 4096:
            _SLOW_CACHE.clear()
        K = _SLOW_CACHE[key] = _slow(grid, rho)
    return K


def design(weights, grid: Grid, rho: float) -> np.ndarray:
    """Rows [1, s, s²/2, Σw²r, wᵀKw, b²] of the model, one per weight vector (rows of ``weights``);
    b = Σw_jA_j² − (Σw_jA_j)² is how far the merge leaves a path that bends (see ``bend``)."""
    W = np.atleast_2d(np.asarray(weights, dtype=float))
    a = grid.area - grid.area[-1]
    s = W @ a
    K = _slow_cached(grid, rho)
    b = W @ (a * a) - s * s
    return np.stack(
        [np.ones(len(W)), s, 0.5 * s * s, (W * W) @ grid.lr_ratio, np.einsum("ij,jk,ik->i", W, K, W), b * b],
        axis=1,
    )


def features(w, grid: Grid, rho: float) -> np.ndarray:
    """[1, s, s²/2, Σw²r, wᵀKw, b²] of the model for weights w."""
    return design(w, grid, rho)[0]


def _contrast(w, grid: Grid, rho: float) -> np.ndarray:
    X = design(np.stack([np.asarray(w, dtype=float), np.eye(grid.n)[-1]]), grid, rho)
    return X[0] - X[1]


@dataclass(frozen=True)
class Interval:
    """A prediction: ``value`` at the best ρ, and the 90% interval [lo, hi] over ρ's confidence set."""

    value: float
    lo: float
    hi: float

    def to_list(self) -> list[float]:
        return [self.lo, self.hi]


@dataclass
class _AtRho:
    rho: float
    beta: np.ndarray
    cov: np.ndarray
    sse: float
    X: np.ndarray = field(default=None, repr=False)
    jack: list = field(default_factory=list, repr=False)  # parameters refitted without each checkpoint
    M: np.ndarray = field(default=None, repr=False)  # beta = M @ losses


def _solve(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Least squares with the valley losses (columns 3, 4) kept ≥ 0; covariance from the residuals."""
    P = X.shape[1]
    keep = list(range(P))
    while True:
        b, *_ = np.linalg.lstsq(X[:, keep], y, rcond=None)
        beta = np.zeros(P)
        beta[keep] = b
        neg = [k for k in range(3, P) if k in keep and beta[k] < 0]
        if not neg:
            break
        keep.remove(min(neg, key=lambda k: beta[k]))
    resid = y - X @ beta
    sse = float(resid @ resid)
    dof = max(y.size - len(keep) - 1, 1)
    cov = np.zeros((P, P))
    Xk = X[:, keep]
    cov[np.ix_(keep, keep)] = sse / dof * np.linalg.pinv(Xk.T @ Xk)
    M = np.zeros((P, y.size))  # beta = M y: for the data's own sampling error
    M[keep] = np.linalg.pinv(Xk)
    return beta, cov, sse, M


@dataclass
class Fit:
    """The fitted model. ``best``: parameters at the best ρ; ``rho_set``: the ρ grid points in its 90%
    confidence set; ``rho_identified``: that set stays off the grid's upper edge."""

    grid: Grid
    best: _AtRho
    rho_set: list = field(repr=False)
    dof: int
    rmse: float
    n_calibration: int
    docs: tuple | None = field(default=None, repr=False)  # (nll [points, D], tokens [D]) of the losses
    bend: bool = False  # whether κ was fitted (else it is 0)

    @property
    def rho(self) -> float:
        return self.best.rho

    @property
    def rho_interval(self) -> tuple[float, float]:
        rs = [a.rho for a in self.rho_set]
        return min(rs), max(rs)

    @property
    def rho_identified(self) -> bool:
        return self.rho_interval[1] < RHO_GRID[-1]

    @property
    def slope(self) -> Interval:
        """Loss drop per checkpoint interval of learning-rate area (−F1), with its interval."""
        c = np.zeros(self.best.beta.size)
        c[1] = -1.0
        return self._linear(c)

    @property
    def t90(self) -> float:
        """The two-sided 90% Student-t quantile of the intervals (the fit's degrees of freedom)."""
        return _t90(self.dof)

    @property
    def curvature(self) -> Interval:
        """F2, the river profile's curvature along the lag (< 0: the river bends away), with its interval."""
        c = np.zeros(self.best.beta.size)
        c[2] = 1.0
        return self._linear(c)

    @property
    def valley_loss(self) -> Interval:
        """Expected valley loss of the newest checkpoint, ω₀·r_N + ω₁·V_N(ρ)."""
        e = np.eye(self.grid.n)[-1]
        return self._interval(lambda at: _valley_mask(at.beta.size) * features(e, self.grid, at.rho))

    @property
    def newest_loss(self) -> float:
        return float(features(np.eye(self.grid.n)[-1], self.grid, self.rho) @ self.best.beta)

    def _linear(self, c: np.ndarray) -> Interval:
        return self._interval(lambda at: c)

    def _interval(self, contrast) -> Interval:
        t = _t90(self.dof)
        lo, hi = math.inf, -math.inf
        for at in self.rho_set:
            c = contrast(at)
            v = float(c @ at.beta)
            se = math.sqrt(max(float(c @ at.cov @ c), 0.0) + self._data_var(c @ at.M))
            lo, hi = min(lo, v - t * se), max(hi, v + t * se)
        c = contrast(self.best)
        return Interval(float(c @ self.best.beta), lo, hi)

    def _data_var(self, g: np.ndarray) -> float:
        """Sampling variance, clustered by document, of gᵀy when the losses y are means over documents."""
        if self.docs is None:
            return 0.0
        nll, tok = self.docs
        a = g @ nll  # [D]
        T = tok.sum()
        v = float(a.sum() / T)
        r = a - v * tok
        D = tok.size
        return float(D / max(D - 1, 1) * (r @ r) / T**2)

    def predict(self, w) -> Interval:
        """ΔL(w) relative to the newest checkpoint, with its 90% interval (over ρ's confidence set)."""
        return self._interval(lambda at: _contrast(w, self.grid, at.rho))

    def predict_between(self, w, base) -> Interval:
        """ΔL(w) − ΔL(base), with its 90% interval (over ρ's confidence set): two merges compared through
        the model, so what they share (the newest checkpoint's own misfit, the anchor's noise) cancels."""

        def contrast(at):
            X = design(
                np.stack([np.asarray(w, dtype=float), np.asarray(base, dtype=float)]), self.grid, at.rho
            )
            return X[0] - X[1]

        return self._interval(contrast)

    def delta_at(self, w, at: _AtRho) -> float:
        return float(_contrast(w, self.grid, at.rho) @ at.beta)

    def alpha_star(self, extra_weights, at: _AtRho | None = None) -> float:
        """argmin over α of ΔL(extra_weights(α)); ±inf where it has no minimum. For a family affine in α,
        ΔL is a quartic in α (the bend term b² is, the rest is quadratic): five values fix it."""
        at = at or self.best
        xs = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
        v = np.array([self.delta_at(extra_weights(x), at) for x in xs])
        c = np.polyfit(xs, v, 4)  # exact through five points
        scale = max(np.abs(c).max(), 1e-300)
        c[np.abs(c) < 1e-12 * scale] = 0.0
        if c[0] == 0 and c[1] == 0 and c[2] <= 0:  # at most linear, or a concave quadratic: unbounded
            return math.copysign(math.inf, -c[3]) if c[3] != 0 else 0.0
        crit = [r.real for r in np.roots(np.polyder(c)) if abs(r.imag) < 1e-9 * max(1.0, abs(r))]
        if not crit:
            return 0.0
        return float(min(crit, key=lambda r: np.polyval(c, r)))

    def alpha_star_range(self, extra_weights) -> tuple[float, float]:
        """α* at every ρ of the confidence set and in every leave-one-checkpoint-out refit: (min, max)."""
        ats = list(self.rho_set) + [_AtRho(self.rho, b, self.best.cov, 0.0) for b in self.best.jack]
        vals = [self.alpha_star(extra_weights, at) for at in ats]
        return min(vals), max(vals)

    def optimal_weights(self, at: _AtRho | None = None) -> np.ndarray | None:
        """The affine w minimising the fitted ΔL (§d' with the fitted model, bend term included), or None
        where it has no minimum (no valley loss, or a river curvature that makes it unbounded)."""
        from scipy.optimize import minimize

        at = at or self.best
        n, g = self.grid.n, self.grid
        _, F1, F2, w0, w1, _kappa = at.beta
        a = g.area - g.area[-1]
        # the quadratic part ΔL = F1 s + ½F2 s² + wᵀQw + const (s = aᵀw) in closed form: a start point
        Q = w0 * np.diag(g.lr_ratio) + w1 * _slow_cached(g, at.rho) + 0.5 * F2 * np.outer(a, a)
        evals = np.linalg.eigvalsh(Q)
        if evals.min() <= 1e-12 * max(abs(evals).max(), 1e-300):
            return None
        lin = F1 * a
        Qi_1, Qi_l = np.linalg.solve(Q, np.ones(n)), np.linalg.solve(Q, lin)
        start = 0.5 * ((2 + Qi_l.sum()) / Qi_1.sum() * Qi_1 - Qi_l)
        Z = np.linalg.svd(np.ones((1, n)))[2][1:].T  # basis of {v: 1ᵀv = 0}
        res = minimize(lambda v: self.delta_at(start + Z @ v, at), np.zeros(n - 1), method="BFGS")
        w = start + Z @ res.x
        return w if np.all(np.isfinite(w)) else None

    def to_dict(self) -> dict:
        b = self.best.beta
        lo, hi = self.rho_interval
        return {
            "F0": b[0],
            "F1": b[1],
            "F2": b[2],
            "omega_fast": b[3],
            "omega_slow": b[4],
            "bend": b[5],
            "rho": self.rho,
            "rho_interval": [lo, hi],
            "rho_identified": self.rho_identified,
            "slope_per_checkpoint": _iv(self.slope),
            "valley_loss_newest": _iv(self.valley_loss),
            "newest_loss": self.newest_loss,
            "rmse": self.rmse,
            "dof": self.dof,
            "n_calibration": self.n_calibration,
            "area": self.grid.area.tolist(),
            "lr_ratio": self.grid.lr_ratio.tolist(),
        }


def _valley_mask(size: int) -> np.ndarray:
    m = np.zeros(size)
    m[3:5] = 1.0
    return m


def _iv(iv: Interval) -> dict:
    return {"value": iv.value, "interval": iv.to_list()}


def _t90(dof: int) -> float:
    """Two-sided 90% Student-t quantile."""
    from scipy import stats

    return float(stats.t.ppf(0.95, dof))


def _f90(dof: int) -> float:
    from scipy import stats

    return float(stats.f.ppf(0.90, 1, dof))


JACKKNIFE_BLOCK = 3


def _jackknife(X: np.ndarray, y: np.ndarray, uses: np.ndarray) -> np.ndarray:
    """Covariance of the parameters from refits that leave out every point using one block of
    ``JACKKNIFE_BLOCK`` consecutive checkpoints (blocks keep neighbours' correlated noise together)."""
    n = uses.shape[1]
    b = JACKKNIFE_BLOCK
    betas = []
    for j in range(0, n, b):
        keep = ~uses[:, j : j + b].any(1)
        if keep.sum() < 8:
            continue
        betas.append(_solve(X[keep], y[keep])[0])
    if len(betas) < 3:
        return np.zeros((X.shape[1], X.shape[1])), betas
    B = np.asarray(betas)
    D = B - B.mean(0)
    return (len(betas) - 1) / len(betas) * D.T @ D, betas


def fit(
    weights_list, losses, grid: Grid | None = None, *, rho: float | None = None, docs=None, bend: bool = False
) -> Fit:
    """Fit the model to calibration losses (one per weight vector); ρ profiled over ``RHO_GRID`` unless
    given. ``docs``: (nll [points, D], tokens [D]) when each loss is Σ nll / Σ tokens over D documents;
    the intervals then include the documents' sampling error (clustered by document). ValueError on
    mismatched or non-finite input or too few points."""
    W = [np.asarray(w, dtype=float) for w in weights_list]
    y = np.asarray(losses, dtype=float)
    if len(W) != y.size or y.size < 7:
        raise ValueError(f"fit needs one loss per weight vector, at least 7, got {len(W)}/{y.size}")
    if not np.all(np.isfinite(y)):
        raise ValueError("fit: a calibration loss is not finite")
    grid = grid or Grid.constant(W[0].size)
    if any(w.size != grid.n for w in W):
        raise ValueError(f"fit: every weight vector needs {grid.n} entries (one per checkpoint)")
    rhos = [float(rho)] if rho is not None else [float(r) for r in RHO_GRID]
    uses = np.stack([w != 0 for w in W])  # [points, checkpoints]
    fits = []
    for r in rhos:
        X = design(np.stack(W), grid, r)
        if not bend:  # the §g model alone: no bend term (κ = 0)
            X[:, 5] = 0.0
        beta, cov, sse, M = _solve(X, y)
        fits.append(_AtRho(r, beta, cov, sse, X, M=M))
    best = min(fits, key=lambda a: a.sse)
    dof = max(y.size - 5 - bend - (rho is None), 1)
    cut = best.sse * (1 + _f90(dof) / dof) + 1e-300
    rho_set = [a for a in fits if a.sse <= cut]
    for at in rho_set:  # delete-one-checkpoint jackknife: checkpoint-level noise the residuals share
        cov, at.jack = _jackknife(at.X, y, uses)
        at.cov = at.cov + cov
    if docs is not None:
        nll, tok = (np.asarray(a, dtype=float) for a in docs)
        if nll.shape != (y.size, tok.size) or not np.allclose(
            nll.sum(1) / tok.sum(), y, rtol=1e-6, atol=1e-9
        ):
            raise ValueError(
                "fit: docs must be (nll [points, documents], tokens [documents]) matching the losses"
            )
        docs = (nll, tok)
    return Fit(grid, best, rho_set, dof, math.sqrt(best.sse / y.size), int(y.size), docs, bend)
