"""The study: which merge of a run's checkpoints to ship, its predicted gain, and the gain measured.

1. Held-out text is split by document into a *calibration* half and a *measurement* half.
2. On the calibration half (:mod:`.choose`): the loss of every calibration merge
   (``rivervalley.estimate.calibration_weights``: checkpoints, pair averages and windows, all inside the
   data) fits the river-valley model with the learning rate at each checkpoint (:mod:`.theory`); every
   candidate of the menu (:mod:`.menu`: the plain ones, and the theory's own where its gate lets them
   through) is evaluated and the lowest calibration ΔL is *recommended*, with the theory's prediction
   relative to the best plain merge and its 90% interval, or "not identified".
3. Optionally (:mod:`.forecast`) the same decision from the checkpoints up to a step only.
4. On the measurement half (skipped by ``quick``): every candidate, α = 3, the theory's diagnostics; ΔL
   relative to the newest checkpoint and to the best plain merge, paired standard errors clustered by
   document, and the ablation ``theory_vs_plain``: the theory's best offered merge minus the best plain one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rivervalley import estimate as est

from .choose import Choice, choose, predict_candidate
from .evaluator import Evaluator, paired_delta
from .forecast import forecast, prefix_size
from .inputs import (
    StudyError,
    check_half,
    load_documents,
    read_checkpoints,
    read_lr_schedule,
    split_documents,
    tokenizer_of,
)
from .menu import extra
from .theory import sign_class

__all__ = ["StudyConfig", "run_study", "CANDIDATE_ALPHAS"]

CANDIDATE_ALPHAS = (-0.5, -0.25, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


@dataclass
class StudyConfig:
    checkpoints: list
    out: Path
    data: list = field(default_factory=list)  # text split into the two halves
    calib: str | None = None  # or the two halves given
    test: str | None = None
    tokenizer: str | None = None
    lr_schedule: str | None = None
    run: Path | None = None  # a run folder: its log.jsonl / run.json give the lr by default
    window: int = 4  # K of Extra-Merge
    offsets: tuple = (2, 4, 8)
    alphas: tuple = CANDIDATE_ALPHAS
    sma_windows: tuple = (2, 4, 8)  # SMA and WMA (and every checkpoint)
    trend_windows: tuple = (4, 8)  # the least-squares trend (and every checkpoint)
    ema_decays: tuple = (0.5, 0.8, 0.9)
    quick: bool = False
    forecast_from: int | None = None  # a step: also choose from the checkpoints up to it only
    device: str = "cpu"
    batch_size: int = 16
    threads: int | None = None
    force: bool = False
    progress: bool = True


# ---------------------------------------------------------------------------------------------- study


def run_study(cfg: StudyConfig, tmp: Path) -> dict:
    """Run the study; figures go under ``tmp``; returns the report (the caller writes and publishes)."""
    t0 = time.perf_counter()
    ckpts, infos = read_checkpoints(cfg.checkpoints)
    try:
        return _study(cfg, ckpts, list(infos), tmp, t0)
    finally:
        for c in ckpts:
            c.close()


def _halves(cfg: StudyConfig) -> tuple[list[str], list[str], dict]:
    if cfg.calib or cfg.test:
        if not (cfg.calib and cfg.test) or cfg.data:
            raise StudyError("give --data TEXT, or both --calib FILE and --test FILE")
        calib, test = load_documents([cfg.calib]), load_documents([cfg.test])
        check_half(calib, f"--calib {cfg.calib}")
        check_half(test, f"--test {cfg.test}")
        return calib, test, {"calib": str(cfg.calib), "test": str(cfg.test)}
    if not cfg.data:
        raise StudyError("no held-out text: give --data TEXT (or --calib FILE --test FILE)")
    docs = load_documents(cfg.data)
    calib, test = split_documents(docs, ", ".join(map(str, cfg.data)))
    return (
        calib,
        test,
        {"data": [str(p) for p in cfg.data], "split": "by SHA-256 of each document, alternately"},
    )


def _grid_of(lr):
    def grid(steps) -> est.Grid:
        try:
            return est.Grid.from_schedule(steps, lr) if lr is not None else _steps_grid(steps)
        except ValueError as e:
            raise StudyError(f"--lr-schedule: {e}") from None

    return grid


def _study(cfg: StudyConfig, ckpts, names, tmp: Path, t0: float) -> dict:
    n = len(ckpts)
    steps = [int(c.step) for c in ckpts]
    calib_docs, test_docs, source = _halves(cfg)
    tok = tokenizer_of(ckpts, cfg.tokenizer)
    lr = read_lr_schedule(cfg.lr_schedule, steps, cfg.run)
    grid_of = _grid_of(lr)
    grid = grid_of(steps)
    if cfg.forecast_from is not None:
        grid_of(steps[: prefix_size(steps, cfg)])  # a bad --forecast-from fails before any evaluation

    if cfg.threads and not str(cfg.device).startswith("cuda"):
        import torch

        torch.set_num_threads(cfg.threads)
    ev = Evaluator(ckpts, names, tok, device=cfg.device, batch_size=cfg.batch_size)
    ev.add_half("calib", calib_docs)
    ev.add_half("test", test_docs)
    bar = _Bar(cfg.progress)
    fc_block = fc_merge = None
    try:
        ch = choose(ev, grid, n, cfg, bar)
        if cfg.forecast_from is not None:
            fc_block, fc_merge = forecast(ev, steps, grid_of, cfg, bar)
        measured, tvp = [], None
        if not cfg.quick:
            measured, tvp = _measure(ev, ch, cfg, len(test_docs), fc_merge, bar)
    finally:
        bar.close()
    if fc_block is not None and measured:
        _score_forecast(fc_block, fc_merge, measured)

    rec, pick = ch.recommendation, ch.theory_pick["candidate"]
    report = {
        "mode": "quick" if cfg.quick else "full",
        "checkpoints": {"n": n, "steps": steps, "paths": [str(c.path) for c in ckpts]},
        "data": {
            **source,
            "calib": {
                "documents": len(calib_docs),
                "tokens": ev.tokens("calib"),
                "doc_tokens": ev.doc_tokens("calib"),
            },
            "test": {
                "documents": len(test_docs),
                "tokens": ev.tokens("test"),
                "doc_tokens": ev.doc_tokens("test"),
            },
        },
        "lr": {"given": lr is not None, "area": grid.area.tolist(), "lr_ratio": grid.lr_ratio.tolist()},
        "recommendation": _recommendation(rec, ch),
        "plain_best": {
            "name": ch.plain_best["name"],
            "calib_delta": ch.plain_best["calib_delta"],
            "calib_se": ch.plain_best["calib_se"],
        },
        "theory_pick": {
            "name": pick["name"],
            "kind": pick["kind"],
            "weights": _floats(pick["weights"]),
            "predicted_delta": pick["predicted"]["delta"] if ch.theory_pick["offered"] else None,
            "offered": ch.theory_pick["offered"],
            "why_not": ch.theory_pick["why"],
        },
        "theory_gate": {"open": not ch.gate, "why_closed": ch.gate},
        "theory_vs_plain": tvp,
        "fit": {**ch.fit.to_dict(), "trusted": ch.trusted, "problems": ch.problems},
        "extra": {
            "window": cfg.window,
            "offsets": ch.offsets,
            "by_offset": {str(d): th for d, th in ch.theory.items()},
        },
        "calibration": {"losses": ch.cal_losses, **ch.cal_detail},
        "candidates": [_candidate(c) for c in ch.menu],
        "measured": measured,
        "forecast": fc_block,
        "evaluations": ev.calls,
    }
    if measured:
        _add_alpha_cells(report, measured, ch.offsets)
    report["seconds"] = time.perf_counter() - t0
    return report


def _measure(ev, ch: Choice, cfg, n_docs: int, fc_merge, bar) -> tuple[list[dict], dict]:
    """Every candidate, α = 3 and the diagnostics on the measurement half: ΔL against the newest
    checkpoint and against the best plain calibration merge, and the theory-versus-plain ablation."""
    n, K = ch.n, cfg.window
    extra3 = [extra(n, K, d, 3.0) for d in ch.offsets]
    for c in extra3:
        c["predicted"] = predict_candidate(ch, c)
    rows = ch.menu + extra3 + ch.diag
    if fc_merge is not None and not any(np.array_equal(fc_merge["weights"], c["weights"]) for c in rows):
        fc_merge = {**fc_merge, "name": f"forecast: {fc_merge['name']}", "group": "forecast"}
        fc_merge["predicted"] = predict_candidate(ch, fc_merge)
        rows = rows + [fc_merge]
    base = ev.measure(np.eye(n)[-1], "test")
    plain = ev.measure(ch.plain_best["weights"], "test")
    tokens = [int(x) for x in base.tokens]
    out, dls = [], {}
    for c in rows:
        dl = ev.measure(c["weights"], "test")
        dls[c["name"]] = dl
        out.append(_measured_row(c, dl, base, plain, ch.trusted, n_docs, tokens))
        bar()
    tb = ch.theory_best
    if tb is None:
        why = ch.gate or ["no theory merge passed the gate (see candidates[].not_offered_because)"]
        tvp = {"delta": None, "se": None, "theory": None, "plain": ch.plain_best["name"], "why": why}
    else:
        d, se = paired_delta(dls[tb["name"]], plain)
        tvp = {"delta": d, "se": se, "theory": tb["name"], "plain": ch.plain_best["name"], "why": []}
    return out, tvp


def _steps_grid(steps) -> est.Grid:
    """No learning rate given: constant, so the area is proportional to the steps."""
    s = np.asarray(steps, float)
    return est.Grid((s - s[0]) / (s[-1] - s[0]) * (s.size - 1), np.ones(s.size))


def _recommendation(c: dict, ch: Choice) -> dict:
    p = c["predicted"]
    knobs = {k: c[k] for k in ("window", "offset", "alpha", "decay", "ahead") if k in c}
    return {
        "name": c["name"],
        "kind": c["kind"],
        "method": c["method"],
        "knobs": knobs,
        "weights": _floats(c["weights"]),
        "alpha": c.get("alpha", 0.0 if c["method"] == "sma" else None),
        "offset": c.get("offset"),
        "predicted_delta": p["delta"],
        "predicted_interval": p["interval"],
        "predicted_vs_plain": p["vs_plain"],
        "predicted_vs_plain_interval": p["vs_plain_interval"],
        "identified": p["interval"] is not None,
        "prediction_source": p.get("source"),
        "model_predicted_delta": p["model"]["delta"],
        "model_predicted_interval": p["model"]["interval"],
        "calib_delta": c["calib_delta"],
        "calib_se": c["calib_se"],
        "selected_by": "lowest loss on the calibration half (plain and offered theory merges)",
        "skipped": ch.skipped,
    }


def _candidate(c: dict) -> dict:
    p = c["predicted"]
    out = {
        "name": c["name"],
        "kind": c["kind"],
        "weights": _floats(c["weights"]),
        "calib_delta": c.get("calib_delta"),
        "calib_se": c.get("calib_se"),
        "predicted_delta": p["delta"],
        "predicted_interval": p["interval"],
        "predicted_vs_plain": p["vs_plain"],
        "predicted_vs_plain_interval": p["vs_plain_interval"],
        "prediction_source": p.get("source"),
        "model_predicted_delta": p["model"]["delta"],
        "model_predicted_interval": p["model"]["interval"],
    }
    if c["kind"] == "theory":
        out["offered"] = c.get("offered", False)
        out["not_offered_because"] = c.get("not_offered_because", [])
    return out


def _covered(interval, delta: float, se: float, z: float) -> bool | None:
    """Whether the measured value lies in the predicted interval widened by the measurement's own 90%
    half-width (the interval is for the expected gain); None for a not-identified interval."""
    if interval is None or not math.isfinite(se):
        return None
    lo, hi = interval
    return bool(abs(delta - 0.5 * (hi + lo)) <= math.hypot(0.5 * (hi - lo), z * se))


def _measured_row(c: dict, dl, base, plain, trusted: bool, n_docs: int, tokens) -> dict:
    from scipy import stats

    delta, se = paired_delta(dl, base)
    d_p, se_p = paired_delta(dl, plain)
    z = float(stats.t.ppf(0.95, max(n_docs - 1, 1)))  # Student t, documents − 1 degrees of freedom
    p = c["predicted"]
    row = {
        "name": c["name"],
        "group": c.get("group", c["method"]),
        "kind": c["kind"],
        "weights": _floats(c["weights"]),
        "delta": delta,
        "se": se,
        "predicted": p["delta"],  # a calibration measurement needs no fit; the model's is None untrusted
        "predicted_interval": p["interval"],
        "delta_vs_plain": d_p,
        "se_vs_plain": se_p,
        "predicted_vs_plain": p["vs_plain"],
        "predicted_vs_plain_interval": p["vs_plain_interval"],
    }
    if "alpha" in c and c["method"] == "extra":
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


def _score_forecast(block: dict, merge: dict, measured: list[dict]) -> None:
    """The forecast's merge measured at the newest checkpoint, and its gap to the measured best."""
    row = next(m for m in measured if np.allclose(m["weights"], merge["weights"], atol=1e-12))
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


def _dl(row):
    from .evaluator import DocLosses

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


def _floats(w) -> list[float]:
    return [float(x) for x in np.asarray(w, dtype=float)]


class _Bar:
    """Evaluations done: in place on a terminal, a line at most every 30 s in a log (progress_bar)."""

    def __init__(self, enabled: bool):
        from rivervalley.common.progress import progress_bar

        self._t = progress_bar(enabled=enabled, desc="study", leave=False, unit="eval")

    def __call__(self):
        self._t.update()

    def close(self):
        self._t.close()
