"""The study's inputs: checkpoints, their tokenizer, held-out text split in two halves, and the learning rate.

Each reader checks what it is given and raises :class:`StudyError` with one line naming the file or flag.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import numpy as np

from ..io import safety

__all__ = [
    "StudyError",
    "read_checkpoints",
    "tokenizer_of",
    "load_documents",
    "split_documents",
    "read_lr_schedule",
    "MIN_DOCS",
    "MIN_BYTES",
]

MIN_DOCS = 4  # per half: a paired standard error clustered by document needs a few clusters
MIN_BYTES = 4096  # per half


class StudyError(ValueError):
    """Bad input to the study: one line naming the file, checkpoint or flag at fault."""


def read_checkpoints(paths, *, any_format: bool = False) -> tuple[list, dict]:
    """Open the checkpoints (folders, run folders, ``step_N``/``checkpoint-N`` parents, ``org/name@revision``
    of a hub repository in huggingface_hub's cache (:mod:`.hub`); oldest first by the step in their names)
    and check they share one architecture. Returns (checkpoints, tensor infos). ``any_format``: the model
    comes from ``--config`` or ``--model-factory``, so checkpoints need not be HF folders (any format the
    merge engine reads)."""
    from ..io import check_compatible

    ckpts = _open(paths)
    try:
        for c in [] if any_format else ckpts:
            if not Path(c.path).is_dir() or not (Path(c.path) / "config.json").is_file():
                raise StudyError(
                    f"{c.path}: not a model folder transformers can load (no config.json); the study "
                    "evaluates each merge as a causal LM (other formats: --config DIR or --model-factory)"
                )
        try:
            infos = check_compatible(ckpts)
        except ValueError as e:
            raise StudyError(f"checkpoints of different architectures: {e}") from None
        if not any_format:
            _one_model_type(ckpts)
        steps = [c.step for c in ckpts]
        if any(s is None for s in steps):
            bad = next(c.path for c in ckpts if c.step is None)
            raise StudyError(f"{bad}: no training step in the folder name (expected step_N or checkpoint-N)")
        if len(set(steps)) != len(steps):
            raise StudyError(f"two checkpoints at the same step ({sorted(steps)})")
        order = np.argsort(steps, kind="stable")
        return [ckpts[i] for i in order], infos
    except BaseException:
        for c in ckpts:
            c.close()
        raise


def _open(paths) -> list:
    """Local paths through the merge engine's reader; hub revisions and snapshot folders of the hub cache
    with their repository's cache folder as the root of every read (see :mod:`.hub`)."""
    from ..io import CheckpointError, load_checkpoints, open_checkpoint
    from . import hub

    if not paths:
        raise StudyError("no checkpoints given")
    refs = [hub.hub_ref(str(p)) for p in paths]
    ckpts: list = []
    try:
        if any(refs):
            ckpts = hub.open_revisions([r for r in refs if r], by_order=all(refs))
        for p, r in zip(paths, refs, strict=True):
            root = None if r else hub.snapshot_root(Path(p))
            if root is not None:
                ckpts.append(open_checkpoint(p, step=hub.snapshot_step(Path(p)), root=root))
            elif not r:
                ckpts.extend(load_checkpoints([str(p)]))
        safety.distinct(c.path for c in ckpts)
    except (CheckpointError, ValueError, OSError) as e:
        for c in ckpts:
            c.close()
        raise StudyError(str(e)) from None
    return ckpts


def _one_model_type(ckpts) -> None:
    """Every config.json names one model (``model_type`` and ``architectures``): two families with the same
    tensors (Llama and Mistral) are still two models, and the newest checkpoint's config builds them all."""
    first: dict = {}
    for c in ckpts:
        path = Path(c.path) / "config.json"
        try:
            cfg = safety.load_json(path, root=getattr(c, "root", None) or Path(c.path))
        except (ValueError, OSError) as e:
            raise StudyError(f"{path}: {e}") from None
        cfg = cfg if isinstance(cfg, dict) else {}
        arch = cfg.get("architectures")
        kind = f"{cfg.get('model_type')} {arch if isinstance(arch, list) else []}"
        first.setdefault(kind, c.path)
        if len(first) > 1:
            (a, pa), (b, pb) = first.items()
            raise StudyError(f"checkpoints of different architectures: {pa} is {a}, {pb} is {b}")


def tokenizer_of(ckpts, tokenizer: str | None) -> Path:
    """The folder of the tokenizer every checkpoint uses: ``tokenizer`` if given, else the checkpoints' own
    (they must all have the same one)."""
    from ..eval import tokenizer_files, tokenizer_fingerprint

    if tokenizer is not None:
        p = Path(tokenizer)
        if not p.is_dir() or not tokenizer_files(p):
            raise StudyError(f"--tokenizer {p}: not a folder with tokenizer files")
        return p
    prints = {}
    for c in ckpts:
        fp = tokenizer_fingerprint(c.path)
        if fp is None:
            raise StudyError(
                f"{c.path}: no tokenizer files in the checkpoint or its parent (pass --tokenizer)"
            )
        prints.setdefault(fp, c.path)
    if len(prints) > 1:
        a, b = list(prints.values())[:2]
        raise StudyError(f"tokenizer mismatch: {a} and {b} use different tokenizers (pass --tokenizer)")
    return Path(ckpts[-1].path)


def load_documents(paths) -> list[str]:
    """Documents from .txt/.jsonl files or folders of .txt (``extramerge.eval.load_texts``)."""
    from ..eval import load_texts

    docs: list[str] = []
    for p in paths:
        try:
            docs.extend(load_texts(p))
        except ValueError as e:
            raise StudyError(str(e)) from None
    return docs


def _key(doc: str) -> bytes:
    return hashlib.sha256(doc.encode("utf-8")).digest()


def split_documents(docs: list[str], source: str) -> tuple[list[str], list[str]]:
    """Deterministic split by document: ordered by the SHA-256 of their text, alternately into the
    calibration and the measurement half (identical documents stay together, in the calibration half)."""
    if len(docs) < 2 * MIN_DOCS:
        raise StudyError(
            f"{source}: {len(docs)} documents; the study needs at least {2 * MIN_DOCS} (two halves of "
            f"{MIN_DOCS}, each at least {MIN_BYTES} bytes), or --calib FILE --test FILE"
        )
    uniq: dict[bytes, list[str]] = {}
    for d in docs:
        uniq.setdefault(_key(d), []).append(d)
    calib, test = [], []
    for i, k in enumerate(sorted(uniq)):
        (calib if i % 2 == 0 else test).extend(uniq[k])
    check_half(calib, f"{source} (calibration half)")
    check_half(test, f"{source} (measurement half)")
    return calib, test


def check_half(docs: list[str], what: str) -> None:
    size = sum(len(d.encode("utf-8")) for d in docs)
    if len(docs) < MIN_DOCS or size < MIN_BYTES:
        raise StudyError(
            f"{what}: {len(docs)} documents, {size} bytes; each half needs at least {MIN_DOCS} documents "
            f"and {MIN_BYTES} bytes"
        )


# ------------------------------------------------------------------------------------- learning rate


_PAIR = re.compile(r"^\s*(\d+)\s*:\s*([0-9.eE+-]+)\s*$")


def read_lr_schedule(spec: str | None, steps: list[int], run: Path | None = None):
    """The learning rate around the checkpoints, as (steps, lrs) samples, or None (constant assumed).

    ``spec``: a run.json written by ``extramerge``'s trainer (its schedule is rebuilt), a JSONL log with
    ``step`` and ``lr`` fields, or ``step:lr`` pairs separated by commas. Without ``spec``, a run folder's
    log.jsonl (then run.json) is used when the checkpoints come from one. The samples must cover the
    checkpoints' steps.
    """
    if spec is None:
        if run is None:
            return None
        for name in ("log.jsonl", "run.json"):
            if (run / name).is_file():
                return read_lr_schedule(str(run / name), steps)
        return None
    p = Path(spec)
    if p.suffix == ".json" and p.is_file():
        xs, ys = _from_run_json(p, steps)
    elif p.suffix == ".jsonl" and p.is_file():
        xs, ys = _from_log(p)
    elif all(_PAIR.match(s) for s in spec.split(",") if s.strip()) and spec.strip():
        pairs = [_PAIR.match(s) for s in spec.split(",") if s.strip()]
        xs = [float(m.group(1)) for m in pairs]
        try:
            ys = [float(m.group(2)) for m in pairs]
        except ValueError:
            raise StudyError(f"--lr-schedule {spec!r}: expected step:lr pairs") from None
    else:
        raise StudyError(f"--lr-schedule {spec}: not a run.json, a .jsonl log or step:lr pairs")
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    if xs.size == 0:
        raise StudyError(f"--lr-schedule {spec}: no learning rates in it")
    if not np.all(np.isfinite(ys)) or np.any(ys < 0):
        raise StudyError(f"--lr-schedule {spec}: learning rates must be finite and >= 0")
    lo, hi = min(steps), max(steps)
    if xs.min() > lo or xs.max() < hi:
        raise StudyError(
            f"--lr-schedule {spec}: covers steps {xs.min():g}..{xs.max():g}, not the checkpoints' {lo}..{hi}"
        )
    if np.unique(xs).size != xs.size:
        _, idx = np.unique(xs, return_index=True)
        xs, ys = xs[idx], ys[idx]
    return xs, ys


def _from_log(p: Path):
    xs, ys = [], []
    for lineno, obj in safety.jsonl(p):
        if isinstance(obj, dict) and "lr" in obj and "step" in obj:
            s, lr = obj["step"], obj["lr"]
            if not isinstance(s, int) or isinstance(lr, bool) or not isinstance(lr, int | float):
                raise StudyError(f"{p}:{lineno}: 'step' must be an integer and 'lr' a number")
            xs.append(s)
            ys.append(float(lr))
    if not xs:
        raise StudyError(f"{p}: no lines with 'step' and 'lr'")
    return xs, ys


def _from_run_json(p: Path, steps: list[int]):
    from rivervalley import schedules

    try:
        meta = safety.load_json(p)  # bounded, strict: a deeply nested file is one line, not a traceback
        sch = meta["schedule"]
        factory = (
            getattr(schedules, sch["factory"]) if sch["factory"] in ("constant", "cosine", "wsd") else None
        )
        if factory is None:
            raise KeyError("factory")
        fn = factory(**sch["params"])
    except (ValueError, KeyError, TypeError) as e:
        raise StudyError(f"{p}: no usable 'schedule' ({type(e).__name__}: {e})") from None
    # the update that made step t used schedule(t - 1) (the trainer's 0-based convention)
    xs = np.arange(max(0, min(steps) - 8 * _spacing(steps)), max(steps) + 1)
    return xs, [float(fn(int(max(x - 1, 0)))) for x in xs]


def _spacing(steps) -> int:
    s = sorted(steps)
    return max(1, int(math.ceil((s[-1] - s[0]) / max(len(s) - 1, 1))))
