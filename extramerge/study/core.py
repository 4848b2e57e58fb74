"""The study: which merge of a run's checkpoints to ship, its predicted gain, and the gain measured.

1. Held-out text is split by document into a *calibration* half and a *measurement* half.
2. On the calibration half (:mod:`.choose`): the loss of every calibration merge
   (``rivervalley.estimate.calibration_weights``: checkpoints, pair averages and windows, all inside the
   data) fits the river-valley model with the learning rate at each checkpoint (:mod:`.theory`); every
   candidate of the menu (:mod:`.menu`: the plain ones, and the theory's own where its gate lets them
   through) is evaluated and the lowest calibration ΔL is *recommended*, with the theory's prediction
   relative to the best plain merge and its 90% interval, or "not identified".
3. Optionally (:mod:`.forecast`) the same decision from the checkpoints up to a step only.
4. On the measurement half (:mod:`.measure`; skipped by ``quick``): every candidate, α = 3, the theory's
   diagnostics; ΔL relative to the newest checkpoint and to the best plain merge, paired standard errors
   clustered by document, and the ablation ``theory_vs_plain``: the theory's best offered merge minus the
   best plain one.

Steps 2–3 produce the *predictions* (:func:`predict`, JSON-shaped), and step 4 reads nothing else, so a study
can be pre-registered: ``--predict-only`` writes them without the measurement half ever being read
(:mod:`.prereg`), and ``--measure PRED --test FILE`` measures exactly those merges later.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rivervalley import estimate as est
from rivervalley.common.formatting import jsonable

from . import prereg
from .choose import Choice, choose, predict_candidate
from .evaluator import Evaluator
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
from .measure import measure
from .menu import extra
from .models import ModelSource

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
    device: str = "cpu"  # under torchrun "cuda" is each rank's cuda:LOCAL_RANK
    dtype: str = "fp32"  # or "bf16": forwards under bf16 autocast, the loss in float32
    batch_size: int = 16
    threads: int | None = None
    force: bool = False
    progress: bool = True
    stream: bool | None = None  # None: stacked in memory when it fits in half of it, else streamed
    dry_run: bool = False  # check the inputs and print the memory plan; evaluate and write nothing
    predict_only: bool = False  # write the predictions only: the measurement half is never read
    measure: Path | None = None  # a predictions folder (or its predictions.json) to measure
    model_config: str | None = None  # an HF config folder building the model (checkpoints in HF names)
    model_factory: str | None = None  # module:function building the model from the newest checkpoint

    @property
    def model(self) -> ModelSource:
        return ModelSource(config=self.model_config, factory=self.model_factory)


# ---------------------------------------------------------------------------------------------- study


def run_study(cfg: StudyConfig, tmp: Path) -> dict:
    """Run the study (or its predictions only, or the measurement of earlier predictions); figures go
    under ``tmp``; returns the report (the caller writes and publishes)."""
    t0 = time.perf_counter()
    if cfg.measure is not None:
        return _measure_later(cfg, t0)
    ckpts, infos = read_checkpoints(cfg.checkpoints, any_format=cfg.model.given)
    try:
        return _study(cfg, ckpts, list(infos), t0)
    finally:
        for c in ckpts:
            c.close()


def _halves(cfg: StudyConfig) -> tuple[list[str], list[str] | None, dict]:
    """(calibration documents, measurement documents or None with --predict-only, where they came from)."""
    if cfg.predict_only:
        if cfg.data or cfg.test or not cfg.calib:
            raise StudyError(
                "--predict-only reads the calibration half only: give --calib FILE (not --data or --test); "
                "the measurement half is given later, to --measure"
            )
        calib = load_documents([cfg.calib])
        check_half(calib, f"--calib {cfg.calib}")
        return calib, None, {"files": {"calib": str(cfg.calib)}}
    if cfg.calib or cfg.test:
        if not (cfg.calib and cfg.test) or cfg.data:
            raise StudyError("give --data TEXT, or both --calib FILE and --test FILE")
        calib, test = load_documents([cfg.calib]), load_documents([cfg.test])
        check_half(calib, f"--calib {cfg.calib}")
        check_half(test, f"--test {cfg.test}")
        return calib, test, {"files": {"calib": str(cfg.calib), "test": str(cfg.test)}}
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


def _threads(cfg: StudyConfig) -> None:
    """--threads, or under torchrun this machine's cores shared among its ranks (CPU only)."""
    from .. import distributed

    if str(cfg.device).startswith("cuda"):
        return
    group = distributed.current()
    n = cfg.threads or (distributed.workers_per_rank(1 << 16, group) if group is not None else None)
    if n:
        import torch

        torch.set_num_threads(n)


def _rank_device(device: str) -> str:
    """``cuda`` under torchrun: this rank's own GPU (cuda:LOCAL_RANK); any other device as given."""
    import os

    from .. import distributed

    if distributed.current() is None or device != "cuda":
        return device
    import torch

    local = int(os.environ.get("LOCAL_RANK", distributed.current().rank))
    if local >= torch.cuda.device_count():
        raise StudyError(
            f"--device cuda: rank {distributed.current().rank} would use cuda:{local}, but this machine "
            f"has {torch.cuda.device_count()} GPU(s) (start at most that many processes per node)"
        )
    return f"cuda:{local}"


def _evaluator(cfg: StudyConfig, ckpts, names, tok, *, digests: bool) -> Evaluator:
    """The evaluator, built on every rank together (a failure on one stops them all)."""
    from .. import distributed

    with distributed.agreed():
        return Evaluator(
            ckpts,
            names,
            tok,
            device=_rank_device(cfg.device),
            batch_size=cfg.batch_size,
            digests=digests,
            stream=cfg.stream,
            model=cfg.model,
            dtype=cfg.dtype,
        )


def _timing(ev: Evaluator) -> dict:
    """Where the evaluations' time went (this process's clock; under torchrun rank 0's): building the
    merges (reading and summing the checkpoints into the model) and the forwards, tokens/s of the latter
    over every rank."""
    from .. import distributed

    t = dict(ev.timing)
    group = distributed.current()
    t["ranks"] = 1 if group is None else group.world
    t["device"] = str(ev.device)
    t["dtype"] = ev.dtype
    fwd = t["forward_seconds"]
    t["tokens_per_s"] = t["tokens"] / fwd if fwd > 0 else None
    return t


def dry_run(cfg: StudyConfig) -> dict:
    """Open the checkpoints and the text, and say how the study would hold them and the memory it needs."""
    from .evaluator import plan
    from .models import model_dims

    ckpts, infos = read_checkpoints(cfg.checkpoints, any_format=cfg.model.given)
    try:
        if cfg.measure is None:
            _halves(cfg)
        steps = [int(c.step) for c in ckpts]
        if cfg.forecast_from is not None:
            prefix_size(steps, cfg)
        return {
            "dry_run": True,
            "steps": steps,
            "plan": plan(ckpts, list(infos), cfg.device, cfg.stream, model_dims(ckpts[-1], cfg.model)),
        }
    finally:
        for c in ckpts:
            c.close()


def _study(cfg: StudyConfig, ckpts, names, t0: float) -> dict:
    steps = [int(c.step) for c in ckpts]
    calib_docs, test_docs, source = _halves(cfg)
    tok = tokenizer_of(ckpts, cfg.tokenizer)
    lr = read_lr_schedule(cfg.lr_schedule, steps, cfg.run)
    grid_of = _grid_of(lr)
    grid = grid_of(steps)
    if cfg.forecast_from is not None:
        grid_of(steps[: prefix_size(steps, cfg)])  # a bad --forecast-from fails before any evaluation
    _threads(cfg)
    ev = _evaluator(cfg, ckpts, names, tok, digests=cfg.predict_only)
    ev.add_half("calib", calib_docs)
    if test_docs is not None:
        ev.add_half("test", test_docs)
    bar = _Bar(cfg.progress)
    try:
        pred = jsonable(predict(cfg, ev, ckpts, grid, grid_of, steps, source, lr is not None, bar))
        if cfg.predict_only:
            pred["preregistration"] = prereg.record(cfg, ev, ckpts, tok, calib_docs)
            rep = pred
        elif cfg.quick:
            rep = {k: v for k, v in pred.items() if k != "to_measure"}
            rep.update(measured=[], theory_vs_plain=None)
            rep["data"]["test"] = _half_stats(ev, "test")
        else:
            rep = measure(pred, ev, bar)
            rep["data"]["test"] = _half_stats(ev, "test")
    finally:
        bar.close()
    rep["evaluations"] = ev.calls
    rep["memory"] = ev.plan
    rep["timing"] = _timing(ev)
    rep["seconds"] = time.perf_counter() - t0
    return rep


def _measure_later(cfg: StudyConfig, t0: float) -> dict:
    """``--measure PRED --test FILE``: every merge PRED predicted, measured on the measurement half, after
    checking that the checkpoints and the tokenizer are the ones the predictions were made from."""
    if cfg.data or cfg.calib or not cfg.test or cfg.predict_only:
        raise StudyError(
            "--measure PRED takes --test FILE (the measurement half), not --data, --calib or --predict-only"
        )
    pred, digest = prereg.load(cfg.measure)
    paths = cfg.checkpoints or pred["checkpoints"]["paths"]
    ckpts, infos = read_checkpoints(paths, any_format=cfg.model.given)
    try:
        test_docs = load_documents([cfg.test])
        check_half(test_docs, f"--test {cfg.test}")
        shared = prereg.check_documents(pred, test_docs, cfg)
        tok = tokenizer_of(ckpts, cfg.tokenizer or pred["preregistration"]["tokenizer"]["path"])
        _threads(cfg)
        ev = _evaluator(cfg, ckpts, list(infos), tok, digests=True)
        prereg.check_inputs(pred, cfg, ev, ckpts, tok)
        ev.add_half("test", test_docs)
        bar = _Bar(cfg.progress)
        try:
            rep = measure(pred, ev, bar)
        finally:
            bar.close()
    finally:
        for c in ckpts:
            c.close()
    rep["data"] = {**rep["data"], "files": {**rep["data"].get("files", {}), "test": str(cfg.test)}}
    rep["data"]["test"] = _half_stats(ev, "test")
    rep["mode"] = "full"  # as if run in one go; the preregistration block says it was not
    rep["preregistration"] = {
        **pred["preregistration"],
        **prereg.measured_record(cfg, digest, pred, test_docs, shared),
    }
    rep["evaluations"] = pred["evaluations"] + ev.calls
    rep["memory"] = ev.plan
    rep["timing"] = _timing(ev)
    rep["seconds"] = pred["seconds"] + time.perf_counter() - t0
    return rep


def predict(cfg: StudyConfig, ev, ckpts, grid, grid_of, steps, source: dict, lr_given: bool, bar) -> dict:
    """Everything decided from the calibration half: the report without its measurement, and
    ``to_measure``: each merge the measurement half will measure with its prediction."""
    n = len(ckpts)
    ch = choose(ev, grid, n, cfg, bar)
    fc_block = fc_merge = None
    if cfg.forecast_from is not None:
        fc_block, fc_merge = forecast(ev, steps, grid_of, cfg, bar)
    extra3 = [extra(n, cfg.window, d, 3.0) for d in ch.offsets]
    for c in extra3:
        c["predicted"] = predict_candidate(ch, c)
    rows = ch.menu + extra3 + ch.diag
    if fc_merge is not None and not any(np.array_equal(fc_merge["weights"], c["weights"]) for c in rows):
        fc_merge = {**fc_merge, "name": f"forecast: {fc_merge['name']}", "group": "forecast"}
        fc_merge["predicted"] = predict_candidate(ch, fc_merge)
        rows = rows + [fc_merge]
    rec, pick = ch.recommendation, ch.theory_pick["candidate"]
    return {
        "mode": "predict-only" if cfg.predict_only else ("quick" if cfg.quick else "full"),
        "checkpoints": {"n": n, "steps": steps, "paths": [str(c.path) for c in ckpts]},
        "data": {**source, "calib": _half_stats(ev, "calib")},
        "lr": {"given": lr_given, "area": grid.area.tolist(), "lr_ratio": grid.lr_ratio.tolist()},
        "recommendation": _recommendation(rec, ch),
        "plain_best": {
            "name": ch.plain_best["name"],
            "calib_delta": ch.plain_best["calib_delta"],
            "calib_se": ch.plain_best["calib_se"],
            "weights": _floats(ch.plain_best["weights"]),
        },
        "theory_best": ch.theory_best["name"] if ch.theory_best is not None else None,
        "theory_pick": {
            "name": pick["name"],
            "kind": pick["kind"],
            "weights": _floats(pick["weights"]),
            "predicted_delta": pick["predicted"]["delta"] if ch.theory_pick["offered"] else None,
            "offered": ch.theory_pick["offered"],
            "why_not": ch.theory_pick["why"],
        },
        "theory_gate": {"open": not ch.gate, "why_closed": ch.gate},
        "fit": {**ch.fit.to_dict(), "trusted": ch.trusted, "problems": ch.problems},
        "extra": {
            "window": cfg.window,
            "offsets": ch.offsets,
            "by_offset": {str(d): th for d, th in ch.theory.items()},
        },
        "calibration": {"losses": ch.cal_losses, **ch.cal_detail},
        "candidates": [_candidate(c) for c in ch.menu],
        "forecast": fc_block,
        "to_measure": [_row(c) for c in rows],
    }


def _half_stats(ev, half: str) -> dict:
    doc_tokens = ev.doc_tokens(half)
    return {"documents": len(doc_tokens), "tokens": ev.tokens(half), "doc_tokens": doc_tokens}


def _row(c: dict) -> dict:
    """A merge to measure: what the measurement needs of it, and its prediction."""
    row = {
        "name": c["name"],
        "group": c.get("group", c["method"]),
        "kind": c["kind"],
        "weights": _floats(c["weights"]),
        "predicted": c["predicted"],
    }
    if c["method"] == "extra" and "alpha" in c:
        row["alpha"], row["offset"] = c["alpha"], c["offset"]
    if c["kind"] == "theory":
        row["offered"] = c.get("offered", False)
    return row


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
