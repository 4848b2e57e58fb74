"""Argument checks of the simulator and its plans: which steps are checkpoints, the learning rate at each
step."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from rivervalley.schedules import Schedule, as_schedule

__all__ = [
    "int_at_least",
    "nonneg_float",
    "checkpoint_plan",
    "checkpoint_steps",
    "lr_array",
    "is_constant_lr",
]


def int_at_least(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def nonneg_float(name: str, value) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def checkpoint_plan(
    steps: int | None = None, *, ckpt_every: int | None = None, n_ckpts: int | None = None, ckpt_from: int = 0
) -> tuple[int, int, int, int]:
    """The checkpoint plan of :func:`checkpoint_steps` as numbers, allocating nothing: returns
    ``(steps, first, every, count)``; the checkpoints are ``first + every * k`` for ``k < count``."""
    ckpt_from = int_at_least("ckpt_from", ckpt_from, 0)
    if ckpt_every is not None:
        ckpt_every = int_at_least("ckpt_every", ckpt_every, 1)
    if n_ckpts is not None:
        n_ckpts = int_at_least("n_ckpts", n_ckpts, 1)
    if steps is None:
        if ckpt_every is None or n_ckpts is None:
            raise ValueError("steps is required unless both ckpt_every and n_ckpts are given")
        steps = ckpt_from + (n_ckpts - 1) * ckpt_every
    steps = int_at_least("steps", steps, 0)
    if ckpt_every is None and n_ckpts is None:
        return steps, 0, 1, 0
    if ckpt_from > steps:
        raise ValueError(f"ckpt_from must be in [0, steps={steps}], got {ckpt_from}")
    if ckpt_every is None:
        if n_ckpts == 1:
            return steps, ckpt_from, 1, 1
        ckpt_every = (steps - ckpt_from) // (n_ckpts - 1)
        if ckpt_every < 1:
            raise ValueError(f"n_ckpts={n_ckpts} checkpoints do not fit in steps {ckpt_from}..{steps}")
    if n_ckpts is None:
        return steps, ckpt_from, ckpt_every, (steps - ckpt_from) // ckpt_every + 1
    last = ckpt_from + (n_ckpts - 1) * ckpt_every
    if last > steps:
        raise ValueError(
            f"n_ckpts={n_ckpts} checkpoints every {ckpt_every} from {ckpt_from} end at step "
            f"{last} > steps={steps}"
        )
    return steps, ckpt_from, ckpt_every, n_ckpts


def checkpoint_steps(
    steps: int | None = None, *, ckpt_every: int | None = None, n_ckpts: int | None = None, ckpt_from: int = 0
) -> tuple[int, np.ndarray]:
    """Resolve the checkpoint plan: returns ``(steps, ckpt_steps)``.

    - ``ckpt_every`` only: ``ckpt_from, ckpt_from + ckpt_every, ... <= steps``;
    - ``ckpt_every`` and ``n_ckpts``: exactly N checkpoints from ``ckpt_from`` (``steps`` defaults to the
      last one and must not be smaller);
    - ``n_ckpts`` only: ``ckpt_every = (steps − ckpt_from) // (n_ckpts − 1)``;
    - neither: no checkpoints.
    """
    steps, first, every, count = checkpoint_plan(
        steps, ckpt_every=ckpt_every, n_ckpts=n_ckpts, ckpt_from=ckpt_from
    )
    return steps, first + every * np.arange(count, dtype=np.int64)


def lr_array(lr, steps: int) -> tuple[np.ndarray, Callable]:
    sched = as_schedule(lr)
    if isinstance(sched, Schedule):
        lrs = np.asarray(sched(np.arange(max(steps, 1))), dtype=np.float64)
    else:
        lrs = np.array([float(sched(t)) for t in range(max(steps, 1))], dtype=np.float64)
    if not np.all(np.isfinite(lrs)) or np.any(lrs < 0):
        raise ValueError("lr must be finite and >= 0 at every step (got NaN, inf or a negative value)")
    return lrs, sched


def is_constant_lr(sched) -> bool:
    return isinstance(sched, Schedule) and sched.is_constant
