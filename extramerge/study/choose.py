"""Everything the study decides from the calibration half alone: the fit, the menu's calibration ΔL, the
predictions, the gate, the recommendation and the theory's own pick.

It needs only an evaluator with ``measure(weights, "calib") -> DocLosses``, so the same code runs on real
checkpoints (:class:`extramerge.study.evaluator.Evaluator`), on a prefix of them (forecast mode) and on
simulated trajectories (:mod:`extramerge.study.simulated`).

Predictions, each against the newest checkpoint and against the best plain calibration merge P (the plain
selector's choice):

- a merge measured on the calibration half is predicted by that measurement: its calibration ΔL with a
  Student-t 90% interval from its paired, document-clustered s.e. (calibration and measurement halves are
  independent samples of documents). This is the interval the study ships for every menu merge.
- the model's prediction is kept beside it (``predicted["model"]``): ΔL(c) − ΔL(P) from the fit, where
  what the two merges share (the newest checkpoint's own misfit) cancels, plus P's calibration ΔL, so the
  calibration noise (P's paired s.e.) and the model's error are each counted once. It is the prediction
  of merges never measured on the calibration half (α = 3, the diagnostics, a forecast's merge) and what
  the theory's own pick ranks by. ``scripts/study_validation.py`` and the regime map score both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from rivervalley import estimate as est

from .evaluator import paired_delta
from .menu import plain_menu, quick_pool
from .theory import Reach, Theory, alpha_theory, calibrate, fit_checks, fit_gate, theory_merges

__all__ = ["Choice", "choose", "predict_candidate", "NOT_IDENTIFIED_WIDTH"]

NOT_IDENTIFIED_WIDTH = 0.25  # a 90% interval wider than this (nats) is "not identified"


@dataclass
class Choice:
    n: int
    fit: Theory
    trusted: bool
    problems: list
    gate: list  # the fit-level reasons theory merges are not offered (empty: they may be)
    theory: dict  # offset -> α* cell
    offsets: list
    menu: list  # every candidate (plain and theory); the pool's have calib_delta
    pool: list  # the candidates evaluated on the calibration half
    diag: list  # theory merges measured as diagnostics only
    plain_best: dict
    recommendation: dict
    theory_best: dict | None
    theory_pick: dict
    cal_losses: dict
    cal_detail: dict
    t90: float  # the calibration half's two-sided 90% Student t (documents − 1 degrees of freedom)
    skipped: list = field(default_factory=list)  # better-calibrated merges not shipped, and why


def choose(ev, grid: est.Grid, n: int, cfg, bar) -> Choice:
    fit, cal_losses, cal_detail = calibrate(ev, grid, n, bar, lean=cfg.quick)
    problems = fit_checks(fit, cal_losses)
    trusted = not problems
    plain, offsets = plain_menu(n, cfg)
    K = cfg.window
    theory = {d: alpha_theory(fit, n, K, d, trusted) for d in offsets}
    own, diag = theory_merges(fit, theory, n, K, trusted)
    menu = plain + own
    pool = quick_pool(menu, offsets) if cfg.quick else menu

    base = ev.measure(np.eye(n)[-1], "calib")
    dls = {}
    for c in pool:
        dls[id(c)] = dl = base if c["method"] == "last" else ev.measure(c["weights"], "calib")
        c["calib_delta"], c["calib_se"] = paired_delta(dl, base)
        bar()
    plain_pool = [c for c in pool if c["kind"] == "plain"]
    P = min(plain_pool, key=lambda c: c["calib_delta"])
    t = _t90(len(base.tokens) - 1)
    for c in menu + diag:
        model = _predict(fit, c, P, t) if trusted else _unidentified()
        if id(c) in dls:  # measured on the calibration half: that measurement is the prediction
            d, se = paired_delta(dls[id(c)], dls[id(P)])
            c["calib_vs_plain"], c["calib_vs_plain_se"] = d, se
            c["predicted"] = {
                "delta": c["calib_delta"],
                "interval": _iv(c["calib_delta"], t * c["calib_se"]),
                "vs_plain": d,
                "vs_plain_interval": _iv(d, t * se),
                "source": "calibration",
                "model": model,
            }
        else:
            c["predicted"] = {**model, "source": "model" if trusted else None, "model": model}

    gate = fit_gate(fit, problems)
    reach = Reach(
        grid,
        [*cal_detail["weights"].values(), *(c["weights"] for c in plain_pool)],
        [c["alpha"] for c in plain_pool if c["method"] == "extra"],
    )
    in_pool = {id(c) for c in pool}
    for c in own:
        why = list(gate) + reach.outside(c)
        if id(c) in in_pool and c["calib_delta"] > 0:
            why.append(f"its own calibration ΔL is {c['calib_delta']:+.4f} > 0")
        c["offered"], c["not_offered_because"] = not why, why
    offered = [c for c in own if c["offered"] and id(c) in in_pool]

    # the recommendation: lowest calibration ΔL among plain and offered theory merges, never one whose own
    # predicted interval lies entirely above 0 (worse than the newest checkpoint)
    skipped, rec = [], None
    for c in sorted(plain_pool + offered, key=lambda c: c["calib_delta"]):
        lo = c["predicted"]["interval"][0] if c["predicted"]["interval"] else None
        if c["method"] != "last" and lo is not None and lo > 0:
            skipped.append(
                {"name": c["name"], "why": f"its predicted 90% interval lies above 0 (from {lo:+.4f})"}
            )
            continue
        rec = c
        break
    theory_best = min(offered, key=lambda c: c["calib_delta"]) if offered else None
    return Choice(
        n=n,
        fit=fit,
        trusted=trusted,
        problems=problems,
        gate=gate,
        theory=theory,
        offsets=offsets,
        menu=menu,
        pool=pool,
        diag=diag,
        plain_best=P,
        recommendation=rec,
        theory_best=theory_best,
        theory_pick=_theory_pick(pool, gate, reach, trusted),
        cal_losses=cal_losses,
        cal_detail=cal_detail,
        t90=t,
        skipped=skipped,
    )


def predict_candidate(ch: Choice, c: dict) -> dict:
    """The prediction of a merge not measured on the calibration half (α = 3, a forecast's merge): the
    model's, relative to the best plain merge."""
    model = _predict(ch.fit, c, ch.plain_best, ch.t90) if ch.trusted else _unidentified()
    return {**model, "source": "model" if ch.trusted else None, "model": model}


def _theory_pick(pool, gate, reach, trusted) -> dict:
    """The theory's own choice: the lowest *predicted* ΔL among the evaluated merges that stay inside the
    calibrated reach with calibration ΔL ≤ 0, or the newest checkpoint (not offered) behind a closed gate."""
    last = next(c for c in pool if c["method"] == "last")
    if gate or not trusted:
        return {"candidate": last, "offered": False, "why": gate or ["the fit is not trusted"]}
    ok = [
        c
        for c in pool
        if c["calib_delta"] <= 0 and not reach.outside(c) and c["predicted"]["model"]["delta"] is not None
    ]
    best = min(ok, key=lambda c: c["predicted"]["model"]["delta"], default=last)
    return {"candidate": best, "offered": True, "why": []}


def _predict(fit: Theory, c: dict, P: dict, t: float) -> dict:
    """ΔL of c relative to P (model) and relative to the newest checkpoint (P's calibration ΔL + that)."""
    if c["method"] == "last":  # the reference itself: exactly 0
        rel = fit.predict_between(c["weights"], P["weights"])
        return {"delta": 0.0, "interval": [0.0, 0.0], **_rel(rel)}
    if c is P:
        rel = est.Interval(0.0, 0.0, 0.0)
    else:
        rel = fit.predict_between(c["weights"], P["weights"])
    anchor, a_half = P["calib_delta"], t * P["calib_se"]
    lo = anchor + rel.value - math.hypot(rel.value - rel.lo, a_half)
    hi = anchor + rel.value + math.hypot(rel.hi - rel.value, a_half)
    ok = hi - lo <= NOT_IDENTIFIED_WIDTH and math.isfinite(lo) and math.isfinite(hi)
    return {"delta": anchor + rel.value, "interval": [lo, hi] if ok else None, **_rel(rel)}


def _iv(value: float, half: float) -> list[float] | None:
    """value ± half, or None (not identified) when wider than NOT_IDENTIFIED_WIDTH or not finite."""
    if not (math.isfinite(value) and math.isfinite(half)) or 2 * half > NOT_IDENTIFIED_WIDTH:
        return None
    return [value - half, value + half]


def _rel(rel: est.Interval) -> dict:
    ok = rel.hi - rel.lo <= NOT_IDENTIFIED_WIDTH and math.isfinite(rel.lo) and math.isfinite(rel.hi)
    return {"vs_plain": rel.value, "vs_plain_interval": [rel.lo, rel.hi] if ok else None}


def _unidentified() -> dict:
    return {"delta": None, "interval": None, "vs_plain": None, "vs_plain_interval": None}


def _t90(dof: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.95, max(dof, 1)))
