"""Forecast mode: choose the merge (and α) from the checkpoints up to a step, then measure it at the newest.

This is the choice a user of :mod:`extramerge.online` faces: the merge must be fixed before the run ends.
The whole calibration-half decision (:func:`extramerge.study.choose.choose`) runs on the prefix as if it
were the run; its recommendation's recipe (method and knobs, windows kept at their size) is then rebuilt
over every checkpoint, so it is the same merge applied at the newest checkpoint.
"""

from __future__ import annotations

import numpy as np

from .choose import choose
from .inputs import StudyError
from .menu import rebuild

__all__ = ["Prefix", "forecast", "prefix_size"]


class Prefix:
    """The first m of an evaluator's n checkpoints, as an evaluator of their own."""

    def __init__(self, ev, m: int, n: int):
        self.ev, self.m, self.n = ev, m, n

    def measure(self, w, half: str):
        w = np.asarray(w, dtype=float)
        if w.size != self.m:
            raise ValueError(f"a prefix weight vector needs {self.m} entries, got {w.size}")
        return self.ev.measure(np.concatenate([w, np.zeros(self.n - self.m)]), half)


def prefix_size(steps: list[int], cfg) -> int:
    """How many checkpoints lie at or before ``--forecast-from``; StudyError when too few or all."""
    upto = int(cfg.forecast_from)
    n = len(steps)
    m = sum(1 for s in steps if s <= upto)
    need = max(cfg.window + min([d for d in cfg.offsets if d >= 1], default=1) + 1, 3)
    if m >= n:
        raise StudyError(
            f"--forecast-from {upto}: every checkpoint (the newest is step {steps[-1]}) is at or before it; "
            "pick a step before the newest"
        )
    if m < need:
        raise StudyError(
            f"--forecast-from {upto}: {m} checkpoints up to that step, the study needs at least {need} "
            f"(--window {cfg.window} plus the smallest offset plus one)"
        )
    return m


def forecast(ev, steps: list[int], grid_of, cfg, bar) -> tuple[dict, dict]:
    """(the forecast block, its merge rebuilt over every checkpoint). ``grid_of(steps)``: the learning-rate
    grid of a list of checkpoint steps."""
    upto = int(cfg.forecast_from)
    n = len(steps)
    m = prefix_size(steps, cfg)
    ch = choose(Prefix(ev, m, n), grid_of(steps[:m]), m, cfg, bar)
    rec = ch.recommendation
    recipe = {**rec["recipe"], "window_all": False}
    full = rebuild(recipe, n)
    full["kind"] = rec["kind"]
    block = {
        "from_step": upto,
        "checkpoints": m,
        "steps": [steps[0], steps[m - 1]],
        "chosen": rec["name"],
        "kind": rec["kind"],
        "recipe": _plain(recipe),
        "alpha": rec.get("alpha"),
        "offset": rec.get("offset"),
        "predicted_delta": rec["predicted"]["delta"],
        "predicted_interval": rec["predicted"]["interval"],
        "calib_delta": rec["calib_delta"],
        "calib_se": rec["calib_se"],
        "plain_best": ch.plain_best["name"],
        "theory_pick": ch.theory_pick["candidate"]["name"],
        "theory_offered": ch.theory_pick["offered"],
        "alpha_star": {str(d): c["alpha_star"] for d, c in ch.theory.items()},
        "applied": full["name"],
        "weights": [float(x) for x in full["weights"]],
    }
    return block, full


def _plain(recipe: dict) -> dict:
    return {k: (list(v) if isinstance(v, (list, tuple, np.ndarray)) else v) for k, v in recipe.items()}
