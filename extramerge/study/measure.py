"""The measurement half: every merge the calibration half predicted, measured.

It reads nothing of the calibration half: its input is the predictions (:func:`.core.predict`, the
``predictions.json`` of ``--predict-only``) — the rows to measure with their predicted ΔL and intervals, the
best plain merge, the theory's best offered merge and the forecast — so a study measured later
(``--measure``) and a study run in one go go through the same code.

For each row: ΔL relative to the newest checkpoint and to the best plain calibration merge, paired
standard errors clustered by document, and whether the predicted 90% intervals covered it; then the
ablation ``theory_vs_plain`` (the theory's best offered merge minus the best plain one), the forecast's
gap to the measured best, and per offset the measured best α beside the theory's α*.
"""

from __future__ import annotations

import math

import numpy as np

from .evaluator import DocLosses, paired_delta
from .theory import sign_class

__all__ = ["measure"]


def measure(pred: dict, ev, bar=lambda: None) -> dict:
    """The study report: ``pred`` (JSON-shaped predictions) with every row measured on ``ev``'s "test"
    half; ``bar()`` after each row. ``pred`` is not modified."""
    rep = {k: v for k, v in pred.items() if k != "to_measure"}
    rows = pred["to_measure"]
    n = pred["checkpoints"]["n"]
    n_docs = len(ev.doc_tokens("test"))
    base = ev.measure(np.eye(n)[-1], "test")
    plain = ev.measure(pred["plain_best"]["weights"], "test")
    tokens = [int(x) for x in base.tokens]
    measured, dls = [], {}
    for c in rows:
        dl = ev.measure(c["weights"], "test")
        dls[c["name"]] = dl
        measured.append(_measured_row(c, dl, base, plain, n_docs, tokens))
        bar()
    tb = pred["theory_best"]
    pb = pred["plain_best"]["name"]
    if tb is None:
        why = pred["theory_gate"]["why_closed"] or [
            "no theory merge passed the gate (see candidates[].not_offered_because)"
        ]
        tvp = {"delta": None, "se": None, "theory": None, "plain": pb, "why": why}
    else:
        d, se = paired_delta(dls[tb], plain)
        tvp = {"delta": d, "se": se, "theory": tb, "plain": pb, "why": []}
    rep["measured"] = measured
    rep["theory_vs_plain"] = tvp
    if rep.get("forecast") is not None:
        rep["forecast"] = {**rep["forecast"]}
        _score_forecast(rep["forecast"], measured)
    rep["extra"] = {**rep["extra"], "by_offset": {k: dict(v) for k, v in rep["extra"]["by_offset"].items()}}
    _add_alpha_cells(rep, measured, rep["extra"]["offsets"])
    return rep


def _covered(interval, delta: float, se: float, z: float) -> bool | None:
    """Whether the measured value lies in the predicted interval widened by the measurement's own 90%
    half-width (the interval is for the expected gain); None for a not-identified interval."""
    if interval is None or not math.isfinite(se):
        return None
    lo, hi = interval
    return bool(abs(delta - 0.5 * (hi + lo)) <= math.hypot(0.5 * (hi - lo), z * se))


def _measured_row(c: dict, dl, base, plain, n_docs: int, tokens) -> dict:
    from scipy import stats

    delta, se = paired_delta(dl, base)
    d_p, se_p = paired_delta(dl, plain)
    z = float(stats.t.ppf(0.95, max(n_docs - 1, 1)))  # Student t, documents − 1 degrees of freedom
    p = c["predicted"]
    row = {
        "name": c["name"],
        "group": c["group"],
        "kind": c["kind"],
        "weights": [float(x) for x in c["weights"]],
        "delta": delta,
        "se": se,
        "predicted": p["delta"],  # a calibration measurement needs no fit; the model's is None untrusted
        "predicted_interval": p["interval"],
        "delta_vs_plain": d_p,
        "se_vs_plain": se_p,
        "predicted_vs_plain": p["vs_plain"],
        "predicted_vs_plain_interval": p["vs_plain_interval"],
    }
    if "alpha" in c:
        row["alpha"] = c["alpha"]
        row["offset"] = c["offset"]
    if c["kind"] == "theory":
        row["offered"] = c.get("offered", False)
    row["covered"] = _covered(row["predicted_interval"], delta, se, z)
    row["covered_vs_plain"] = _covered(row["predicted_vs_plain_interval"], d_p, se_p, z)
    row["prediction_source"] = p.get("source")  # calibration (measured there) or model
    m = p["model"]  # the theory's own prediction, scored beside the shipped one
    row["model"] = {
        "delta": m["delta"],
        "interval": m["interval"],
        "vs_plain": m["vs_plain"],
        "vs_plain_interval": m["vs_plain_interval"],
        "covered": _covered(m["interval"], delta, se, z),
        "covered_vs_plain": _covered(m["vs_plain_interval"], d_p, se_p, z),
    }
    row["doc_nll"] = [float(x) for x in dl.nll]  # paired comparisons between any two, offline
    row["doc_tokens"] = tokens
    return row


def _score_forecast(block: dict, measured: list[dict]) -> None:
    """The forecast's merge measured at the newest checkpoint, and its gap to the measured best."""
    row = next(m for m in measured if np.allclose(m["weights"], block["weights"], atol=1e-12))
    best = min(measured, key=lambda m: m["delta"])
    gap, se = paired_delta(_dl(row), _dl(best))
    block["measured"] = {
        "delta": row["delta"],
        "se": row["se"],
        "best": best["name"],
        "best_delta": best["delta"],
        "gap_to_best": gap,
        "gap_se": se,
    }


def _dl(row) -> DocLosses:
    return DocLosses(np.asarray(row["doc_nll"]), np.asarray(row["doc_tokens"], dtype=float))


def _add_alpha_cells(report: dict, measured: list[dict], offsets) -> None:
    """Per offset d: the measured best α on the α grid (α = 0 is SMA K) next to the theory's α*."""
    K = report["extra"]["window"]
    sma = next((m for m in measured if m["name"] == f"SMA K={K}"), None)
    for d in offsets:
        grid = [
            (m["alpha"], m["delta"], m["se"])
            for m in measured
            if m.get("offset") == d and m["group"] == "extra" and m["kind"] == "plain"
        ]
        if sma is not None:
            grid.append((0.0, sma["delta"], sma["se"]))
        if not grid:
            continue
        a, delta, se = min(grid, key=lambda g: g[1])
        cell = report["extra"]["by_offset"][str(d)]
        cell["measured_best_alpha"] = a
        cell["measured_best_delta"] = delta
        cell["measured_best_se"] = se
        cell["measured_sign"] = sign_class(a)
        cell["sign_match"] = cell["sign"] == sign_class(a) if cell["identified"] else None
