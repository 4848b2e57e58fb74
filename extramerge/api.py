"""Python API: ``merge`` (a weight vector applied to real checkpoints) and ``analyze`` (diagnostics).

``merge`` = open the checkpoints → ``plan`` (method and knobs → one affine weight vector, built by the
method's entry in ``extramerge.methods.REGISTRY``, whose docstring lists the defaults; the API hands it the
Gram matrix where the entry says it needs one: ``gram_for``) → ``execute`` (the streaming engine reads each
checkpoint once).

The knobs (``window=``, ``alpha=``, ...) are the parameters the methods declare (``methods.Param``), passed
through as keywords. A knob that does not apply to the chosen method is an error, not silently ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rivervalley import weights as _weights

from . import distributed, methods
from .io import open_all
from .trajectory import GramData, analyze, gram_pass, load_gram

__all__ = ["merge", "analyze", "plan", "execute", "Plan", "METHODS", "parse_size", "open_all", "gram_for"]

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


def gram_for(ckpts, gram, progress: bool) -> tuple[GramData, str]:
    """Gram matrices: from ``gram`` (a GramData or a gram.npz path) if given, else one streaming pass."""
    if gram is None:
        return gram_pass(ckpts, progress=progress), "computed by an extra read pass"
    data = gram if isinstance(gram, GramData) else load_gram(gram)
    mine = [str(Path(c.path).resolve()) for c in ckpts]
    theirs = [str(Path(p).resolve()) for p in data.paths]
    if data.n != len(ckpts) or (theirs and theirs != mine):
        raise ValueError(
            f"the Gram matrix {gram} was computed for other checkpoints than the {len(ckpts)} given"
        )
    return data, f"read from {gram}" if not isinstance(gram, GramData) else "given"


def plan(ckpts, method: str = "sma", *, progress: bool = True, **knobs) -> Plan:
    """Resolve a method and its knobs into a weight vector over the opened checkpoints ``ckpts``.

    ``knobs`` are the method's parameters (``extramerge.methods``: window, offset, alpha, decay, weights,
    ahead, gram, shape, sigma_rel, gamma, ...); one left out takes its declared default.
    """
    entry = methods.get(method)
    methods.reject_unused(entry, knobs)
    n = len(ckpts)
    if n < 1:
        raise ValueError("no checkpoints given")
    mine = {p.name: knobs.get(p.name, p.default) for p in entry.params}
    cache: dict = {}

    def gram() -> np.ndarray:  # the N×N matrix, fetched once, for an entry that declares it needs it
        if not entry.needs_gram(mine):
            raise RuntimeError(
                f"method {entry.name!r} reads the Gram matrix but its registry entry says it does not"
            )
        if not cache:
            data, how = gram_for(ckpts, mine.get("gram"), progress)
            cache.update(matrix=data.gram, note=f"Gram matrix {how}")
        return cache["matrix"]

    w, params, notes = entry.build(n, mine, ckpts, gram)
    notes = [cache.get("note"), *notes]
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
    output,
    dtype: str = "same",
    accumulate: str = "float32",
    shard_size="5GB",
    dry_run: bool = False,
    force: bool = False,
    progress: bool = True,
    allow_nonfinite: bool = False,
    **knobs,
):
    """Merge checkpoints (oldest first) with one method into ``output``; returns the engine's MergeSummary.

    ``knobs`` are the method's parameters, as for :func:`plan` (extramerge.methods lists methods and
    defaults). ``dry_run`` validates every input and projects bytes and peak memory without writing
    anything.
    """
    with distributed.agreed():  # several processes (distributed.process_group): a checkpoint one cannot open
        ckpts, opened_here = open_all(checkpoints)  # fails them all here
    try:
        the_plan = plan(ckpts, method, progress=progress, **knobs)
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
