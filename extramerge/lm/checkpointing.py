"""What a training run writes besides its log: Hugging Face checkpoint folders, the resume state
(``RUN/resume/optimizer.pt``) and ``--resume`` from it, and the ``run.json`` record.

The functions take the run's state, ``run`` (an ``extramerge.lm.train.Run``); each file is published whole
(never a partial folder or file), so a stop at any moment leaves a run that ``--resume`` continues.
"""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from extramerge.io import publish
from rivervalley.common.formatting import jsonable
from rivervalley.common.publish import publishing, write_file

from .config import RESUME_FREE

__all__ = [
    "RESUME_FILE",
    "check_run_folder",
    "remove_new_run",
    "save_checkpoint",
    "save_resume",
    "read_resume",
    "load_resume",
    "write_run_json",
    "quiet_transformers",
]

RESUME_FILE = "optimizer.pt"


def check_run_folder(d: Path, resume: bool) -> None:
    """A new run needs an absent or empty folder; ``--resume`` needs a resume file in it."""
    if resume:
        if not (d / "resume" / RESUME_FILE).is_file():
            raise ValueError(f"{d}: nothing to resume (no resume/{RESUME_FILE}); drop --resume to start")
    elif d.exists() and (not d.is_dir() or any(d.iterdir())):
        raise ValueError(f"{d}: exists and is not empty; pass --resume to continue it, or pick another -o")


def remove_new_run(folder: Path, created: Path | None) -> None:
    """What a new run wrote before its first resume save (its folder was absent or empty at the start)."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    with contextlib.suppress(OSError):
        for p in folder.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


@contextlib.contextmanager
def quiet_transformers():
    """No "Writing model shards" bar from save_pretrained inside our own progress bar."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def save_checkpoint(run, factor: float) -> None:
    """Publish ``RUN/step_XXXXXX/`` (model and tokenizer) and record it, with the lr of the step's update."""
    t = time.perf_counter()
    name = f"step_{run.step:06d}"
    final = run.dir / name
    with publishing(final, force=True, commit=publish) as tmp:  # a killed run's leftovers are cleaned first
        with quiet_transformers():
            run.model.save_pretrained(tmp)
            run.tokenizer.save_pretrained(tmp)
    run.checkpoints = [c for c in run.checkpoints if c["step"] != run.step]
    run.checkpoints.append(
        {
            "step": run.step,
            "path": name,
            "lr": run.resolved.lr * factor,
            "lr_factor": float(factor),
            "train_loss": run.last_train_loss,
            "val_loss": run.last_val_loss,
        }
    )
    run.timings["ckpt_s"] += time.perf_counter() - t
    write_run_json(run, "running")


def save_resume(run) -> None:
    """Write ``RUN/resume/optimizer.pt``: model, optimizers, RNG states, batch sampler and counters."""
    t = time.perf_counter()
    folder = run.dir / "resume"
    folder.mkdir(exist_ok=True)
    # Tensors go to torch.save; everything else as JSON, so --resume loads with weights_only=True
    # (a resume file is data: loading it must not be able to run code).
    meta = {
        "step": run.step,
        "config": asdict(run.config),
        "batches": run.batches.state,
        "loss_n": run.loss_n,
        "last_losses": [run.last_train_loss, run.last_val_loss],
        "checkpoints": run.checkpoints,
        "timings": run.timings,
        "elapsed": run.elapsed0 + time.perf_counter() - run.t0,
    }
    state = {
        "model": run.model.state_dict(),
        "optimizers": [opt.state_dict() for opt in run.optimizers],
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if run.cuda else None,
        "loss_sum": run.loss_sum.detach().cpu(),
        "meta": json.dumps(jsonable(meta)),
    }
    write_file(folder / RESUME_FILE, lambda p: torch.save(state, p))
    run.saved_step = run.step
    run.timings["resume_s"] += time.perf_counter() - t


def read_resume(path: Path) -> tuple[dict, dict]:
    """(tensors, JSON state) of a resume file, loaded with weights_only=True: no pickled code runs."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(state["meta"])
    except Exception as e:
        what = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ValueError(
            f"{path}: not a resume file of this trainer ({type(e).__name__}: {what}); drop --resume to start"
        ) from None
    return state, meta


def load_resume(run) -> None:
    """Restore ``run`` from its resume file (refusing a changed config), and drop the log lines and
    checkpoints written after that save."""
    state, meta = read_resume(run.dir / "resume" / RESUME_FILE)
    saved = meta["config"]
    for k, v in asdict(run.config).items():
        if k not in RESUME_FREE and saved.get(k) != jsonable(v):
            raise ValueError(
                f"{run.dir}: --resume with a different {k} ({v!r}; the run has {saved.get(k)!r})"
            )
    run.model.load_state_dict(state["model"])
    for opt, sd in zip(run.optimizers, state["optimizers"], strict=True):
        opt.load_state_dict(sd)
    run.batches.state = meta["batches"]
    torch.set_rng_state(state["torch_rng"])
    if run.cuda and state["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    run.step = run.saved_step = meta["step"]
    run.loss_sum = state["loss_sum"].to(run.device)
    run.loss_n = meta["loss_n"]
    run.last_train_loss, run.last_val_loss = meta["last_losses"]
    run.checkpoints = [c for c in meta["checkpoints"] if c["step"] <= run.step]
    run.timings = dict(meta["timings"])
    run.elapsed0 = meta["elapsed"]
    # A stop after the last resume save leaves log lines and checkpoints that the resumed run rewrites.
    log = run.dir / "log.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= run.step]
    log.write_text("".join(ln + "\n" for ln in kept))
    for p in run.dir.glob("step_*"):
        s = p.name.removeprefix("step_")
        if s.isdigit() and int(s) > run.step:
            shutil.rmtree(p)


def write_run_json(run, status: str) -> None:
    """Write ``RUN/run.json``: config, resolved defaults, model, schedule, data, checkpoints, timings."""
    import transformers

    r, given = run.resolved, asdict(run.config)
    record = {
        "status": status,
        "config": asdict(run.config),
        "resolved": {k: v for k, v in r.to_dict().items() if k not in given or given[k] != v},
        "model": {
            "arch": r.arch,
            "size": r.size,
            "shape": asdict(r.preset),
            "params": run.n_params,
            "class": type(run.model).__name__,
        },
        "schedule": {
            "name": r.schedule,
            "factory": run.schedule.name,
            "params": run.schedule.params,
        },
        "tokens_per_step": r.tokens_per_step,
        "step": run.step,
        "data_dir": "data",
        "data": {k: run.meta[k] for k in ("corpus", "tokens", "bytes", "fractions", "content_hash")},
        "checkpoints": run.checkpoints,
        "timings": {
            **{k: round(v, 3) for k, v in run.timings.items()},
            "tokens_per_s": round(run.tokens_per_s(), 1),
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
    text = json.dumps(record, indent=2) + "\n"
    write_file(run.dir / "run.json", lambda p: p.write_text(text))
