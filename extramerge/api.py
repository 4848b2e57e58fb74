"""Python API: ``merge`` (a weight vector applied to real checkpoints) and ``analyze`` (diagnostics).

``merge`` = open the checkpoints → ``plan`` (method and knobs → one affine weight vector, built by the
method's entry in ``extramerge.methods.REGISTRY``, whose docstring lists the defaults) → ``execute`` (the
streaming engine reads each checkpoint once).

A knob that does not apply to the chosen method is an error, not silently ignored.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from rivervalley import weights as _weights

from . import distributed, methods
from .io import open_all
from .trajectory import analyze

__all__ = ["merge", "analyze", "plan", "execute", "Plan", "METHODS", "parse_size", "open_all"]

METHODS = methods.NAMES
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size) -> int:
    """'5GB' → 5·10⁹ bytes, '500MB', '2GiB', 1000 (bytes). Must be positive."""
    if isinstance(size, int | float) and not isinstance(size, bool):
        value = float(size)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]I?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"invalid size {size!r}: use a number with a unit, e.g. 5GB or 500MB")
        value = float(m.group(1)) * _UNITS[(m.group(2) or "").upper()]
    if not value >= 1:
        raise ValueError(f"size must be at least 1 byte, got {size!r}")
    return int(value)


@dataclass
class Plan:
    """A resolved merge: the weight vector (oldest first) and every choice that produced it."""

    method: str
    weights: np.ndarray
    params: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict:
        """What merge.json records about the method (the engine adds inputs, steps and weights)."""
        return {
            "method": self.method,
            **self.params,
            "weights": [float(x) for x in self.weights],
            "weights_sum": float(self.weights.sum()),
            "lag_checkpoints": float(_weights.lag(self.weights)),
            "notes": self.notes,
        }


def _undeclared_gram(name: str):
    raise RuntimeError(f"method {name!r} reads the Gram matrix but its registry entry says it does not")


def plan(
    ckpts,
    method: str = "sma",
    *,
    window: int | None = None,
    offset: int | None = None,
    alpha: float | str | None = None,
    decay: float | None = None,
    weights: Sequence[float] | None = None,
    ahead: float | None = 0.0,
    gram=None,
    shape=None,
    sigma_rel: float | None = None,
    gamma: float | None = None,
    progress: bool = True,
) -> Plan:
    """Resolve a method and its knobs into a weight vector over the opened checkpoints ``ckpts``."""
    entry = methods.get(method)
    knobs = dict(window=window, offset=offset, alpha=alpha, decay=decay, weights=weights, gram=gram)
    knobs |= dict(shape=shape, sigma_rel=sigma_rel, gamma=gamma)
    methods.reject_unused(entry, knobs | {"ahead": ahead or None})  # ahead=0 is the default everywhere
    knobs["ahead"] = ahead
    n = len(ckpts)
    if n < 1:
        raise ValueError("no checkpoints given")
    if entry.needs_gram(knobs):
        gram_data = lambda: methods.gram_for(ckpts, gram, progress)
    else:  # a builder that reads the Gram matrix must declare it in its registry entry
        gram_data = lambda: _undeclared_gram(entry.name)
    w, params, notes = entry.build(n, knobs, ckpts, gram_data)
    return Plan(entry.name, np.asarray(w, dtype=float), params, [x for x in notes if x])


def execute(
    ckpts,
    the_plan: Plan,
    output,
    *,
    dtype: str = "same",
    accumulate: str = "float32",
    shard_size="5GB",
    dry_run: bool = False,
    force: bool = False,
    progress: bool = True,
    allow_nonfinite: bool = False,
):
    """Apply a plan with the streaming engine; records the plan in the output's merge.json."""
    from .engine import merge_weights

    return merge_weights(
        ckpts,
        the_plan.weights,
        output,
        dtype=dtype,
        accumulate=accumulate,
        shard_size=parse_size(shard_size),
        allow_nonfinite=allow_nonfinite,
        dry_run=dry_run,
        force=force,
        progress=progress,
        metadata={"extramerge.method": the_plan.method},
        record=the_plan.record(),
    )


def merge(
    checkpoints,
    *,
    method: str = "sma",
    window: int | None = None,
    offset: int | None = None,
    alpha: float | str | None = None,
    decay: float | None = None,
    weights: Sequence[float] | None = None,
    ahead: float | None = 0.0,
    gram=None,
    shape=None,
    sigma_rel: float | None = None,
    gamma: float | None = None,
    output,
    dtype: str = "same",
    accumulate: str = "float32",
    shard_size="5GB",
    dry_run: bool = False,
    force: bool = False,
    progress: bool = True,
    allow_nonfinite: bool = False,
):
    """Merge checkpoints (oldest first) with one method into ``output``; returns the engine's MergeSummary.

    See the module docstring for methods and defaults. ``dry_run`` validates every input and projects
    bytes and peak memory without writing anything.
    """
    with distributed.agreed():  # several processes (distributed.process_group): a checkpoint one cannot open
        ckpts, opened_here = open_all(checkpoints)  # fails them all here
    try:
        the_plan = plan(
            ckpts,
            method,
            window=window,
            offset=offset,
            alpha=alpha,
            decay=decay,
            weights=weights,
            ahead=ahead,
            gram=gram,
            shape=shape,
            sigma_rel=sigma_rel,
            gamma=gamma,
            progress=progress,
        )
        return execute(
            ckpts,
            the_plan,
            output,
            dtype=dtype,
            accumulate=accumulate,
            shard_size=shard_size,
            dry_run=dry_run,
            force=force,
            progress=progress,
            allow_nonfinite=allow_nonfinite,
        )
    finally:
        if opened_here:
            for c in ckpts:
                c.close()
