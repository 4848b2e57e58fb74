"""Where the checkpoints sit along the learning-rate area (``Grid``) and the calibration merges inside
the data (``calibration_weights``): the inputs of :mod:`rivervalley.estimate`'s fit."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Grid", "calibration_weights"]


@dataclass(frozen=True)
class Grid:
    """Where the checkpoints sit: ``area`` (normalised learning-rate area, A_1 = 0, A_N = N − 1) and
    ``lr_ratio`` (η_j / max η) of each checkpoint, oldest first; ``history``: (area, lr_ratio) points
    before the first checkpoint (area < 0), where the schedule is known, for the slow group's memory."""

    area: np.ndarray
    lr_ratio: np.ndarray
    history: tuple = ((), ())

    @property
    def n(self) -> int:
        return int(self.area.size)

    @property
    def constant_lr(self) -> bool:
        return bool(np.all(self.lr_ratio == 1.0)) and all(r == 1.0 for r in self.history[1])

    @classmethod
    def constant(cls, n: int) -> Grid:
        return cls(np.arange(n, dtype=float), np.ones(n))

    @classmethod
    def from_schedule(cls, steps, lr, *, history_intervals: float = 8.0) -> Grid:
        """From checkpoint steps and a learning rate: a callable step -> lr, or (steps, lrs) samples that
        cover the checkpoints (the area between two checkpoints is the trapezoid over every sample
        between them). Up to ``history_intervals`` mean checkpoint intervals of the schedule before the
        first checkpoint are kept, where known."""
        steps = np.asarray(steps, dtype=float)
        if steps.ndim != 1 or steps.size < 2 or np.any(np.diff(steps) <= 0):
            raise ValueError("checkpoint steps must be increasing, at least 2")
        if callable(lr):
            span = (steps[-1] - steps[0]) / (steps.size - 1) * history_intervals
            xs = np.arange(max(0.0, steps[0] - span), steps[-1] + 1)
            ys = np.asarray([lr(int(x)) for x in xs], dtype=float)
        else:
            xs, ys = (np.asarray(a, dtype=float) for a in lr)
            order = np.argsort(xs, kind="stable")
            xs, ys = xs[order], ys[order]
            if xs.size == 0 or xs[0] > steps[0] or xs[-1] < steps[-1]:
                have = f"{xs[0]:g}..{xs[-1]:g}" if xs.size else "no steps"
                raise ValueError(
                    f"the learning-rate schedule covers {have}, not the checkpoints' steps "
                    f"{steps[0]:g}..{steps[-1]:g}"
                )
        if not np.all(np.isfinite(ys)) or np.any(ys < 0):
            raise ValueError("learning rates must be finite and >= 0")
        at = np.interp(steps, xs, ys)
        cum = np.concatenate([[0.0], np.cumsum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2)])
        cum -= np.interp(steps[0], xs, cum)
        total = np.interp(steps[-1], xs, cum)
        if total <= 0 or at.max() <= 0:
            raise ValueError("the learning rate is zero over the checkpoints: no river progress to measure")
        unit = total / (steps.size - 1)
        pre = xs < steps[0]
        hist_area = cum[pre] / unit
        keep = hist_area >= -history_intervals
        return cls(
            np.interp(steps, xs, cum) / unit,
            at / at.max(),
            (tuple(hist_area[keep]), tuple(ys[pre][keep] / at.max())),
        )

    def slow_variance(self, rho: float) -> np.ndarray:
        """Valley variance of the slow group at each checkpoint, relative to its stationary variance at
        the largest learning rate: the relaxation dV/dA = −2κ(V − r(A)), κ = −ln ρ per unit of area
        (§g: V_{t+1} = (1 − ηλ)² V_t + η²σ² for small ηλ), from stationarity at the earliest known point."""
        xa = np.concatenate([np.asarray(self.history[0], dtype=float), self.area])
        xr = np.concatenate([np.asarray(self.history[1], dtype=float), self.lr_ratio])
        kappa = -math.log(rho)
        V = xr[0]
        out = []
        first = len(self.history[0])
        if first == 0:
            out.append(V)
        for i in range(1, xa.size):
            da = xa[i] - xa[i - 1]
            m = max(1, int(math.ceil(da * 8)))
            for k in range(m):  # r linear in area between known points; exact for constant r per piece
                r = xr[i - 1] + (xr[i] - xr[i - 1]) * (k + 0.5) / m
                V = r + (V - r) * math.exp(-2 * kappa * da / m)
            if i >= first:
                out.append(V)
        return np.asarray(out[-self.n :], dtype=float)


def calibration_weights(n: int, distances=(1, 2, 4, 8), windows=(4, 8)) -> dict[str, np.ndarray]:
    """The calibration merges (name → w), all inside the data: every checkpoint; pair averages of
    checkpoints h apart (all pairs for h = 1; for h > 1, pairs starting every ⌈h/2⌉ checkpoints and always
    the pair ending at the newest); uniform windows of K checkpoints ending at every other checkpoint and
    at the newest (the building blocks of SMA and Extra-Merge)."""
    if n < 3:
        raise ValueError(f"calibration needs at least 3 checkpoints, got {n}")
    out: dict[str, np.ndarray] = {}
    eye = np.eye(n)
    for j in range(n):
        out[f"ckpt {j + 1}"] = eye[j]
    for h in distances:
        if h >= n:
            continue
        starts = set(range(0, n - h, 1 if h == 1 else -(-h // 2))) | {n - 1 - h}
        for j in sorted(starts):
            out[f"pair {j + 1}+{j + 1 + h}"] = 0.5 * (eye[j] + eye[j + h])
    for k in windows:
        if k >= n:
            continue
        for end in sorted({*range(n, k - 1, -2)}):
            w = np.zeros(n)
            w[end - k : end] = 1.0 / k
            out[f"window {end - k + 1}-{end}"] = w
    return out
