"""The §g model of the package docstring (:mod:`rivervalley.estimate`): its design matrix, the
least-squares fit with ρ profiled, and every prediction with its 90% interval."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .grid import Grid

__all__ = ["Fit", "Interval", "fit", "design", "features", "RHO_GRID"]

RHO_GRID = np.round(np.concatenate([np.linspace(0.02, 0.9, 45), np.linspace(0.91, 0.99, 9)]), 4)


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
