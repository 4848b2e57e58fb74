"""The trainer's command line, ``python -m experiments.lm.train``: flags, ``--resume`` filling the flags
not given from the run's record, and the one-line messages and exit codes of errors and signals
(see ``extramerge.lm.train`` for the run folder it writes)."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import signal
import sys
from pathlib import Path

from extramerge.io import safety
from rivervalley.common.publish import interruptible

from .config import DEFAULT_ADAM_LR, DEFAULT_LR, OPTIMIZERS, RESUME_FREE, SCHEDULE_NAMES, TrainConfig
from .models import ARCHS
from .train import Interrupted, train

__all__ = ["build_parser", "config_from_args", "stopped_line", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.lm.train",
        description="Train a byte-level GPT-2/LLaMA and write late-stage HF checkpoints to RUN/step_XXXXXX/.",
        argument_default=argparse.SUPPRESS,
    )
    d = TrainConfig()
    a = p.add_argument
    a(
        "-o",
        "--out",
        required=True,
        metavar="RUN",
        help="run folder (refused if it exists and is not empty, unless --resume)",
    )
    a("--arch", choices=ARCHS, help=f"model family (default {d.arch})")
    a(
        "--size",
        help="preset: tiny, small, gpt2-124m, llama-125m, llama-350m (aliases 124m, 125m, 350m); "
        f"any size works with either arch (default {d.size})",
    )
    a("--n-layer", type=int, help="override the preset's number of layers")
    a("--d-model", type=int, help="override the preset's width")
    a("--n-head", type=int, help="override the preset's number of attention heads")
    a("--seq-len", type=int, help="training context in tokens (default: the preset's)")
    a(
        "--corpus",
        help=f"pydoc, gensim-wiki, gcide, or a path to a text file / folder / .jsonl (default {d.corpus})",
    )
    a(
        "--optimizer",
        choices=OPTIMIZERS,
        help=f"adamw, or muon (Muon on hidden matrices + AdamW on the rest; default {d.optimizer})",
    )
    a("--lr", type=float, help=f"peak lr: AdamW's, or Muon's for the matrices (default {DEFAULT_LR})")
    a("--adam-lr", type=float, help=f"muon only: peak lr of the AdamW groups (default {DEFAULT_ADAM_LR})")
    a(
        "--weight-decay",
        type=float,
        help=f"decoupled weight decay on >= 2-D weights (default {d.weight_decay})",
    )
    a("--beta1", type=float, help=f"AdamW beta1 (default {d.beta1})")
    a("--beta2", type=float, help=f"AdamW beta2 (default {d.beta2})")
    a("--muon-momentum", type=float, help=f"Muon momentum (default {d.muon_momentum})")
    a(
        "--muon-adjust-lr",
        choices=("original", "match_rms_adamw"),
        help="torch.optim.Muon adjust_lr_fn; match_rms_adamw (default) scales updates to AdamW's RMS and "
        "does not depend on whether a matrix is stored (in, out) as GPT-2's Conv1D or (out, in)",
    )
    a("--schedule", choices=SCHEDULE_NAMES, help=f"lr schedule (default {d.schedule})")
    a("--warmup", type=int, help="linear warmup steps (default 5%% of --steps)")
    a(
        "--final-lr-frac",
        type=float,
        help=f"cosine/wsd end at this fraction of the peak (default {d.final_lr_frac})",
    )
    a(
        "--decay-fraction",
        type=float,
        help=f"wsd: fraction of steps in the decay (default {d.decay_fraction})",
    )
    a("--wsd-shape", choices=("linear", "cosine", "1-sqrt"), help=f"wsd decay shape (default {d.wsd_shape})")
    a("--steps", type=int, help=f"optimizer updates (default {d.steps})")
    a("--batch-size", type=int, help=f"sequences per step (default {d.batch_size})")
    a("--grad-clip", type=float, help=f"clip the global gradient norm; 0 disables (default {d.grad_clip})")
    a("--seed", type=int, help=f"seeds model init and batch sampling (default {d.seed})")
    a("--ckpt-every", type=int, help=f"steps between checkpoints (default {d.ckpt_every})")
    a(
        "--ckpt-from",
        type=int,
        help="first checkpoint step (default: the grid over the last 30%% of training)",
    )
    a("--eval-every", type=int, help="validation every N steps besides checkpoints; 0: only at checkpoints")
    a("--eval-batches", type=int, help=f"batches in the fixed validation subset (default {d.eval_batches})")
    a("--log-every", type=int, help=f"steps between train-loss log lines (default {d.log_every})")
    a("--save-every", type=int, help="extra resume saves every N steps (always at checkpoints; default 0)")
    a("--device", help="cpu, cuda or auto (default auto: cuda when available)")
    a("--compile", action="store_true", help="torch.compile the model (useful on CUDA)")
    a("--threads", type=int, help="CPU threads (default: every core available to this process)")
    a(
        "--resume",
        action="store_true",
        help="continue RUN from RUN/resume/optimizer.pt; flags not given are "
        "taken from the run, flags given must match it",
    )
    a("--stop-at", type=int, help="pause after this step (saving resume state); continue with --resume")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar and no summary")
    a(
        "--online-merge",
        metavar="SPEC",
        help="keep merges online and report their held-out loss at each evaluation (val_loss_NAME in "
        "log.jsonl): comma-separated ema:BETA, pema:GAMMA (power EMA), sma:K, wma:K, extra:ALPHA@D "
        "(Extra-Merge of the average before it), e.g. ema:0.99,sma:8,extra:0.5@4",
    )
    a("--online-every", type=int, help="update the online merges every N optimizer steps (default 1)")
    a(
        "--online-device",
        choices=("cpu",),
        help="keep the online merges on the host (default: beside the weights)",
    )
    a(
        "--online-save",
        action="store_true",
        help="also save each online merge at every checkpoint, as RUN/online/NAME/step_XXXXXX/",
    )
    return p


def config_from_args(argv=None) -> TrainConfig:
    """TrainConfig from command-line flags; with ``--resume`` the run's saved config fills the rest."""
    given = vars(build_parser().parse_args(argv))
    base: dict = {}
    if given.get("resume"):
        rec = Path(given["out"]) / "run.json"
        if rec.is_file():  # bounded, strict JSON: a run folder is input like any other
            doc = safety.load_json(rec)
            saved = doc.get("config") if isinstance(doc, dict) else None
            if not isinstance(saved, dict):
                raise ValueError(f"{rec}: not a run record (no 'config' object)")
            base = {k: v for k, v in saved.items() if k not in RESUME_FREE}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    merged = {k: v for k, v in {**base, **given}.items() if k in fields}
    merged.setdefault("progress", True)
    return TrainConfig(**merged)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        config = config_from_args(argv)
        with interruptible():  # SIGTERM/SIGHUP unwind like Ctrl-C; one started ignored (nohup) stays so
            train(config)
    except Interrupted as e:
        print(stopped_line(e, argv), file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt as e:  # before training started: nothing was written
        print(f"experiments.lm.train: stopped ({e or 'SIGINT'}); nothing was written", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    except (ValueError, FileNotFoundError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


def stopped_line(e: Interrupted, argv: list[str]) -> str:
    """One line: where the run stopped and the exact command that continues (or restarts) it."""
    head = f"experiments.lm.train: stopped by {signal.Signals(e.signum).name} at step {e.step}"
    cmd = "python -m experiments.lm.train "
    if e.saved is None and not e.config.resume:
        return f"{head}, before anything was saved; start again with: {cmd}{shlex.join(argv)}"
    args = argv if "--resume" in argv else [*argv, "--resume"]
    saved = f"saved at step {e.saved}" if e.saved is not None else "its resume state unchanged"
    return f"{head}; {e.config.out} is {saved}; continue with: {cmd}{shlex.join(args)}"


if __name__ == "__main__":
    sys.exit(main())
