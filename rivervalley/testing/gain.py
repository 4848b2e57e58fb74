"""Does a merge gain, on a simulated river valley, what the closed forms say? (THEORY.md §d, §d'.)

:func:`check_expected_gain` simulates the river valley exactly and compares the mean ΔL of a merge (its
loss minus the newest checkpoint's) with the closed form, as a z-score. :func:`check_extrapolation_limits`
takes a family of merges that extrapolate further as α grows (Extra-Merge E = M + α(M − M_before), a trend
line evaluated further ahead) and reports how far past the newest checkpoint the gain stops growing, and
where it is lost altogether, measured next to theory; on a curved river (μ > 0), where straight-line
extrapolation overshoots the optimum, this is the extrapolation limit of §d.

Both use the fact that the loss is quadratic in θ: per simulated seed, ΔL(α) of a family affine in α is an
exact quadratic, so three merges per seed give its coefficients without a grid over α.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rivervalley import weights as _weights

from .affine import Probe, check_affine_merge, fmt_weights
from .params import RiverValley

__all__ = ["GainCheck", "LimitCheck", "check_expected_gain", "check_extrapolation_limits"]


@dataclass(frozen=True)
class GainCheck:
    """Mean ΔL over ``seeds`` simulated runs (± its standard error) next to the closed form."""

    weights: np.ndarray
    measured: float
    se: float
    predicted: float
    z: float
    seeds: int

    def __str__(self) -> str:
        return (
            f"ΔL measured {self.measured:.5g} ± {self.se:.2g} (s.e., {self.seeds} seeds), predicted "
            f"{self.predicted:.5g}, z = {self.z:+.2f}"
        )


@dataclass(frozen=True)
class LimitCheck:
    """Where a family of extrapolating merges w(α) stops gaining, measured (± s.e.) and predicted.

    ``best_*``: the α that minimises ΔL (extrapolating further loses again); ``break_even_*``: the largest α
    at which the merge is still no worse than the newest checkpoint (None where it never gains).
    ``*_distance``: the same places as extrapolation distance, −lag(w(α)), in checkpoints past the newest.
    NaN fields mean "not identified" (a flat or concave ΔL(α)).
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

    def __str__(self) -> str:
        def pm(x, se):
            return "never" if x is None else f"{x:.4g} ± {se:.2g}"

        def num(x):
            return "never" if x is None else f"{x:.4g}"

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
        return "\n".join(lines + [f"z (best α) = {self.z:+.2f} over {self.seeds} seeds"])


def _params(params) -> RiverValley:
    if isinstance(params, RiverValley):
        return params
    if isinstance(params, dict):
        return RiverValley(**params)
    raise TypeError(
        f"params must be a rivervalley.testing.RiverValley or a dict of its fields, got {params!r}"
    )


def _affine_or_fail(w: np.ndarray, what: str) -> np.ndarray:
    if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)):
        raise ValueError(f"{what} must be a non-empty 1-D vector of finite weights, got {w!r}")
    if abs(w.sum() - 1.0) > 1e-8 * max(1.0, np.abs(w).sum()):
        raise AssertionError(
            f"{what} sum to {w.sum():.6g}, not 1: not an affine merge, so it is not translation-equivariant "
            f"and the theory of merges does not apply (weights {fmt_weights(w)})"
        )
    return w


def _merged_losses(merge, sim, backend: str) -> np.ndarray:
    """Loss of the merge of every seed's checkpoints minus that of its newest checkpoint, [S]."""
    import torch

    ck, land = sim.checkpoints, sim.landscape
    if callable(merge):
        s, n, p = ck.shape
        probe = Probe(merge, n, p, backend, "float64")
        merged = torch.from_numpy(np.stack([probe(ck[i].numpy(), f"simulated seed {i}") for i in range(s)]))
    else:
        merged = _weights.apply(merge, ck)
    return (land.loss(merged) - land.loss(ck[:, -1])).double().numpy()


def check_expected_gain(
    weights,
    params,
    *,
    n: int | None = None,
    seeds: int = 4000,
    z: float = 4.0,
    seed: int = 0,
    start: int = 0,
    backend: str = "numpy",
) -> GainCheck:
    """Simulate the river valley ``params``; compare the merge's mean ΔL with the closed form as a z-score.

    ``weights``: a weight vector over N checkpoints (oldest first), or a merge function ``fn([N, p]) -> [p]``
    (then give ``n``; its weights for the prediction are recovered by :func:`check_affine_merge`, and the
    simulation applies ``fn`` itself to every seed's checkpoints). ``params``: a :class:`RiverValley` (or a
    dict of its fields); linear river: §d', curved river: :func:`rivervalley.theory.curved_weights_delta_loss`
    with checkpoint 1 at step ``start``·s. Raises ``AssertionError`` when |z| > ``z``; returns a
    :class:`GainCheck`.
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not the kit's
    params = _params(params)
    if callable(weights):
        if n is None:
            raise ValueError("check_expected_gain with a merge function needs n (the number of checkpoints)")
        w = check_affine_merge(weights, n, backend=backend, seed=seed)
    else:
        w = _affine_or_fail(np.asarray(weights, dtype=float), "weights")
        n = w.size
    if isinstance(seeds, bool) or int(seeds) < 2:
        raise ValueError(f"seeds must be an integer >= 2, got {seeds!r}")
    sim = params.simulate(n, seeds=int(seeds), seed=seed, start=start)
    dl = _merged_losses(weights if callable(weights) else w, sim, backend)
    measured, se = float(dl.mean()), float(dl.std(ddof=1) / math.sqrt(dl.size))
    predicted = float(params.delta_loss(w, start=start))
    zscore = (
        (measured - predicted) / se if se > 0 else (0.0 if abs(measured - predicted) < 1e-12 else math.inf)
    )
    result = GainCheck(w, measured, se, predicted, zscore, int(seeds))
    if not abs(zscore) <= z:
        raise AssertionError(
            f"expected gain: over {seeds} simulated seeds the merge's mean ΔL is {measured:.5g} ± {se:.2g} "
            f"(s.e.), the closed form predicts {predicted:.5g}: z = {zscore:+.2f}, beyond ±{z:g} "
            f"(weights {fmt_weights(w)}; {params})"
        )
    return result


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


def check_extrapolation_limits(
    family: Callable[[float], np.ndarray],
    params,
    *,
    seeds: int = 4000,
    z: float = 4.0,
    seed: int = 0,
    start: int = 0,
) -> LimitCheck:
    """How far can a merge extrapolate before it stops gaining? Measured on the simulated river valley,
    next to the closed form; raises ``AssertionError`` when the measured best α is more than ``z`` standard
    errors from the predicted one.

    ``family(α)`` returns the weight vector of the merge extrapolated by α (affine in α, each summing to 1),
    e.g. ``lambda a: rivervalley.weights.extra(12, window=4, offset=4, alpha=a)``. ``params``: a
    :class:`RiverValley`; with ``river_curvature > 0`` and ``e0 < 0`` (still descending) straight-line
    extrapolation overshoots the river's optimum, which is what limits it there; on a linear river only the
    valley noise does. Returns a :class:`LimitCheck` (print it for a table).
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not the kit's
    params = _params(params)
    ws = np.stack(
        [_affine_or_fail(np.asarray(family(a), dtype=float), f"family({a})") for a in (0.0, 1.0, 2.0)]
    )
    curvature = ws[2] - 2 * ws[1] + ws[0]
    if np.abs(curvature).max() > 1e-9 * max(1.0, np.abs(ws).max()):
        raise ValueError("family(α) must be affine in α (w(α) = w(0) + α·(w(1) − w(0))), as Extra-Merge is")
    n = ws.shape[1]
    sim = params.simulate(n, seeds=int(seeds), seed=seed, start=start)
    per_seed = _quadratic(np.stack([_merged_losses(w, sim, "numpy") for w in ws], axis=1))  # [S, 3]
    coef, cov = per_seed.mean(0), np.cov(per_seed, rowvar=False) / per_seed.shape[0]
    theory = _quadratic(np.array([float(params.delta_loss(w, start=start)) for w in ws]))

    best, low, even = _places(coef)
    best_t, low_t, even_t = _places(theory)
    best_se = _delta_se(coef, cov, lambda c: _places(c)[0])
    low_se = _delta_se(coef, cov, lambda c: _places(c)[1])
    even_se = None if even is None else _delta_se(coef, cov, lambda c: _places(c)[2] or math.nan)

    def distance(alpha):  # checkpoints past the newest = −lag(w(α)); w is affine in α
        return (
            None
            if alpha is None or math.isnan(alpha)
            else -float(_weights.lag(ws[0] + alpha * (ws[1] - ws[0])))
        )

    if best_se > 0:
        zscore = (best - best_t) / best_se
    else:  # noise-free: every seed is the same run
        zscore = 0.0 if abs(best - best_t) <= 1e-9 * max(1.0, abs(best_t)) else math.inf
    result = LimitCheck(
        best, best_se, best_t, distance(best), distance(best_t), low, low_se, low_t,
        even, even_se, even_t, distance(even), distance(even_t), zscore, int(seeds),
    )  # fmt: skip
    if math.isnan(best) or math.isnan(best_t):
        raise AssertionError(f"extrapolation limits not identified (ΔL(α) has no minimum):\n{result}")
    if not abs(zscore) <= z:
        raise AssertionError(
            f"extrapolation limit: measured best α = {best:.4g} ± {best_se:.2g} (s.e.), theory {best_t:.4g}: "
            f"z = {zscore:+.2f}, beyond ±{z:g} ({params})\n{result}"
        )
    return result
