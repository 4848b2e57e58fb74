"""Learning-rate schedules shared by the toy simulator and the LM trainer.

Every factory returns a :class:`Schedule`: a callable ``f(step) -> lr`` that takes an ``int`` (returns a
``float``) or a numpy array of steps (returns a float64 array of the same shape). Steps are 0-based: ``f(0)``
is the learning rate of the first update. Steps past ``total_steps`` keep the final learning rate.

Conventions (one formula each, all with a linear warmup of ``warmup`` steps):

- warmup:  ``lr · (step + 1) / warmup`` for ``step < warmup`` (the first step never uses lr = 0);
- cosine:  ``final + (lr − final) · ½(1 + cos(π p))`` with ``p = (step − warmup) / (total − warmup)``;
- WSD (warmup–stable–decay, Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed
  Training Durations"): ``lr`` until ``total − decay_steps``, then with ``p = (step − start) / decay_steps``
  ``linear``: ``lr − (lr − final) p`` (THEORY.md §f: η_t = η(1 − t/T_d) when final = 0),
  ``cosine``: ``final + (lr − final) ½(1 + cos π p)``, ``1-sqrt``: ``final + (lr − final)(1 − √p)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

__all__ = ["Schedule", "constant", "cosine", "wsd", "get_schedule", "SCHEDULES", "as_schedule"]

WSD_SHAPES = ("linear", "cosine", "1-sqrt")


class Schedule:
    """A learning-rate schedule ``step -> lr`` (scalar or vectorised over a numpy array of steps).

    Attributes: ``name``, ``peak`` (the largest learning rate), ``total_steps`` (None for constant),
    ``is_constant`` (True when every step has the same learning rate), ``params`` (the factory arguments).
    """

    def __init__(
        self,
        name: str,
        fn: Callable[[np.ndarray], np.ndarray],
        *,
        peak: float,
        total_steps: int | None,
        is_constant: bool,
        params: dict,
    ):
        self.name = name
        self._fn = fn
        self.peak = float(peak)
        self.total_steps = total_steps
        self.is_constant = is_constant
        self.params = params

    def __call__(self, step):
        if isinstance(step, (int, np.integer)):
            if step < 0:
                raise ValueError(f"step must be >= 0, got {step}")
            return float(self._fn(np.asarray(step, dtype=np.float64)))
        steps = np.asarray(step)
        if steps.dtype.kind not in "iuf":
            raise ValueError(f"step must be an int or an array of ints, got dtype {steps.dtype}")
        if steps.size and steps.min() < 0:
            raise ValueError("step must be >= 0")
        out = self._fn(steps.astype(np.float64))
        return float(out) if out.ndim == 0 else out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.name}({args})"


def _check_lr(name: str, value: float, *, allow_zero: bool) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        rng = "[0, inf)" if allow_zero else "(0, inf)"
        raise ValueError(f"{name} must be finite and in {rng}, got {value}")
    return value


def _check_steps(name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _warmup_factor(steps: np.ndarray, warmup: int) -> np.ndarray:
    if warmup == 0:
        return np.ones_like(steps)
    return np.minimum(1.0, (steps + 1.0) / warmup)


def constant(lr: float) -> Schedule:
    """Constant learning rate: ``f(step) = lr``."""
    lr = _check_lr("lr", lr, allow_zero=False)
    return Schedule(
        "constant",
        lambda s: np.full_like(s, lr),
        peak=lr,
        total_steps=None,
        is_constant=True,
        params={"lr": lr},
    )


def cosine(lr: float, total_steps: int, *, warmup: int = 0, final_lr: float = 0.0) -> Schedule:
    """Linear warmup, then cosine decay from ``lr`` to ``final_lr`` at ``total_steps``."""
    lr = _check_lr("lr", lr, allow_zero=False)
    total_steps = _check_steps("total_steps", total_steps, minimum=1)
    warmup = _check_steps("warmup", warmup, minimum=0)
    if warmup >= total_steps:
        raise ValueError(f"warmup must be in [0, total_steps={total_steps}), got {warmup}")
    final_lr = _check_lr("final_lr", final_lr, allow_zero=True)
    if final_lr > lr:
        raise ValueError(f"final_lr must be in [0, lr={lr}], got {final_lr}")
    span = total_steps - warmup

    def fn(s: np.ndarray) -> np.ndarray:
        p = np.clip((s - warmup) / span, 0.0, 1.0)
        decayed = final_lr + (lr - final_lr) * 0.5 * (1.0 + np.cos(np.pi * p))
        return np.where(s < warmup, lr * _warmup_factor(s, warmup), decayed)

    return Schedule(
        "cosine",
        fn,
        peak=lr,
        total_steps=total_steps,
        is_constant=False,
        params={"lr": lr, "total_steps": total_steps, "warmup": warmup, "final_lr": final_lr},
    )


def wsd(
    lr: float,
    total_steps: int,
    *,
    warmup: int = 0,
    decay_fraction: float = 0.2,
    decay_steps: int | None = None,
    shape: str = "linear",
    final_lr: float = 0.0,
) -> Schedule:
    """Warmup–stable–decay: linear warmup, constant ``lr``, then a decay of ``decay_steps`` steps
    (default ``round(decay_fraction · total_steps)``) ending at ``final_lr`` on ``total_steps``.

    ``shape`` is ``'linear'``, ``'cosine'`` or ``'1-sqrt'`` (see the module docstring for the formulas).
    """
    lr = _check_lr("lr", lr, allow_zero=False)
    total_steps = _check_steps("total_steps", total_steps, minimum=1)
    warmup = _check_steps("warmup", warmup, minimum=0)
    final_lr = _check_lr("final_lr", final_lr, allow_zero=True)
    if final_lr > lr:
        raise ValueError(f"final_lr must be in [0, lr={lr}], got {final_lr}")
    if shape not in WSD_SHAPES:
        raise ValueError(f"shape must be one of {WSD_SHAPES}, got {shape!r}")
    if decay_steps is None:
        decay_fraction = float(decay_fraction)
        if not (0.0 <= decay_fraction <= 1.0):
            raise ValueError(f"decay_fraction must be in [0, 1], got {decay_fraction}")
        decay_steps = int(round(decay_fraction * total_steps))
    decay_steps = _check_steps("decay_steps", decay_steps, minimum=0)
    if warmup + decay_steps > total_steps:
        raise ValueError(
            f"decay_steps must be in [0, total_steps - warmup = {total_steps - warmup}], got {decay_steps}"
        )
    start = total_steps - decay_steps

    def fn(s: np.ndarray) -> np.ndarray:
        if decay_steps == 0:
            decayed = np.full_like(s, lr)
        else:
            p = np.clip((s - start) / decay_steps, 0.0, 1.0)
            if shape == "linear":
                factor = 1.0 - p
            elif shape == "cosine":
                factor = 0.5 * (1.0 + np.cos(np.pi * p))
            else:
                factor = 1.0 - np.sqrt(p)
            decayed = final_lr + (lr - final_lr) * factor
        return np.where(s < warmup, lr * _warmup_factor(s, warmup), decayed)

    params = {
        "lr": lr,
        "total_steps": total_steps,
        "warmup": warmup,
        "decay_steps": decay_steps,
        "shape": shape,
        "final_lr": final_lr,
    }
    return Schedule(
        "wsd",
        fn,
        peak=lr,
        total_steps=total_steps,
        is_constant=(warmup == 0 and decay_steps == 0),
        params=params,
    )


SCHEDULES: dict[str, Callable[..., Schedule]] = {"constant": constant, "cosine": cosine, "wsd": wsd}


def get_schedule(name: str, lr: float, total_steps: int | None = None, **kw) -> Schedule:
    """Build a schedule by name (``'constant'``, ``'cosine'``, ``'wsd'``); ``total_steps`` is ignored for
    ``'constant'`` and required otherwise; extra keywords go to the factory."""
    if name not in SCHEDULES:
        raise ValueError(f"name must be one of {sorted(SCHEDULES)}, got {name!r}")
    if name == "constant":
        if kw:
            raise ValueError(f"constant schedule takes no extra arguments, got {sorted(kw)}")
        return constant(lr)
    if total_steps is None:
        raise ValueError(f"total_steps is required for the {name!r} schedule")
    return SCHEDULES[name](lr, total_steps, **kw)


def as_schedule(lr) -> Schedule | Callable[[int], float]:
    """A float becomes :func:`constant`; a callable is returned unchanged (it must map step -> lr)."""
    if callable(lr):
        return lr
    if isinstance(lr, (int, float, np.floating, np.integer)) and not isinstance(lr, bool):
        return constant(float(lr))
    raise ValueError(f"lr must be a positive float or a callable step -> lr, got {lr!r}")
