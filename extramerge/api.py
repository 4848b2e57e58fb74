"""Python API: ``merge`` (a weight vector applied to real checkpoints) and ``analyze`` (diagnostics).

``merge`` = open the checkpoints → ``plan`` (method and knobs → one affine weight vector from
rivervalley.weights) → ``execute`` (the streaming engine reads each checkpoint once). Defaults, with N the
number of checkpoints (oldest first):

    sma     window K = N                       uniform average of the last K
    wma     window K = N                       weights ∝ 1..K, newest heaviest
    ema     decay β = 1 − 2/(N+1)              same centre of mass as SMA over all N
    extra   K = ⌊N/2⌋, d = N − K, α = α_match  needs K + d ≤ N; α may be a number, 'match' = (K−1)/(2d)
                                               (zero lag on a straight river) or 'geometric' (noise-aware,
                                               one extra Gram pass; see extramerge.select)
    trend   window K = N, ahead = 0            least-squares line through the last K, evaluated ``ahead``
                                               checkpoints past the newest
    pc1     window K = N, ahead = 0            SMA of the last K moved onto the PC1 trend line ``ahead``
                                               past the newest; needs the Gram matrix: one extra read pass,
                                               or none when ``gram=`` gives an analysis' gram.npz
    custom  weights (one per checkpoint)        a sum other than 1 is allowed with a warning (the merge is
                                               then not translation-equivariant: it rescales the weights)

A knob that does not apply to the chosen method is an error, not silently ignored.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rivervalley import analysis as _analysis
from rivervalley import weights as _weights

from .trajectory import analyze

__all__ = ["merge", "analyze", "plan", "execute", "Plan", "METHODS", "parse_size", "open_all"]

METHODS = ("sma", "ema", "wma", "extra", "trend", "pc1", "custom")
_KNOBS = {  # which optional knobs each method accepts
    "sma": {"window"},
    "wma": {"window"},
    "ema": {"decay"},
    "extra": {"window", "offset", "alpha", "gram"},
    "trend": {"window", "ahead"},
    "pc1": {"window", "ahead", "gram"},
    "custom": {"weights"},
}
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


def _reject_unused(method: str, given: dict) -> None:
    for knob, value in given.items():
        if value is not None and knob not in _KNOBS[method]:
            flag = "--" + knob.replace("_", "-")
            allowed = sorted(m for m, ks in _KNOBS.items() if knob in ks)
            raise ValueError(
                f"{flag} ({knob}) does not apply to method '{method}' (only to {', '.join(allowed)})"
            )


def _gram_for(ckpts, gram, progress: bool):
    """Gram matrices: from ``gram`` (a GramData or a gram.npz path) if given, else one streaming pass."""
    from .trajectory import GramData, gram_pass, load_gram

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


def _warn_uneven_steps(ckpts) -> str | None:
    steps = [c.step for c in ckpts]
    if len(steps) >= 3 and None not in steps and len(set(np.diff(steps).tolist())) > 1:
        return "checkpoint steps are unevenly spaced; positions are taken as checkpoint indices (1..N)"
    return None


def _extra(n, window, offset, alpha, ckpts, gram, progress) -> tuple[np.ndarray, dict, list[str]]:
    from . import select

    notes = []
    if window is None and offset is None:
        window = max(1, n // 2)
        offset = n - window
    elif window is None:
        window = n - int(offset)
    elif offset is None:
        offset = n - int(window)
    window, offset = int(window), int(offset)
    if window < 1 or offset < 0:
        raise ValueError(
            f"method 'extra' needs window >= 1 and offset >= 0, got window={window}, offset={offset}"
        )
    if window + offset > n:
        raise ValueError(
            f"method 'extra' with window K={window} and offset d={offset} needs K + d = {window + offset} "
            f"checkpoints, got {n}"
        )
    params = {"window": window, "offset": offset}
    if offset == 0 and (alpha is None or isinstance(alpha, str)):
        raise ValueError("method 'extra' with offset d=0 cannot extrapolate: give --offset >= 1")
    estimates = {"alpha_match": select.alpha_match(window, offset)} if offset else {}
    rule = "match" if alpha is None else alpha
    if isinstance(rule, str):
        rule = rule.strip().lower()
        if rule == "geometric":
            data, how = _gram_for(ckpts, gram, progress)
            river = select.estimate_river(data.gram)
            estimates["alpha_geometric"] = select.alpha_geometric(river, window, offset)
            params["river"] = river.to_dict()
            notes.append(f"Gram matrix {how}")
        elif rule != "match":
            try:
                rule = float(rule)
            except ValueError:
                raise ValueError(f"alpha must be a number, 'match' or 'geometric', got {alpha!r}") from None
    if isinstance(rule, str):
        params["alpha_rule"] = rule
        alpha = estimates[f"alpha_{rule}"]
    else:
        params["alpha_rule"] = "given"
        alpha = float(rule)
    params["alpha"] = alpha
    params["alpha_estimates"] = estimates
    return _weights.extra(n, window, offset, alpha), params, notes


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
    progress: bool = True,
) -> Plan:
    """Resolve a method and its knobs into a weight vector over the opened checkpoints ``ckpts``."""
    method = str(method).lower()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    given = dict(window=window, offset=offset, alpha=alpha, decay=decay, weights=weights, gram=gram)
    _reject_unused(method, given | {"ahead": ahead or None})  # ahead=0 is the default everywhere
    n = len(ckpts)
    if n < 1:
        raise ValueError("no checkpoints given")
    notes: list[str] = []
    if method in ("sma", "wma"):
        K = n if window is None else window
        w, params = getattr(_weights, method)(n, K), {"window": int(K)}
    elif method == "ema":
        beta = 1.0 - 2.0 / (n + 1) if decay is None else decay
        w, params = _weights.ema(n, beta), {"decay": float(beta)}
    elif method == "extra":
        w, params, notes = _extra(n, window, offset, alpha, ckpts, gram, progress)
    elif method == "trend":
        K, h = (n if window is None else window), (0.0 if ahead is None else ahead)
        w, params = _weights.trend(n, K, ahead=h), {"window": int(K), "ahead": float(h)}
        notes.append(_warn_uneven_steps(ckpts))
    elif method == "pc1":
        K, h = (n if window is None else window), (0.0 if ahead is None else ahead)
        _weights.sma(n, K)  # validate the window before a long pass
        data, how = _gram_for(ckpts, gram, progress)
        w = _analysis.pc1_trend_weights(data.gram, K, ahead=h)
        params = {"window": int(K), "ahead": float(h), "fve1": float(_analysis.fve1(data.gram))}
        notes += [f"Gram matrix {how}", _warn_uneven_steps(ckpts)]
    else:  # custom
        if weights is None:
            raise ValueError("method 'custom' needs weights (--weights w1,w2,...), one per checkpoint")
        w, affine = _weights.custom(weights)
        if w.size != n:
            raise ValueError(
                f"got {w.size} weights for {n} checkpoints: give exactly one weight per checkpoint"
            )
        params = {}
        if not affine:
            msg = f"custom weights sum to {w.sum():.6g}, not 1: the merge rescales the parameters"
            warnings.warn(msg, UserWarning, stacklevel=2)
            notes.append(msg)
    return Plan(method, np.asarray(w, dtype=float), params, [x for x in notes if x])


def open_all(checkpoints):
    """Open paths (files, checkpoint folders, or a folder of step_* checkpoints), oldest first.

    Returns (checkpoints, opened_here): already opened Checkpoint objects are passed through.
    """
    from .checkpoints import Checkpoint, load_checkpoints

    if isinstance(checkpoints, str | os.PathLike):
        checkpoints = [checkpoints]
    checkpoints = list(checkpoints)
    if checkpoints and all(isinstance(c, Checkpoint) for c in checkpoints):
        return checkpoints, False
    return load_checkpoints([str(p) for p in checkpoints]), True


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
    ckpts, opened_here = open_all(checkpoints)
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
