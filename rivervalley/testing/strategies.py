"""Hypothesis strategies for river valleys, landscapes, merges, trajectories and checkpoint sets.

Needs ``hypothesis`` (``pip install 'rivervalley-extramerge[testing]'``). Every strategy draws small,
well-conditioned cases so that a test of one's own merge code stays fast:

- :func:`river_valleys` → :class:`~rivervalley.testing.RiverValley` (ρ = (1 − ηλ)^s covers negative values);
- :func:`landscapes` → a :class:`~rivervalley.landscapes.Landscape` (linear, curved and bending rivers,
  the matrix landscape);
- :func:`merges` → :class:`Merge` (SMA, EMA, WMA, Extra-Merge, trend, arbitrary affine) and
  :func:`affine_weights` → its weight vector alone;
- :func:`trajectories` → :class:`Trajectory`, simulated checkpoints with known parameters;
- :func:`checkpoint_sets` → a list of torch state dicts with the same keys, shapes and dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

try:
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "rivervalley.testing.strategies needs hypothesis: pip install 'rivervalley-extramerge[testing]'"
    ) from exc

from rivervalley import weights as _weights

from .params import RiverValley

__all__ = [
    "Merge",
    "Trajectory",
    "river_valleys",
    "landscapes",
    "merges",
    "affine_weights",
    "trajectories",
    "checkpoint_sets",
    "MERGE_METHODS",
    "LANDSCAPE_KINDS",
]

MERGE_METHODS = ("sma", "ema", "wma", "extra", "trend", "affine")
LANDSCAPE_KINDS = ("linear", "curved", "sine", "hyperbola", "matrix")


def _floats(lo: float, hi: float):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


@st.composite
def river_valleys(
    draw,
    *,
    max_directions: int = 4,
    curved: bool | None = False,
    negative_rho: bool = True,
    noise: bool = True,
):
    """A stable :class:`RiverValley`: η ∈ [0.05, 1], 1–``max_directions`` valley curvatures, any or a power
    law λ_1·i^(−a), with ηλ ∈ [0.02, 1.95] (ηλ > 1 with an odd interval s gives ρ < 0;
    ``negative_rho=False`` keeps ηλ ≤ 0.98),
    s ∈ 1..8, slope c ∈ [0, 2], σ ∈ [0.1, 2] (0 with ``noise=False``). ``curved``: True for a curved river
    (ημ ∈ [0.002, 0.3], start e0 ∈ [−20, −0.5] behind the optimum, σ_u ∈ [0, 1]), None for either."""
    lr = draw(_floats(0.05, 1.0))
    top = 1.95 if negative_rho else 0.98
    if draw(st.booleans()):  # any spectrum
        products = draw(st.lists(_floats(0.02, top), min_size=1, max_size=max_directions))
    else:  # a power law λ_i = λ_1 i^(−a), the shape of real Hessian spectra
        count, exponent = draw(st.integers(1, max_directions)), draw(_floats(0.0, 2.0))
        first = draw(_floats(0.02, top))
        products = [max(first * i**-exponent, 0.02) for i in range(1, count + 1)]
    kw = dict(
        slope=draw(_floats(0.0, 2.0)),
        lr=lr,
        interval=draw(st.integers(1, 8)),
        curvatures=tuple(x / lr for x in products),
        noise=draw(_floats(0.1, 2.0)) if noise else 0.0,
    )
    if curved is None:
        curved = draw(st.booleans())
    if curved:
        kw.update(
            slope=draw(_floats(0.1, 2.0)),
            river_curvature=draw(_floats(0.002, 0.3)) / lr,
            e0=draw(_floats(-20.0, -0.5)),
            river_noise=draw(_floats(0.0, 1.0)) if noise else 0.0,
        )
    return RiverValley(**kw)


@st.composite
def landscapes(draw, kinds=LANDSCAPE_KINDS):
    """One landscape of the given kinds: ``'linear'`` and ``'curved'`` (QuadraticRiverValley, 1–4 valley
    directions, maybe rotated), ``'sine'`` (SineRiver), ``'hyperbola'`` (HyperbolaRiver) or ``'matrix'``
    (MatrixLeastSquares, up to 4×5)."""
    from rivervalley import landscapes as L

    unknown = set(kinds) - set(LANDSCAPE_KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {LANDSCAPE_KINDS}, got {kinds!r}")
    kind = draw(st.sampled_from(tuple(kinds)))
    if kind in ("linear", "curved"):
        return L.QuadraticRiverValley(
            slope=draw(_floats(0.0, 2.0)),
            river_curvature=draw(_floats(0.01, 0.5)) if kind == "curved" else 0.0,
            curvatures=draw(st.lists(_floats(0.05, 5.0), min_size=1, max_size=4)),
            rotate=draw(st.booleans()),
            seed=draw(st.integers(0, 2**16)),
        )
    if kind == "sine":
        return L.SineRiver(
            slope=draw(_floats(0.1, 2.0)),
            valley_curvature=draw(_floats(0.5, 20.0)),
            amplitude=draw(_floats(0.0, 2.0)),
            length=draw(_floats(0.5, 4.0)),
        )
    if kind == "hyperbola":
        return L.HyperbolaRiver(slope=draw(_floats(0.1, 2.0)), valley_curvature=draw(_floats(0.1, 5.0)))
    return L.MatrixLeastSquares(
        a=draw(st.integers(1, 4)), b=draw(st.integers(2, 5)), slope=draw(_floats(0.1, 2.0)),
        seed=draw(st.integers(0, 2**16)),
    )  # fmt: skip


@dataclass(frozen=True)
class Merge:
    """A merge drawn by :func:`merges`: its method, knobs and weight vector over ``n`` checkpoints."""

    method: str
    knobs: dict
    weights: np.ndarray = field(repr=False)

    @property
    def n(self) -> int:
        return int(self.weights.size)

    def __repr__(self) -> str:
        knobs = ", ".join(f"{k}={v!r}" for k, v in self.knobs.items())
        return f"Merge({self.method!r}, n={self.n}{', ' if knobs else ''}{knobs})"


@st.composite
def merges(draw, n: int | None = None, *, methods=MERGE_METHODS, max_n: int = 16):
    """A :class:`Merge` over ``n`` checkpoints (drawn in 1..``max_n`` when None): SMA/WMA over a window
    K ≤ n, EMA with β ∈ [0, 0.99], Extra-Merge with K + d ≤ n and α ∈ [−1, 3], a trend line (K ≥ 2)
    ``ahead`` ∈ [0, 4] checkpoints past the newest, or arbitrary affine weights in [−2, 2] summing to 1."""
    unknown = set(methods) - set(MERGE_METHODS)
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {MERGE_METHODS}, got {methods!r}")
    lowest = 2 if set(methods) == {"trend"} else 1  # a trend line needs two checkpoints
    n = draw(st.integers(lowest, max(lowest, max_n))) if n is None else int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    usable = [m for m in methods if not (m == "trend" and n < 2)]
    if not usable:
        raise ValueError(f"none of {methods!r} applies to n={n} checkpoint(s)")
    method = draw(st.sampled_from(usable))
    if method in ("sma", "wma"):
        knobs = {"window": draw(st.integers(1, n))}
        w = getattr(_weights, method)(n, **knobs)
    elif method == "ema":
        knobs = {"decay": draw(_floats(0.0, 0.99))}
        w = _weights.ema(n, **knobs)
    elif method == "extra":
        window = draw(st.integers(1, n))
        knobs = {
            "window": window,
            "offset": draw(st.integers(0, n - window)),
            "alpha": draw(_floats(-1.0, 3.0)),
        }
        w = _weights.extra(n, **knobs)
    elif method == "trend":
        knobs = {"window": draw(st.integers(2, n)), "ahead": draw(_floats(0.0, 4.0))}
        w = _weights.trend(n, **knobs)
    else:
        free = np.array(draw(st.lists(_floats(-2.0, 2.0), min_size=n - 1, max_size=n - 1)))
        w = np.append(free, 1.0 - free.sum())
        knobs = {"weights": [round(float(x), 6) for x in w]}
    return Merge(method, knobs, np.asarray(w, dtype=float))


def affine_weights(n: int | None = None, *, methods=MERGE_METHODS, max_n: int = 16):
    """The weight vector (oldest first, summing to 1) of a :func:`merges` draw."""
    return merges(n, methods=methods, max_n=max_n).map(lambda m: m.weights)


@dataclass(frozen=True)
class Trajectory:
    """Simulated checkpoints ``[seeds, n, p]`` (numpy float64) of the river valley ``params``; checkpoint 1
    is at step ``start``·s from the stationary valley (and, when curved, u_0 = u* + e0)."""

    params: RiverValley
    checkpoints: np.ndarray = field(repr=False)
    start: int
    seed: int

    @property
    def n(self) -> int:
        return int(self.checkpoints.shape[1])


@st.composite
def trajectories(draw, params=None, *, n=None, seeds: int = 64, start: int = 0):
    """A :class:`Trajectory` of ``n`` checkpoints (2..12 when None) for ``seeds`` runs of the river valley
    ``params`` (a RiverValley, a strategy of them, or None for :func:`river_valleys`), exact SGD jumps."""
    if params is None:
        params = river_valleys(curved=None)
    if not isinstance(params, RiverValley):
        params = draw(params)
    n = draw(st.integers(2, 12)) if n is None else int(n)
    seed = draw(st.integers(0, 2**31 - 1))
    sim = params.simulate(n, seeds=seeds, seed=seed, start=start)
    return Trajectory(params, sim.checkpoints.numpy(), start, seed)


_DTYPE_NAMES = ("float32", "float64", "bfloat16", "float16")


@st.composite
def checkpoint_sets(
    draw, *, n=None, max_tensors: int = 4, dtypes=("float32",), with_int: bool = True, drift: float = 0.05
):
    """``n`` (2..6 when None) torch state dicts θ_k = θ_0 + k·drift·v + noise, k = 1..n, with the same
    1–``max_tensors`` floating tensors (rank 0–3, dims 1..5, one dtype of ``dtypes`` each, names like
    ``layers.0.weight``) and, with ``with_int``, an integer ``step`` buffer that counts the checkpoint."""
    import torch

    unknown = set(dtypes) - set(_DTYPE_NAMES)
    if unknown or not dtypes:
        raise ValueError(f"dtypes must be a non-empty subset of {_DTYPE_NAMES}, got {dtypes!r}")
    n = draw(st.integers(2, 6)) if n is None else int(n)
    count = draw(st.integers(1, max_tensors))
    specs = [
        (f"layers.{i}.{draw(st.sampled_from(('weight', 'bias', 'scale')))}",
         tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=3))),
         getattr(torch, draw(st.sampled_from(tuple(dtypes)))))
        for i in range(count)
    ]  # fmt: skip
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    base = {name: torch.randn(shape, generator=gen, dtype=torch.float64) for name, shape, _ in specs}
    direction = {name: torch.randn(shape, generator=gen, dtype=torch.float64) for name, shape, _ in specs}
    states = []
    for k in range(1, n + 1):
        state = {
            name: (base[name] + k * drift * direction[name] + 0.01 * torch.randn(shape, generator=gen,
                   dtype=torch.float64)).to(dtype)
            for name, shape, dtype in specs
        }  # fmt: skip
        if with_int:
            state["step"] = torch.tensor(k, dtype=torch.int64)
        states.append(state)
    return states
