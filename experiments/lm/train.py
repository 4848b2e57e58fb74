"""Train a byte-level GPT-2 or LLaMA and write late-stage checkpoints as Hugging Face folders.

    python -m experiments.lm.train --arch gpt2 --size tiny --optimizer adamw --schedule wsd \\
        --steps 1000 --ckpt-every 50 -o runs/tiny_wsd          # add --resume to continue after a stop

Run folder (``-o RUN``)::

    RUN/run.json            config, resolved defaults, schedule, params, tokens/step, checkpoints (with
                            their lr and losses), timings
    RUN/log.jsonl           {step, lr, train_loss, grad_norm, tokens, elapsed} every --log-every steps;
                            {step, val_loss} every --eval-every steps and at every checkpoint
    RUN/data/               the prepared corpus (experiments.lm.data.prepare): {train,val,test}.npy, ...
    RUN/step_000700/ ...    checkpoints: config.json, model.safetensors (fp32), generation_config.json,
                            tokenizer files; opened by AutoModelForCausalLM and extramerge alike
    RUN/resume/optimizer.pt resume state (model, optimizers, step, RNG states), written at every checkpoint
                            and every --save-every steps; the name keeps extramerge's scanner away from it

Conventions: ``--steps`` counts optimizer updates; ``step_000700`` holds the weights after 700 updates, and
its recorded ``lr`` is the one that update used (``schedule(699)``: schedules are 0-based). Checkpoints are
written at ``ckpt_from, ckpt_from + ckpt_every, ...`` and at the final step; by default
``ckpt_from = steps - ckpt_every · floor(0.3 · steps / ckpt_every)``: a grid that ends on the final step and
reaches back over the last 30% of training (1000 steps, every 100: 700, 800, 900, 1000). ``--stop-at N``
pauses after step N (resume state saved); ``--resume`` continues it, as it does after Ctrl-C, SIGTERM or
SIGHUP (one line names the step the run is saved at and the command; exit 128 + signal). Every param
group's lr is ``base_lr · schedule(step) / peak``, so the Muon matrices (``--lr``) and the AdamW rest
(``--adam-lr``) follow the same shape. Batches are random windows of ``seq_len + 1`` tokens of
train.npy drawn by a numpy Generator seeded from ``--seed`` (model init uses ``torch.manual_seed(seed)``), so
the same seed gives the same losses, and ``--resume`` reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import shlex
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from extramerge.checkpoints import publish, staging_dir
from rivervalley.publish import deferred, interruptible, write_file
from rivervalley.schedules import Schedule, get_schedule, wsd

from . import data as lmdata
from .models import ARCHS, build_model, count_params, resolve_size
from .tokenizer import build_tokenizer

__all__ = [
    "TrainConfig",
    "train",
    "resolve",
    "param_groups",
    "build_optimizers",
    "build_schedule",
    "checkpoint_steps",
    "Batches",
    "Interrupted",
    "main",
]

OPTIMIZERS = ("adamw", "muon")
SCHEDULE_NAMES = ("constant", "cosine", "wsd")
DEFAULT_LR = {"adamw": 1e-3, "muon": 1e-2}
DEFAULT_ADAM_LR = 3e-3  # embeddings, lm_head, norms and biases when --optimizer muon
RESUME_FILE = "optimizer.pt"
# Fields that may differ between a run and its --resume (they change speed or display, not the numbers).
_RESUME_FREE = ("out", "resume", "stop_at", "progress", "device", "compile", "threads")


@dataclass
class TrainConfig:
    """Everything a run depends on; ``None`` means "derive it" (see ``resolve``)."""

    out: str = "runs/lm"
    arch: str = "gpt2"
    size: str = "tiny"
    n_layer: int | None = None  # shape overrides of the preset
    d_model: int | None = None
    n_head: int | None = None
    seq_len: int | None = None  # None: the preset's context
    corpus: str = "pydoc"
    optimizer: str = "adamw"
    lr: float | None = None  # AdamW lr, or the Muon matrices' lr; None: DEFAULT_LR[optimizer]
    adam_lr: float | None = None  # Muon runs only: lr of the AdamW groups; None: DEFAULT_ADAM_LR
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    muon_momentum: float = 0.95
    muon_adjust_lr: str = "match_rms_adamw"
    schedule: str = "cosine"
    warmup: int | None = None  # None: 5% of steps
    final_lr_frac: float = 0.0  # cosine / wsd end at final_lr_frac · lr
    decay_fraction: float = 0.2  # wsd
    wsd_shape: str = "linear"
    steps: int = 1000
    batch_size: int = 32
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 0
    ckpt_every: int = 100
    ckpt_from: int | None = None  # None: the last 30% of training (see the module docstring)
    eval_every: int = 0  # 0: validation only at checkpoints
    eval_batches: int = 8
    log_every: int = 10
    save_every: int = 0  # extra resume saves between checkpoints; 0: only at checkpoints
    device: str = "auto"
    compile: bool = False
    threads: int | None = None  # CPU threads; None: every core available to this process
    resume: bool = False
    stop_at: int | None = None  # pause after this step with a resume save (continue later with --resume)
    progress: bool = True
    extra: dict = field(default_factory=dict)  # free-form notes recorded in run.json


# ------------------------------------------------------------------------------------------------ config


def resolve(config: TrainConfig) -> dict:
    """Validated config with every derived default filled in (what the run actually uses)."""
    c = asdict(config)
    if c["arch"] not in ARCHS:
        raise ValueError(f"--arch must be one of {', '.join(ARCHS)}, got {c['arch']!r}")
    if c["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {c['optimizer']!r}")
    if c["schedule"] not in SCHEDULE_NAMES:
        raise ValueError(f"--schedule must be one of {', '.join(SCHEDULE_NAMES)}, got {c['schedule']!r}")
    preset = resolve_size(
        c["size"], n_layer=c["n_layer"], d_model=c["d_model"], n_head=c["n_head"], seq_len=c["seq_len"]
    )
    c["preset"] = asdict(preset)
    c["seq_len"] = preset.seq_len
    for k in ("steps", "batch_size", "ckpt_every", "eval_batches", "log_every"):
        if not isinstance(c[k], int) or c[k] < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be an integer >= 1, got {c[k]!r}")
    for k in ("eval_every", "save_every"):
        if not isinstance(c[k], int) or c[k] < 0:
            raise ValueError(f"--{k.replace('_', '-')} must be an integer >= 0, got {c[k]!r}")
    c["lr"] = DEFAULT_LR[c["optimizer"]] if c["lr"] is None else float(c["lr"])
    c["adam_lr"] = (
        (DEFAULT_ADAM_LR if c["adam_lr"] is None else float(c["adam_lr"]))
        if c["optimizer"] == "muon"
        else None
    )
    for k in ("lr", "adam_lr"):
        if c[k] is not None and not (math.isfinite(c[k]) and c[k] > 0):
            raise ValueError(f"--{k.replace('_', '-')} must be a positive number, got {c[k]!r}")
    for k in ("weight_decay", "grad_clip", "final_lr_frac"):
        if not (math.isfinite(c[k]) and c[k] >= 0):
            raise ValueError(f"--{k.replace('_', '-')} must be a number >= 0, got {c[k]!r}")
    if c["final_lr_frac"] > 1:
        raise ValueError(f"--final-lr-frac must be in [0, 1], got {c['final_lr_frac']}")
    if c["warmup"] is None:
        c["warmup"] = c["steps"] // 20
    if not isinstance(c["warmup"], int) or not 0 <= c["warmup"] < c["steps"]:
        raise ValueError(f"--warmup must be an integer in [0, steps={c['steps']}), got {c['warmup']!r}")
    if c["ckpt_from"] is None:
        c["ckpt_from"] = max(c["steps"] - c["ckpt_every"] * int(0.3 * c["steps"] // c["ckpt_every"]), 1)
    if not isinstance(c["ckpt_from"], int) or not 1 <= c["ckpt_from"] <= c["steps"]:
        raise ValueError(f"--ckpt-from must be an integer in [1, steps={c['steps']}], got {c['ckpt_from']!r}")
    if c["stop_at"] is not None and (not isinstance(c["stop_at"], int) or c["stop_at"] < 1):
        raise ValueError(f"--stop-at must be an integer >= 1, got {c['stop_at']!r}")
    if c["device"] == "auto":
        c["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if c["device"].split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or auto, got {config.device!r}")
    if c["device"].startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    c["tokens_per_step"] = c["batch_size"] * c["seq_len"]
    return c


def build_schedule(r: dict) -> Schedule:
    """The run's lr schedule (peak = ``lr``). A constant schedule with warmup is WSD without decay."""
    final = r["final_lr_frac"] * r["lr"]
    if r["schedule"] == "constant":
        if r["warmup"] == 0:
            return get_schedule("constant", r["lr"])
        return wsd(r["lr"], r["steps"], warmup=r["warmup"], decay_steps=0)
    if r["schedule"] == "cosine":
        return get_schedule("cosine", r["lr"], r["steps"], warmup=r["warmup"], final_lr=final)
    return get_schedule(
        "wsd",
        r["lr"],
        r["steps"],
        warmup=r["warmup"],
        decay_fraction=r["decay_fraction"],
        shape=r["wsd_shape"],
        final_lr=final,
    )


def checkpoint_steps(steps: int, ckpt_every: int, ckpt_from: int) -> list[int]:
    """``ckpt_from, ckpt_from + ckpt_every, ... <= steps``, plus ``steps`` itself."""
    out = list(range(ckpt_from, steps + 1, ckpt_every))
    return out if out and out[-1] == steps else [*out, steps]


# ------------------------------------------------------------------------------------------- optimizers


def param_groups(model: torch.nn.Module, optimizer: str = "muon") -> dict[str, list[str]]:
    """Parameter names per group: ``muon`` (2-D hidden matrices: attention and MLP, GPT-2's Conv1D
    included; Muon only), ``decay`` (other tensors with >= 2 dims: embeddings, lm_head) and ``no_decay``
    (norms, biases). Embedding and output-embedding weights never go to Muon."""
    embeds = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        embeds.add(id(head.weight))
    out: dict[str, list[str]] = {"muon": [], "decay": [], "no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if optimizer == "muon" and p.ndim == 2 and id(p) not in embeds:
            out["muon"].append(name)
        else:
            out["decay" if p.ndim >= 2 else "no_decay"].append(name)
    return out


def build_optimizers(model: torch.nn.Module, r: dict) -> list[torch.optim.Optimizer]:
    """AdamW (decay on >= 2-D weights only), or Muon on the hidden matrices + AdamW on the rest. Every
    group remembers its ``base_lr``, which the schedule scales each step. Note: torch.optim.Muon runs its
    Newton-Schulz iteration in bfloat16, which is slow on CPUs without native bf16 support (the tiny preset's
    Muon step took ~0.1 s on one core of the dev machine, about as long as its forward + backward)."""
    params = dict(model.named_parameters())
    groups = param_groups(model, r["optimizer"])
    fused = {"fused": True} if r["device"].startswith("cuda") else {}
    adam_lr = r["lr"] if r["optimizer"] == "adamw" else r["adam_lr"]
    adam_groups = [
        {
            "params": [params[n] for n in groups["decay"]],
            "weight_decay": r["weight_decay"],
            "base_lr": adam_lr,
        },
        {"params": [params[n] for n in groups["no_decay"]], "weight_decay": 0.0, "base_lr": adam_lr},
    ]
    adam = torch.optim.AdamW(
        [g for g in adam_groups if g["params"]], lr=adam_lr, betas=(r["beta1"], r["beta2"]), eps=1e-8, **fused
    )
    if r["optimizer"] == "adamw":
        return [adam]
    muon = torch.optim.Muon(
        [{"params": [params[n] for n in groups["muon"]], "base_lr": r["lr"]}],
        lr=r["lr"],
        weight_decay=r["weight_decay"],
        momentum=r["muon_momentum"],
        nesterov=True,
        adjust_lr_fn=r["muon_adjust_lr"],
    )
    return [muon, adam]


# ------------------------------------------------------------------------------------------------- data


class Batches:
    """Random windows of ``seq_len + 1`` tokens from a token array; deterministic given the seed, with a
    saveable state (the numpy Generator's)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 1])))
        self._offsets = np.arange(seq_len + 1)

    def next(self) -> torch.Tensor:
        """``[batch, seq_len + 1]`` int64: inputs are ``[:, :-1]``, targets ``[:, 1:]``."""
        starts = self.rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        return torch.from_numpy(self.tokens[starts[:, None] + self._offsets].astype(np.int64))

    @property
    def state(self) -> dict:
        return self.rng.bit_generator.state

    @state.setter
    def state(self, value: dict) -> None:
        self.rng.bit_generator.state = value


def _read_resume(path: Path) -> tuple[dict, dict]:
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


def eval_windows(n_tokens: int, seq_len: int, count: int) -> np.ndarray:
    """Start offsets of ``count`` evenly spaced validation windows (the same subset at every evaluation)."""
    return np.linspace(0, n_tokens - seq_len - 1, count).round().astype(np.int64)


# -------------------------------------------------------------------------------------------------- train


def _lm_loss(model, chunk: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=chunk[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), chunk[:, 1:].reshape(-1))


class _Run:
    """The state of one training run and the few things it does besides stepping."""

    def __init__(self, config: TrainConfig):
        self.t0 = time.perf_counter()
        self.config = config
        self.r = resolve(config)
        self.dir = Path(config.out)
        self._check_folder()
        self.device = torch.device(self.r["device"])
        self.cuda = self.device.type == "cuda"
        self.timings = {"train_s": 0.0, "eval_s": 0.0, "ckpt_s": 0.0, "resume_s": 0.0, "setup_s": 0.0}
        self.elapsed0 = 0.0  # wall time of earlier segments (before a resume)
        self.checkpoints: list[dict] = []
        self.step = 0
        self.loss_sum = torch.zeros((), device=self.device)
        self.loss_n = 0
        self.last_train_loss = self.last_val_loss = None
        self.saved_step: int | None = None  # step of the last resume save (what --resume continues from)
        self.created: Path | None = None  # the highest folder this run created

    def _check_folder(self) -> None:
        d = self.dir
        if self.config.resume:
            if not (d / "resume" / RESUME_FILE).is_file():
                raise ValueError(f"{d}: nothing to resume (no resume/{RESUME_FILE}); drop --resume to start")
        elif d.exists() and (not d.is_dir() or any(d.iterdir())):
            raise ValueError(
                f"{d}: exists and is not empty; pass --resume to continue it, or pick another -o"
            )

    # --------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        # the highest folder this call creates: a bad corpus or flag must not leave empty folders behind
        created = next((p for p in reversed([self.dir, *self.dir.parents]) if not p.exists()), None)
        self.created = created
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self._setup()
        except BaseException:
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            raise

    def _setup(self) -> None:
        r = self.r
        data_dir = lmdata.prepare(r["corpus"], self.dir / "data", min_tokens=r["seq_len"] + 1)
        self.meta = lmdata.load_meta(data_dir)
        self.train_tokens = lmdata.load_split(data_dir, "train")
        self.val_tokens = lmdata.load_split(data_dir, "val")
        torch.manual_seed(r["seed"])
        self.model = build_model(
            r["arch"], r["size"], **{k: r[k] for k in ("n_layer", "d_model", "n_head")}, seq_len=r["seq_len"]
        ).to(self.device)
        self.model.train()
        self.n_params = count_params(self.model)
        self.optimizers = build_optimizers(self.model, r)
        self.schedule = build_schedule(r)
        self.lr_factor = (
            np.asarray(self.schedule(np.arange(r["steps"])), dtype=np.float64) / self.schedule.peak
        )
        self.batches = Batches(self.train_tokens, r["batch_size"], r["seq_len"], r["seed"])
        self.eval_starts = eval_windows(
            len(self.val_tokens), r["seq_len"], r["eval_batches"] * r["batch_size"]
        )
        self.ckpt_steps = checkpoint_steps(r["steps"], r["ckpt_every"], r["ckpt_from"])
        self.tokenizer = build_tokenizer()
        self.forward = torch.compile(self.model) if r["compile"] else self.model
        if self.config.resume:
            self._load_resume()
        else:
            (self.dir / "log.jsonl").write_text("")
        self.log = open(self.dir / "log.jsonl", "a", encoding="utf-8")  # closed in finish()
        self.timings["setup_s"] += time.perf_counter() - self.t0
        self.write_run_json("running")

    def _autocast(self):
        if self.cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ----------------------------------------------------------------------------------------- loop
    def run(self) -> None:
        r = self.r
        from tqdm.auto import tqdm

        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [g for opt in self.optimizers for g in opt.param_groups]
        ckpts, log_every, clip = set(self.ckpt_steps), r["log_every"], r["grad_clip"]
        eval_every, save_every, tps = r["eval_every"], r["save_every"], r["tokens_per_step"]
        bar = tqdm(
            total=r["steps"],
            initial=self.step,
            disable=not self.config.progress,
            unit="step",
            dynamic_ncols=True,
            desc=self.dir.name,
        )
        t_loop, first = time.perf_counter(), self.step
        side = 0.0  # time spent in evaluation / checkpoints / resume saves (not the step path)
        grad_norm = torch.zeros(())
        last = min(r["steps"], r["stop_at"] or r["steps"])
        try:
            while self.step < last:
                factor = self.lr_factor[self.step]
                for g in groups:
                    g["lr"] = float(g["base_lr"] * factor)  # a Python float: resume state stays weights-only
                chunk = self.batches.next()
                chunk = chunk.pin_memory().to(self.device, non_blocking=True) if self.cuda else chunk
                with self._autocast():
                    loss = _lm_loss(self.forward, chunk)
                loss.backward()
                if clip > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
                for opt in self.optimizers:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                self.loss_sum += loss.detach()
                self.loss_n += 1
                self.step += 1
                step = self.step
                bar.update(1)
                if step % log_every == 0 or step == r["steps"]:
                    train_loss = float(self.loss_sum) / self.loss_n
                    self.loss_sum.zero_()
                    self.loss_n = 0
                    self.last_train_loss = train_loss
                    now = time.perf_counter()
                    self._log(
                        step=step,
                        lr=r["lr"] * factor,
                        train_loss=train_loss,
                        grad_norm=float(grad_norm) if clip > 0 else None,
                        tokens=step * tps,
                        elapsed=round(self.elapsed0 + now - self.t0, 3),
                    )
                    bar.set_postfix(
                        loss=f"{train_loss:.3f}",
                        tok_s=f"{(step - first) * tps / max(now - t_loop - side, 1e-9):.0f}",
                    )
                is_ckpt = step in ckpts
                if (
                    is_ckpt
                    or (eval_every and step % eval_every == 0)
                    or (save_every and step % save_every == 0)
                ):
                    t_side = time.perf_counter()
                    if is_ckpt or (eval_every and step % eval_every == 0):
                        self._evaluate()
                    with deferred():  # a signal waits: a published checkpoint always has its resume state
                        if is_ckpt:
                            self._save_checkpoint(factor)
                        if is_ckpt or (save_every and step % save_every == 0):
                            self._save_resume()
                    side += time.perf_counter() - t_side
        except BaseException:
            bar.close()  # a stop line goes below the bar, not onto it
            raise
        bar.close()
        self.timings["train_s"] += time.perf_counter() - t_loop - side
        if self.step < r["steps"] and not (
            self.step in ckpts or (save_every and self.step % save_every == 0)
        ):
            self._save_resume()  # paused by --stop-at

    def _log(self, **entry) -> None:
        self.log.write(json.dumps({k: v for k, v in entry.items() if v is not None}) + "\n")
        self.log.flush()

    # ------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _evaluate(self) -> float:
        t = time.perf_counter()
        self.model.eval()
        bs, offsets = self.r["batch_size"], np.arange(self.r["seq_len"] + 1)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(0, len(self.eval_starts), bs):
            starts = self.eval_starts[i : i + bs]
            chunk = torch.from_numpy(self.val_tokens[starts[:, None] + offsets].astype(np.int64)).to(
                self.device
            )
            with self._autocast():
                total += _lm_loss(self.forward, chunk).double() * len(starts)
        self.model.train()
        val = float(total) / len(self.eval_starts)
        self.last_val_loss = val
        self._log(step=self.step, val_loss=val)
        self.timings["eval_s"] += time.perf_counter() - t
        return val

    # ----------------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, factor: float) -> None:
        t = time.perf_counter()
        name = f"step_{self.step:06d}"
        final = self.dir / name
        tmp = staging_dir(final)  # a killed run's leftovers beside it are cleaned first
        try:
            with _quiet_transformers():
                self.model.save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
            publish(tmp, final, force=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.checkpoints = [c for c in self.checkpoints if c["step"] != self.step]
        self.checkpoints.append(
            {
                "step": self.step,
                "path": name,
                "lr": self.r["lr"] * factor,
                "lr_factor": float(factor),
                "train_loss": self.last_train_loss,
                "val_loss": self.last_val_loss,
            }
        )
        self.timings["ckpt_s"] += time.perf_counter() - t
        self.write_run_json("running")

    def _save_resume(self) -> None:
        t = time.perf_counter()
        folder = self.dir / "resume"
        folder.mkdir(exist_ok=True)
        # Tensors go to torch.save; everything else as JSON, so --resume loads with weights_only=True
        # (a resume file is data: loading it must not be able to run code).
        meta = {
            "step": self.step,
            "config": asdict(self.config),
            "batches": self.batches.state,
            "loss_n": self.loss_n,
            "last_losses": [self.last_train_loss, self.last_val_loss],
            "checkpoints": self.checkpoints,
            "timings": self.timings,
            "elapsed": self.elapsed0 + time.perf_counter() - self.t0,
        }
        state = {
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.cuda else None,
            "loss_sum": self.loss_sum.detach().cpu(),
            "meta": json.dumps(meta, default=str),
        }
        write_file(folder / RESUME_FILE, lambda p: torch.save(state, p))
        self.saved_step = self.step
        self.timings["resume_s"] += time.perf_counter() - t

    def _load_resume(self) -> None:
        state, meta = _read_resume(self.dir / "resume" / RESUME_FILE)
        saved = meta["config"]
        for k, v in asdict(self.config).items():
            if k not in _RESUME_FREE and saved.get(k) != json.loads(json.dumps(v, default=str)):
                raise ValueError(
                    f"{self.dir}: --resume with a different {k} ({v!r}; the run has {saved.get(k)!r})"
                )
        self.model.load_state_dict(state["model"])
        for opt, sd in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(sd)
        self.batches.state = meta["batches"]
        torch.set_rng_state(state["torch_rng"])
        if self.cuda and state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = self.saved_step = meta["step"]
        self.loss_sum = state["loss_sum"].to(self.device)
        self.loss_n = meta["loss_n"]
        self.last_train_loss, self.last_val_loss = meta["last_losses"]
        self.checkpoints = [c for c in meta["checkpoints"] if c["step"] <= self.step]
        self.timings = dict(meta["timings"])
        self.elapsed0 = meta["elapsed"]
        # A stop after the last resume save leaves log lines and checkpoints that the resumed run rewrites.
        log = self.dir / "log.jsonl"
        lines = log.read_text().splitlines() if log.is_file() else []
        kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= self.step]
        log.write_text("".join(ln + "\n" for ln in kept))
        for p in self.dir.glob("step_*"):
            s = p.name.removeprefix("step_")
            if s.isdigit() and int(s) > self.step:
                shutil.rmtree(p)

    # -------------------------------------------------------------------------------------- records
    def write_run_json(self, status: str) -> None:
        import transformers

        r, given = self.r, asdict(self.config)
        record = {
            "status": status,
            "config": asdict(self.config),
            "resolved": {k: v for k, v in r.items() if k not in given or given[k] != v},
            "model": {
                "arch": r["arch"],
                "size": r["size"],
                "shape": r["preset"],
                "params": self.n_params,
                "class": type(self.model).__name__,
            },
            "schedule": {
                "name": r["schedule"],
                "factory": self.schedule.name,
                "params": self.schedule.params,
            },
            "tokens_per_step": r["tokens_per_step"],
            "step": self.step,
            "data_dir": "data",
            "data": {k: self.meta[k] for k in ("corpus", "tokens", "bytes", "fractions", "content_hash")},
            "checkpoints": self.checkpoints,
            "timings": {
                **{k: round(v, 3) for k, v in self.timings.items()},
                "tokens_per_s": round(self._tokens_per_s(), 1),
            },
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
        }
        text = json.dumps(record, indent=2) + "\n"
        write_file(self.dir / "run.json", lambda p: p.write_text(text))

    def _tokens_per_s(self) -> float:
        return (
            self.step * self.r["tokens_per_step"] / self.timings["train_s"]
            if self.timings["train_s"]
            else 0.0
        )

    def finish(self) -> None:
        self.log.close()
        self.write_run_json("finished" if self.step >= self.r["steps"] else "stopped")
        if self.config.progress:
            print(self.summary())

    def summary(self) -> str:
        r = self.r
        steps = ", ".join(str(c["step"]) for c in self.checkpoints)
        val = f"{self.last_val_loss:.4f}" if self.last_val_loss is not None else "-"
        train = f"{self.last_train_loss:.4f}" if self.last_train_loss is not None else "-"
        t = self.timings
        return "\n".join(
            [
                f"run       {self.dir}",
                f"model     {r['arch']} {r['size']} ({self.n_params / 1e6:.2f} M params), {r['optimizer']}, "
                f"{r['schedule']} lr {r['lr']:g}, {r['steps']} steps x {r['tokens_per_step']} tokens",
                f"speed     {self._tokens_per_s():,.0f} tokens/s "
                f"({self.step / max(t['train_s'], 1e-9):.2f} steps/s; "
                f"train {t['train_s']:.1f} s, eval {t['eval_s']:.1f} s, checkpoints {t['ckpt_s']:.1f} s)",
                f"loss      train {train}, val {val} (bits/byte {_bpb(self.last_val_loss)})",
                f"ckpts     {len(self.checkpoints)}: step {steps}",
            ]
        )


@contextlib.contextmanager
def _quiet_transformers():
    """No "Writing model shards" bar from save_pretrained inside our own progress bar."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _bpb(loss: float | None) -> str:
    return "-" if loss is None else f"{loss / math.log(2):.3f}"


@contextlib.contextmanager
def _cpu_settings(device: str, threads: int | None):
    """CPU: flush denormals (AdamW slows down several-fold on them) and use every available core;
    CUDA: TF32 matmuls. Restores the previous settings afterwards."""
    if device.startswith("cuda"):
        old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
        return
    from rivervalley.compute import flush_denormals

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads or _available_cores())
    try:
        with flush_denormals():
            yield
    finally:
        torch.set_num_threads(old_threads)


def _available_cores() -> int:
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:
        return os.cpu_count() or 1


class Interrupted(KeyboardInterrupt):
    """A signal (``signum``) stopped training at ``step``; ``saved`` is the step that ``--resume`` continues
    from (None: no resume state; a new run's folder is then removed, so the same command starts it again)."""

    def __init__(self, signum: int, step: int, saved: int | None, config: TrainConfig):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.step, self.saved, self.config = signum, step, saved, config


def train(config: TrainConfig) -> Path:
    """Train as configured and return the run folder (see the module docstring for its layout). Ctrl-C or
    (within ``interruptible()``) SIGTERM/SIGHUP raise ``Interrupted``: checkpoints and resume state are each
    published whole (never a partial folder), so the run continues with ``--resume``."""
    run = _Run(config)
    try:
        with _cpu_settings(run.r["device"], config.threads):
            run.setup()
            if run.step < run.r["steps"]:
                run.run()
            run.finish()
    except KeyboardInterrupt as e:
        if run.saved_step is None and not config.resume:
            _remove_new_run(run.dir, run.created)
        else:  # the record says the run stopped, not that it is still running
            with contextlib.suppress(Exception):  # a stop during set-up has no record to update yet
                run.write_run_json("interrupted")
        raise Interrupted(getattr(e, "signum", signal.SIGINT), run.step, run.saved_step, config) from None
    return run.dir


def _remove_new_run(folder: Path, created: Path | None) -> None:
    """What a new run wrote before its first resume save (its folder was absent or empty at the start)."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    with contextlib.suppress(OSError):
        for p in folder.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _stopped_line(e: Interrupted, argv: list[str]) -> str:
    """One line: where the run stopped and the exact command that continues (or restarts) it."""
    head = f"experiments.lm.train: stopped by {signal.Signals(e.signum).name} at step {e.step}"
    cmd = "python -m experiments.lm.train "
    if e.saved is None and not e.config.resume:
        return f"{head}, before anything was saved; start again with: {cmd}{shlex.join(argv)}"
    args = argv if "--resume" in argv else [*argv, "--resume"]
    saved = f"saved at step {e.saved}" if e.saved is not None else "its resume state unchanged"
    return f"{head}; {e.config.out} is {saved}; continue with: {cmd}{shlex.join(args)}"


# ---------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
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
    return p


def config_from_args(argv=None) -> TrainConfig:
    """TrainConfig from command-line flags; with ``--resume`` the run's saved config fills the rest."""
    given = vars(_parser().parse_args(argv))
    base: dict = {}
    if given.get("resume"):
        rec = Path(given["out"]) / "run.json"
        if rec.is_file():
            saved = json.loads(rec.read_text())["config"]
            base = {k: v for k, v in saved.items() if k not in _RESUME_FREE}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    merged = {k: v for k, v in {**base, **given}.items() if k in fields}
    merged.setdefault("progress", True)
    return TrainConfig(**merged)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        config = config_from_args(argv)
        with interruptible():  # SIGTERM/SIGHUP unwind like Ctrl-C
            train(config)
    except Interrupted as e:
        print(_stopped_line(e, argv), file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt as e:  # before training started: nothing was written
        print(f"experiments.lm.train: stopped ({e or 'SIGINT'}); nothing was written", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    except (ValueError, FileNotFoundError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
