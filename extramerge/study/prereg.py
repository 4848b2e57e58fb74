"""Pre-registration: the study's predictions written before the measurement half is read, measured later.

    extramerge study RUN --calib calib.jsonl --predict-only -o PRED     # PRED/predictions.json
    extramerge study --measure PRED --test test.jsonl -o OUT            # OUT/study.json, as a full study

``--predict-only`` takes the calibration half only (no ``--data``, no ``--test``), so the measurement half is
never opened. ``predictions.json`` is the study's report without its measurement plus ``to_measure`` (every
merge the measurement will measure, with its predicted ΔL and 90% intervals) and ``preregistration``, which
binds the predictions to what they were made from: each checkpoint's SHA-256 over its tensors as read, the
tokenizer's fingerprint, the calibration documents (one SHA-256 each), the study's knobs, the package
version and a hash of the package's source. ``--measure`` refuses other checkpoints or another tokenizer,
and a measurement half that is mostly the calibration half (repeated documents are counted); it records the
SHA-256 of the predictions file it measured and whether the code that measured is the code that predicted.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path

from .inputs import StudyError

__all__ = ["FORMAT", "FILE", "record", "load", "check_documents", "check_inputs", "measured_record"]

FORMAT = "extramerge-predictions/1"
FILE = "predictions.json"
_LIMIT = 256 * 2**20  # bytes of a predictions.json read at most


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _doc_hashes(docs: list[str]) -> list[str]:
    return [hashlib.sha256(d.encode("utf-8")).hexdigest()[:16] for d in docs]


def _all_docs(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


def code_fingerprint() -> str:
    """SHA-256 over the source of the installed ``rivervalley`` and ``extramerge`` (path and bytes of every
    ``.py``): equal fingerprints, the same code."""
    import extramerge
    import rivervalley

    h = hashlib.sha256()
    for pkg in (rivervalley, extramerge):
        root = Path(pkg.__file__).parent
        for f in sorted(root.rglob("*.py")):
            h.update(f.relative_to(root.parent).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("rivervalley-extramerge", "torch", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def record(cfg, ev, ckpts, tok, calib_docs) -> dict:
    """The ``preregistration`` block of predictions.json."""
    from ..eval import tokenizer_fingerprint

    return {
        "format": FORMAT,
        "predicted_utc": _now(),
        "versions": _versions(),
        "code": code_fingerprint(),
        "config": {
            "window": cfg.window,
            "offsets": list(cfg.offsets),
            "alphas": list(cfg.alphas),
            "sma_windows": list(cfg.sma_windows),
            "trend_windows": list(cfg.trend_windows),
            "ema_decays": list(cfg.ema_decays),
            "forecast_from": cfg.forecast_from,
            "lr_schedule": cfg.lr_schedule,
            "batch_size": cfg.batch_size,
        },
        "checkpoints": [
            {"path": str(c.path), "step": int(c.step), "sha256": d}
            for c, d in zip(ckpts, ev.digests, strict=True)
        ],
        "tokenizer": {"path": str(tok), "fingerprint": tokenizer_fingerprint(tok)},
        "calib": {
            "path": str(cfg.calib),
            "documents": len(calib_docs),
            "sha256": _all_docs(calib_docs),
            "doc_sha256": _doc_hashes(calib_docs),
        },
    }


def load(path) -> tuple[dict, str]:
    """(the predictions, the SHA-256 of the file's bytes) from ``PRED`` or ``PRED/predictions.json``;
    StudyError naming the file and the field at fault for anything malformed."""
    from ..io import safety

    p = Path(path)
    root = p if p.is_dir() else p.parent
    f = p / FILE if p.is_dir() else p
    try:
        fd = safety.open_regular(f, root=root)
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read(_LIMIT + 1)
        if len(raw) > _LIMIT:
            raise StudyError(f"--measure {f}: larger than {_LIMIT} bytes; refusing to parse it")
        pred = safety.parse_json(raw, str(f))
    except (OSError, ValueError) as e:
        raise StudyError(f"--measure {e}" if str(f) in str(e) else f"--measure {f}: {e}") from None
    _validate(pred, f)
    return pred, hashlib.sha256(raw).hexdigest()


def _fail(f, what: str):
    raise StudyError(f"--measure {f}: {what}; not a predictions file this version can measure")


def _num(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _interval(x) -> bool:
    return x is None or (isinstance(x, list) and len(x) == 2 and all(map(_num, x)) and x[0] <= x[1])


def _weights(x, n: int) -> bool:
    return isinstance(x, list) and len(x) == n and all(map(_num, x)) and abs(sum(x) - 1.0) < 1e-6


def _validate(pred, f) -> None:
    """Every field the measurement reads, checked before anything is loaded."""
    if not isinstance(pred, dict):
        _fail(f, "not a JSON object")
    reg = pred.get("preregistration")
    if not isinstance(reg, dict) or reg.get("format") != FORMAT:
        _fail(f, f"preregistration.format is not {FORMAT!r}")
    ck = pred.get("checkpoints")
    if not isinstance(ck, dict) or not isinstance(ck.get("n"), int) or isinstance(ck.get("n"), bool):
        _fail(f, "checkpoints.n is missing")
    n = ck["n"]
    if not 2 <= n <= 100_000:
        _fail(f, f"checkpoints.n = {n}")
    for key in ("paths", "steps"):
        v = ck.get(key)
        if not isinstance(v, list) or len(v) != n:
            _fail(f, f"checkpoints.{key} does not list {n} entries")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in ck["steps"]):
        _fail(f, "checkpoints.steps are not integers")
    if not all(isinstance(s, str) for s in ck["paths"]):
        _fail(f, "checkpoints.paths are not strings")
    regs = reg.get("checkpoints")
    if (
        not isinstance(regs, list)
        or len(regs) != n
        or not all(
            isinstance(r, dict) and isinstance(r.get("sha256"), str) and r.get("step") == s
            for r, s in zip(regs, ck["steps"], strict=True)
        )
    ):
        _fail(f, "preregistration.checkpoints do not match checkpoints.steps")
    tk, cal = reg.get("tokenizer"), reg.get("calib")
    if not isinstance(tk, dict) or not isinstance(tk.get("path"), str):
        _fail(f, "preregistration.tokenizer.path is missing")
    if not isinstance(cal, dict) or not isinstance(cal.get("doc_sha256"), list):
        _fail(f, "preregistration.calib.doc_sha256 is missing")
    rows = pred.get("to_measure")
    if not isinstance(rows, list) or not rows:
        _fail(f, "to_measure is empty")
    names = set()
    for i, r in enumerate(rows):
        _row(r, n, f"to_measure[{i}]", f)
        if r["name"] in names:
            _fail(f, f"to_measure[{i}].name {r['name']!r} appears twice")
        names.add(r["name"])
    pb = pred.get("plain_best")
    if not isinstance(pb, dict) or not isinstance(pb.get("name"), str) or not _weights(pb.get("weights"), n):
        _fail(f, "plain_best.name/weights are missing or malformed")
    tb = pred.get("theory_best")
    if tb is not None and tb not in names:
        _fail(f, "theory_best names no merge of to_measure")
    gate = pred.get("theory_gate")
    if not isinstance(gate, dict) or not isinstance(gate.get("why_closed"), list):
        _fail(f, "theory_gate.why_closed is missing")
    ex = pred.get("extra")
    if not (
        isinstance(ex, dict)
        and isinstance(ex.get("window"), int)
        and isinstance(ex.get("offsets"), list)
        and isinstance(ex.get("by_offset"), dict)
        and all(
            isinstance(ex["by_offset"].get(str(d)), dict)
            and {"sign", "identified"} <= set(ex["by_offset"][str(d)])
            for d in ex["offsets"]
        )
    ):
        _fail(f, "extra.window/offsets/by_offset are missing or malformed")
    fc = pred.get("forecast")
    if fc is not None and not (isinstance(fc, dict) and _weights(fc.get("weights"), n)):
        _fail(f, "forecast.weights are malformed")
    if fc is not None and not any(_close(r["weights"], fc["weights"]) for r in rows):
        _fail(f, "the forecast's merge is not among to_measure")
    for key in ("data", "recommendation", "fit", "theory_pick", "calibration"):
        if not isinstance(pred.get(key), dict):
            _fail(f, f"{key} is missing")
    if not isinstance(pred.get("candidates"), list):
        _fail(f, "candidates is missing")
    if not (_num(pred.get("seconds")) and isinstance(pred.get("evaluations"), int)):
        _fail(f, "seconds/evaluations are missing")


def _close(a, b) -> bool:
    return all(abs(x - y) <= 1e-12 for x, y in zip(a, b, strict=True))


def _row(r, n: int, where: str, f) -> None:
    if not isinstance(r, dict):
        _fail(f, f"{where} is not an object")
    kind_ok = r.get("kind") in ("plain", "theory")
    if not all(isinstance(r.get(k), str) for k in ("name", "group")) or not kind_ok:
        _fail(f, f"{where}.name/group/kind are missing or malformed")
    if not _weights(r.get("weights"), n):
        _fail(f, f"{where}.weights are not {n} finite numbers summing to 1")
    if ("alpha" in r) and not (_num(r["alpha"]) and isinstance(r.get("offset"), int)):
        _fail(f, f"{where}.alpha/offset are malformed")
    p = r.get("predicted")
    if not isinstance(p, dict) or not isinstance(p.get("model"), dict):
        _fail(f, f"{where}.predicted is missing")
    for block, label in ((p, "predicted"), (p["model"], "predicted.model")):
        for k in ("delta", "vs_plain"):
            if block.get(k) is not None and not _num(block.get(k)):
                _fail(f, f"{where}.{label}.{k} is not a number")
        for k in ("interval", "vs_plain_interval"):
            if not _interval(block.get(k)):
                _fail(f, f"{where}.{label}.{k} is not null or [lo, hi]")


def check_documents(pred: dict, test_docs: list[str], cfg) -> int:
    """How many measurement documents also appear in the calibration half the predictions used (a corpus
    with repeated documents has a few; they are counted in study.json); StudyError when more than half do
    (the calibration file given as --test)."""
    calib = set(pred["preregistration"]["calib"]["doc_sha256"])
    shared = sum(1 for h in _doc_hashes(test_docs) if h in calib)
    if 2 * shared > len(test_docs):
        raise StudyError(
            f"--test {cfg.test}: {shared} of its {len(test_docs)} documents are in the calibration half the "
            "predictions were made from; the measurement half must be other documents"
        )
    return shared


def check_inputs(pred: dict, cfg, ev, ckpts, tok) -> None:
    """The checkpoints (tensors as read) and the tokenizer are the ones the predictions were made from."""
    from ..eval import tokenizer_fingerprint

    reg = pred["preregistration"]
    steps = [int(c.step) for c in ckpts]
    if steps != pred["checkpoints"]["steps"]:
        raise StudyError(
            f"--measure {cfg.measure}: the predictions were made from checkpoints at steps "
            f"{pred['checkpoints']['steps']}, these are at {steps}"
        )
    for c, r, d in zip(ckpts, reg["checkpoints"], ev.digests, strict=True):
        if d != r["sha256"]:
            raise StudyError(
                f"{c.path}: its tensors differ from those of {r['path']} that the predictions in "
                f"{cfg.measure} were made from (SHA-256 {d[:12]} ≠ {str(r['sha256'])[:12]})"
            )
    fp = tokenizer_fingerprint(tok)
    if fp != reg["tokenizer"].get("fingerprint"):
        raise StudyError(
            f"{tok}: not the tokenizer the predictions in {cfg.measure} were made with "
            f"({reg['tokenizer']['path']})"
        )


def measured_record(cfg, digest: str, pred: dict, test_docs: list[str], shared: int) -> dict:
    """What ``--measure`` adds to the ``preregistration`` block."""
    code = code_fingerprint()
    return {
        "predictions": {"path": str(cfg.measure), "sha256": digest},
        "measured_utc": _now(),
        "test": {
            "path": str(cfg.test),
            "documents": len(test_docs),
            "sha256": _all_docs(test_docs),
            "shared_with_calib": shared,
        },
        "code_at_measure": code,
        "same_code": code == pred["preregistration"].get("code"),
    }
