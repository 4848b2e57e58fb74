"""The validation grid (:func:`plan`) with injectable formulas, and :func:`run`, which simulates every study
and fills in mean, standard error and z of every row."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from types import SimpleNamespace

from rivervalley import theory
from rivervalley.common.resources import require_memory
from rivervalley.validate.report import Report, Study
from rivervalley.validate.sampling import NOISE_BACKENDS, using_noise_backend
from rivervalley.validate.studies import (
    ar1_study,
    curved_study,
    decay_average_study,
    delta_loss_study,
    fve_study,
    river_lag_study,
    weights_study,
)

__all__ = ["plan", "run"]

# Simulations run in chunks of seeds of at most this many bytes of checkpoints (sampling._CHUNK_ELEMENTS
# float64 entries), with the state and noise beside them: what one chunk may take, whatever --seeds is.
_CHUNK_WORKING_SET = 4 * 8 * 4_000_000


def _formulas(overrides: Mapping[str, Callable] | None) -> SimpleNamespace:
    table = {name: getattr(theory, name) for name in theory.__all__}
    unknown = sorted(set(overrides or {}) - set(table))
    if unknown:
        raise ValueError(f"unknown formula override(s) {unknown}; known: {sorted(table)}")
    table.update(overrides or {})
    return SimpleNamespace(**table)


def plan(fast: bool = False, overrides: Mapping[str, Callable] | None = None) -> list[Study]:
    """The validation grid: studies with their rows and formula values (nothing is simulated here)."""
    T = _formulas(overrides)
    ar1 = dict(lr=1.0, interval=1, curvatures=[0.1, 0.3, 1.0, 1.5, 1.9])  # ρ = 0.9, 0.7, 0, −0.5, −0.9
    ar1_checks = [
        ("V", 0, {}),
        ("V", 2, {}),
        ("V", 4, {}),
        ("cov", 1, {"h": 1}),
        ("cov", 1, {"h": 3}),
        ("cov", 3, {"h": 1}),
        ("cov", 4, {"h": 2}),
        ("G", 0, {"K": 10}),
        ("G", 1, {"K": 4}),
        ("G", 2, {"K": 5}),
        ("G", 3, {"K": 4}),
        ("G", 4, {"K": 2}),
        ("G", 4, {"K": 3}),
        ("C", 1, {"K": 8, "d": 3}),
        ("C", 1, {"K": 4, "d": 6}),
        ("C", 3, {"K": 5, "d": 2}),
        ("ema", 1, {"beta": 0.8}),
        ("ema", 4, {"beta": 0.5}),
        ("vf", 1, {"K": 8, "d": 4, "alpha": 1.0}),
        ("vf", 3, {"K": 4, "d": 2, "alpha": -0.5}),
    ]
    studies = [
        ar1_study(
            T,
            fast,
            name="ar1",
            checks=ar1_checks,
            seeds=128 if fast else 3000,
            n_ckpts=1000 if fast else 2000,
            **ar1,
        ),
        ar1_study(
            T,
            fast,
            name="ar1_interval",
            lr=0.1,
            interval=5,
            curvatures=[0.5, 15.0],
            checks=[("V", 0, {}), ("V", 1, {}), ("cov", 0, {"h": 1}), ("G", 0, {"K": 6}), ("G", 1, {"K": 3})],
            seeds=64 if fast else 1500,
            n_ckpts=500 if fast else 1000,
        ),
        river_lag_study(T, fast),
        delta_loss_study(
            T,
            fast,
            name="delta_loss",
            slope=0.3,
            lr=0.5,
            interval=2,
            window=8,
            offset=4,
            curvatures=[1.0, 0.2, 3.0],
            alphas=[0.0, "alpha*", "alpha_match", 2.0],
            seeds=100 if fast else 2000,
            n_ckpts=600 if fast else 1500,
        ),
        delta_loss_study(
            T,
            fast,
            name="delta_loss_negative_rho",
            slope=0.3,
            lr=0.5,
            interval=1,
            window=8,
            offset=4,
            curvatures=[3.0, 0.2],
            alphas=["alpha*", "alpha_match"],
            seeds=100 if fast else 2000,
            n_ckpts=600 if fast else 1500,
        ),
        curved_study(T, fast),
        weights_study(T, fast),
        fve_study(T, fast),
        decay_average_study(T, fast),
    ]
    for st in studies:
        for r in st.rows:
            r.study, r.path = st.name, st.path
    return studies


def run(
    fast: bool = False,
    *,
    seeds: int | None = None,
    seed: int = 0,
    only=None,
    overrides: Mapping[str, Callable] | None = None,
    progress: Callable[[str], None] | None = None,
    noise_backend: str = "torch",
) -> Report:
    """Simulate every study of :func:`plan` and fill in mean, standard error and z of every row.

    ``seeds`` overrides every study's number of independent seeds (≥ 2, the standard error needs two);
    ``only`` restricts the run to studies by name; ``overrides`` replaces theory functions by name.
    ``noise_backend``: ``'torch'`` (float64 draws, the reference) or ``'native'`` (the simulator's default
    compiled kernel, float32 draws; ValueError where it is unavailable).
    """
    if noise_backend not in NOISE_BACKENDS:
        raise ValueError(f"noise_backend must be one of {sorted(NOISE_BACKENDS)}, got {noise_backend!r}")
    with using_noise_backend(noise_backend):
        return _run(fast, seeds, seed, only, overrides, progress, noise_backend)


def _require_memory(studies: list[Study], seeds: int | None) -> None:
    """Refuse, before anything is simulated, a run whose per-seed statistics cannot fit in the memory
    available now: a study keeps [seeds, rows] float64 values, as chunks and stacked, and its mean and
    standard error take two more of that size; one chunk of simulation runs beside them."""
    if not studies:
        return
    big = max(studies, key=lambda st: (int(seeds) if seeds is not None else st.seeds) * len(st.rows))
    n = int(seeds) if seeds is not None else big.seeds
    need = 4 * 8 * n * len(big.rows) + _CHUNK_WORKING_SET
    require_memory(
        need,
        f"validate with {n} seeds (--seeds) x {len(big.rows)} rows (study {big.name}: per-seed statistics; "
        "lower --seeds or pick studies with --only)",
    )


def _run(fast, seeds, seed, only, overrides, progress, noise_backend) -> Report:
    if seeds is not None and (isinstance(seeds, bool) or int(seeds) != seeds or seeds < 2):
        raise ValueError(f"seeds must be an integer >= 2 (a standard error needs two), got {seeds!r}")
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    studies = plan(fast, overrides)
    if only is not None:
        names = {s.name for s in studies}
        unknown = sorted(set(only) - names)
        if unknown:
            raise ValueError(f"unknown study name(s) {unknown}; known: {sorted(names)}")
        studies = [s for s in studies if s.name in set(only)]
    _require_memory(studies, seeds)
    t0 = time.perf_counter()
    rows, timings = [], {}
    for i, st in enumerate(studies):
        n = int(seeds) if seeds is not None else st.seeds
        t1 = time.perf_counter()
        vals = st.measure(n, seed * 100 + i)
        if vals.shape != (n, len(st.rows)):  # pragma: no cover - programming error
            raise RuntimeError(f"study {st.name} returned shape {vals.shape}, expected {(n, len(st.rows))}")
        mean, se = vals.mean(0), vals.std(0, ddof=1) / math.sqrt(n)
        for r, m_, s_ in zip(st.rows, mean, se, strict=True):
            r.mean, r.se, r.seeds = float(m_), float(s_), n
        rows.extend(st.rows)
        timings[st.name] = round(time.perf_counter() - t1, 3)
        if progress is not None:
            progress(
                f"[{i + 1}/{len(studies)}] {st.name}: {len(st.rows)} rows, {n} seeds, "
                f"{timings[st.name]:.1f} s"
            )
    return Report(rows, fast, seed, round(time.perf_counter() - t0, 3), timings, noise_backend)
