"""How far past the newest checkpoint can a merge extrapolate before it stops gaining? (THEORY.md §d.)

A family of merges w(α) extrapolates further as α grows (Extra-Merge E = M + α(M − M_before): w(α) =
w(0) + α(w(1) − w(0))). Gains grow with α until the extrapolation overshoots: on a curved river (μ > 0) it
passes the river's optimum, on a bending floor it leaves the floor along a straight line, and valley noise
amplified by (1 + α) costs 2Wα(1 + α) everywhere. :func:`check_extrapolation_limits` measures where the gain
peaks (best α) and where it is lost (break-even: no better than the newest checkpoint), as α and as
extrapolation distance −lag(w(α)) in checkpoints, next to the theory:

- :class:`RiverValley` (linear or curved river): the closed form. The loss is quadratic in θ, so per seed
  ΔL(α) is an exact quadratic: three merges per seed give its coefficients, and the delta method their
  standard errors; the check fails when the measured best α is more than ``z`` standard errors off.
- :class:`BendingRiver`: the estimate of :mod:`rivervalley.testing.bending`, measured on a grid of α with
  bootstrap standard errors; the check fails when the two differ by more than ``z`` standard errors and
  ``rtol`` of the estimate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rivervalley import weights as _weights
from rivervalley.common.resources import single_thread

from .bending import BendingRiver
from .gain import as_river_valley, merged_losses, require_affine

__all__ = ["LimitCheck", "check_extrapolation_limits"]


@dataclass(frozen=True)
class LimitCheck:
    """Where a family of extrapolating merges w(α) stops gaining, measured (± s.e.) and in theory.

    ``best_*``: the α that minimises ΔL (extrapolating further loses again); ``break_even_*``: the largest α
    at which the merge is still no worse than the newest checkpoint (None where it never gains).
    ``*_distance``: the same places as extrapolation distance −lag(w(α)), in checkpoints past the newest.
    NaN means "not identified" (ΔL(α) has no minimum). ``theory`` says which theory was used.
    """

    best_alpha: float
    best_alpha_se: float
    best_alpha_predicted: float
    best_distance: float
    best_distance_predicted: float
    best_gain: float
    best_gain_se: float
    best_gain_predicted: float
    break_even_alpha: float | None
    break_even_alpha_se: float | None
    break_even_alpha_predicted: float | None
    break_even_distance: float | None
    break_even_distance_predicted: float | None
    z: float
    seeds: int
    theory: str = "closed form"

    def __str__(self) -> str:
        def pm(x, se):
            return "never" if x is None else f"{x:.4g} ± {se:.2g}"

        num = _num
        rows = [
            ("best α", pm(self.best_alpha, self.best_alpha_se), num(self.best_alpha_predicted)),
            ("  distance (ckpts ahead)", num(self.best_distance), num(self.best_distance_predicted)),
            ("  gain −ΔL", pm(-self.best_gain, self.best_gain_se), num(-self.best_gain_predicted)),
            ("break-even α", pm(self.break_even_alpha, self.break_even_alpha_se),
             num(self.break_even_alpha_predicted)),
            ("  distance (ckpts ahead)", num(self.break_even_distance),
             num(self.break_even_distance_predicted)),
        ]  # fmt: skip
        lines = [f"{'':24}{'measured':>20}{'theory':>12}"] + [f"{a:24}{b:>20}{c:>12}" for a, b, c in rows]
        tail = f"z (best α) = {self.z:+.2f} over {self.seeds} seeds; theory: {self.theory}"
        return "\n".join(lines + [tail])


def _num(x) -> str:
    return "never" if x is None else f"{x:.4g}"


# ---------------------------------------------------------------------------------- closed form (quadratic)


def _quadratic(values: np.ndarray) -> np.ndarray:
    """Coefficients (a, b, c) of aα² + bα + c through its values at α = 0, 1, 2 (last axis)."""
    f0, f1, f2 = values[..., 0], values[..., 1], values[..., 2]
    return np.stack([(f0 - 2 * f1 + f2) / 2, (-3 * f0 + 4 * f1 - f2) / 2, f0], axis=-1)


def _places(coef: np.ndarray) -> tuple[float, float, float | None]:
    """(best α, ΔL there, break-even α or None) of aα² + bα + c; NaNs where a ≤ 0 (no minimum)."""
    a, b, c = (float(x) for x in coef)
    if not a > 0:
        return math.nan, math.nan, None
    best = -b / (2 * a)
    low = c - b * b / (4 * a)
    if low > 0:
        return best, low, None
    return best, low, (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)


def _delta_se(coef: np.ndarray, cov: np.ndarray, pick: Callable[[np.ndarray], float]) -> float:
    """Standard error of pick(coef) by the delta method, with a central-difference gradient."""
    grad = np.zeros(3)
    for k in range(3):
        h = 1e-6 * max(1.0, abs(coef[k]))
        up, down = coef.copy(), coef.copy()
        up[k] += h
        down[k] -= h
        grad[k] = (pick(up) - pick(down)) / (2 * h)
    return float(math.sqrt(max(grad @ cov @ grad, 0.0)))


def _closed_form(ws, params, seeds, seed, start, alpha):
    """Measured and predicted places, each (best, low, even), the s.e. of the measured ones, and the
    per-seed ΔL of w(alpha) (None without alpha)."""
    sim = params.simulate(ws.shape[1], seeds=seeds, seed=seed, start=start)
    per_seed = _quadratic(np.stack([merged_losses(w, sim, "numpy") for w in ws], axis=1))  # [S, 3]
    coef, cov = per_seed.mean(0), np.cov(per_seed, rowvar=False) / per_seed.shape[0]
    measured = _places(coef)
    se = (
        _delta_se(coef, cov, lambda c: _places(c)[0]),
        _delta_se(coef, cov, lambda c: _places(c)[1]),
        None if measured[2] is None else _delta_se(coef, cov, lambda c: _places(c)[2] or math.nan),
    )
    theory = _places(_quadratic(np.array([float(params.delta_loss(w, start=start)) for w in ws])))
    at = None if alpha is None else merged_losses(ws[0] + alpha * (ws[1] - ws[0]), sim, "numpy")
    return measured, se, theory, at


# ------------------------------------------------------------------------------------------ grid (bending)


def _grid_places(alphas: np.ndarray, values: np.ndarray) -> tuple[float, float, float | None]:
    """(best α, ΔL there, break-even α or None) of ΔL sampled on an α grid: the minimum refined by the
    parabola through its neighbours, the first zero crossing after it by linear interpolation."""
    i = int(np.argmin(values))
    best, low = float(alphas[i]), float(values[i])
    if 0 < i < alphas.size - 1:
        (x0, x1), (y0, y1, y2) = alphas[i - 1 : i + 1], values[i - 1 : i + 2]
        curv = (y2 - 2 * y1 + y0) / 2
        if curv > 0:
            h = float(x1 - x0)
            shift = -(y2 - y0) / (4 * curv)
            best, low = float(x1 + shift * h), float(y1 - (y2 - y0) ** 2 / (16 * curv))
    if low > 0:
        return best, low, None
    after = np.flatnonzero(values[i:] >= 0)
    if after.size == 0:
        return best, low, None
    k = i + int(after[0])
    x0, x1, y0, y1 = alphas[k - 1], alphas[k], values[k - 1], values[k]
    return best, low, float(x0 + (x1 - x0) * (-y0) / (y1 - y0))


def _bending(ws, params: BendingRiver, seeds, seed, alpha):
    family = lambda alphas: ws[0][None, :] + np.asarray(alphas)[:, None] * (ws[1] - ws[0])[None, :]  # noqa: E731
    top = 8.0
    while True:  # widen the fine grid of the estimate until the gain is lost inside it (or give up)
        fine = np.linspace(0.0, top, 801)
        estimate, newest_u = params.estimate(family(fine))
        theory = _grid_places(fine, estimate)
        if theory[2] is not None or top >= 128:
            break
        top *= 2
    end = theory[2] if theory[2] is not None else (theory[0] if theory[0] > 0 else top / 8)
    grid = np.linspace(0.0, 1.25 * max(end, theory[0]), 41)
    if alpha is not None:
        grid = np.union1d(grid, [alpha])
    per_seed = params.measure(family(grid), seeds=seeds, seed=seed)  # [S, G]
    measured = _grid_places(grid, per_seed.mean(0))
    rng = np.random.default_rng(seed)
    boot = [_grid_places(grid, per_seed[rng.integers(0, seeds, seeds)].mean(0)) for _ in range(200)]
    se = tuple(
        None if measured[k] is None else float(np.nanstd([np.nan if b[k] is None else b[k] for b in boot]))
        for k in range(3)
    )
    lam = params.local_curvature(params.landscape().floor([newest_u])[0])
    label = (
        f"estimate (noise-free path, §d' valley noise at λ_eff = {lam:.4g}; newest checkpoint at u = "
        f"{newest_u:.4g})"
    )
    at = None if alpha is None else per_seed[:, int(np.flatnonzero(grid == alpha)[0])]
    return measured, se, theory, label, at


def check_extrapolation_limits(
    family: Callable[[float], np.ndarray],
    params,
    *,
    alpha: float | None = None,
    seeds: int = 4000,
    z: float = 4.0,
    rtol: float = 0.1,
    seed: int = 0,
    start: int = 0,
) -> LimitCheck:
    """Where does the extrapolating family ``family(α)`` stop gaining? Measured on the simulated river,
    next to theory (module docstring); returns a :class:`LimitCheck` (print it for a table).

    ``family(α)``: the weight vector extrapolated by α, affine in α and summing to 1, e.g.
    ``lambda a: rivervalley.weights.extra(12, window=4, offset=4, alpha=a)``. ``params``: a
    :class:`RiverValley` (closed form; on a curved river with ``e0 < 0`` extrapolation overshoots the
    optimum) or a :class:`BendingRiver` (estimate; measured on a grid of 41 α with ``seeds`` runs each).
    ``alpha``: the α you intend to use; the check then also asserts that it still gains (measured ΔL(α)
    below 0 by more than ``z`` standard errors). ``start``: RiverValley only (checkpoint 1 at step start·s).
    Raises ``AssertionError`` when measurement and theory disagree, or when ``alpha`` does not gain.
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not the kit's
    points = (0.0, 1.0, 2.0)
    ws = np.stack([require_affine(np.asarray(family(a), dtype=float), f"family({a})") for a in points])
    if np.abs(ws[2] - 2 * ws[1] + ws[0]).max() > 1e-9 * max(1.0, np.abs(ws).max()):
        raise ValueError("family(α) must be affine in α (w(α) = w(0) + α·(w(1) − w(0))), as Extra-Merge is")
    if isinstance(seeds, bool) or int(seeds) < 2:
        raise ValueError(f"seeds must be an integer >= 2, got {seeds!r}")
    seeds = int(seeds)
    if isinstance(params, BendingRiver):
        with single_thread():  # small batches: see rivervalley.common.resources.single_thread
            measured, se, theory, label, at = _bending(ws, params, seeds, seed, alpha)
        tolerance = lambda x, s: max(z * s, rtol * max(abs(x), 0.05))  # noqa: E731 - an estimate
    else:
        params = as_river_valley(params)
        with single_thread():
            measured, se, theory, at = _closed_form(ws, params, seeds, seed, start, alpha)
        label = "closed form (THEORY.md §d')"
        tolerance = lambda x, s: z * s if s > 0 else 1e-9 * max(1.0, abs(x))  # noqa: E731

    def distance(a):  # checkpoints past the newest = −lag(w(α)); w is affine in α
        return None if a is None or math.isnan(a) else -float(_weights.lag(ws[0] + a * (ws[1] - ws[0])))

    (best, low, even), (best_se, low_se, even_se), (best_t, low_t, even_t) = measured, se, theory
    off = best - best_t
    zscore = (
        off / best_se if best_se > 0 else (0.0 if off == 0 or abs(off) <= tolerance(best_t, 0) else math.inf)
    )
    result = LimitCheck(
        best, best_se, best_t, distance(best), distance(best_t), low, low_se, low_t,
        even, even_se, even_t, distance(even), distance(even_t), zscore, seeds, label,
    )  # fmt: skip
    if math.isnan(best) or math.isnan(best_t):
        raise AssertionError(f"extrapolation limits not identified (ΔL(α) has no minimum):\n{result}")
    if not abs(off) <= tolerance(best_t, best_se):
        raise AssertionError(
            f"extrapolation limit: measured best α = {best:.4g} ± {best_se:.2g} (s.e.), theory {best_t:.4g}: "
            f"z = {zscore:+.2f}, beyond the tolerance ({params})\n{result}"
        )
    if at is not None:
        mean, sem = float(at.mean()), float(at.std(ddof=1) / math.sqrt(at.size))
        if not mean + z * sem < 0:
            raise AssertionError(
                f"extrapolating by α = {alpha:g} ({distance(alpha):.4g} checkpoints past the newest) does "
                f"not gain: measured ΔL = {mean:.4g} ± {sem:.2g} (s.e.)\n{result}"
            )
    return result
