"""Does a merge gain, on a simulated river valley, what the closed forms say? (THEORY.md §d, §d'.)

:func:`check_expected_gain` simulates the river valley exactly (closed-form AR(1) jumps from the
stationary state) and compares the mean ΔL of a merge (its loss minus the newest checkpoint's) with the
closed form of :meth:`RiverValley.delta_loss`, as a z-score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rivervalley import weights as _weights
from rivervalley.common.resources import single_thread

from .affine import check_affine_merge, fmt_weights
from .params import RiverValley

__all__ = ["GainCheck", "check_expected_gain"]


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


def as_river_valley(params) -> RiverValley:
    if isinstance(params, RiverValley):
        return params
    if isinstance(params, dict):
        return RiverValley(**params)
    raise TypeError(
        f"params must be a rivervalley.testing.RiverValley or a dict of its fields, got {params!r}"
    )


def require_affine(w: np.ndarray, what: str) -> np.ndarray:
    if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)):
        raise ValueError(f"{what} must be a non-empty 1-D vector of finite weights, got {w!r}")
    if abs(w.sum() - 1.0) > 1e-8 * max(1.0, np.abs(w).sum()):
        raise AssertionError(
            f"{what} sum to {w.sum():.6g}, not 1: not an affine merge, so it is not translation-equivariant "
            f"and the theory of merges does not apply (weights {fmt_weights(w)})"
        )
    return w


def merged_losses(merge, sim, backend: str) -> np.ndarray:
    """Loss of the merge of every seed's checkpoints minus that of its newest checkpoint, [S]."""
    import torch

    ck, land = sim.checkpoints, sim.landscape
    if callable(merge):  # the contract (shape, input untouched) was checked on the probes; here only speed
        s, n, p = ck.shape
        data = ck.clone() if backend == "torch" else ck.numpy().copy()
        try:
            merged = [merge(data[i]) for i in range(s)]
        except Exception as exc:
            raise AssertionError(
                f"the merge raised {type(exc).__name__}: {exc} on simulated checkpoints"
            ) from exc
        merged = torch.stack([torch.as_tensor(m, dtype=torch.float64).reshape(p) for m in merged])
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
    params = as_river_valley(params)
    if callable(weights):
        if n is None:
            raise ValueError("check_expected_gain with a merge function needs n (the number of checkpoints)")
        w = check_affine_merge(weights, n, backend=backend, seed=seed)
    else:
        w = require_affine(np.asarray(weights, dtype=float), "weights")
        n = w.size
    if isinstance(seeds, bool) or int(seeds) < 2:
        raise ValueError(f"seeds must be an integer >= 2, got {seeds!r}")
    with single_thread():  # small batches: see rivervalley.common.resources.single_thread
        sim = params.simulate(n, seeds=int(seeds), seed=seed, start=start)
        dl = merged_losses(weights if callable(weights) else w, sim, backend)
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
