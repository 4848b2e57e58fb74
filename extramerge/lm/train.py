"""Train a byte-level GPT-2 or LLaMA and write late-stage checkpoints as Hugging Face folders.

    python -m experiments.lm.train --arch gpt2 --size tiny --optimizer adamw --schedule wsd \\
        --steps 1000 --ckpt-every 50 -o runs/tiny_wsd          # add --resume to continue after a stop

Run folder (``-o RUN``)::

    RUN/run.json            config, resolved defaults, schedule, params, tokens/step, checkpoints (with
                            their lr and losses), timings
    RUN/log.jsonl           {step, lr, train_loss, grad_norm, tokens, elapsed} every --log-every steps;
                            {step, val_loss} every --eval-every steps and at every checkpoint
    RUN/data/               the prepared corpus (extramerge.lm.data.prepare): {train,val,test}.npy, ...
    RUN/step_000700/ ...    checkpoints: config.json, model.safetensors (fp32), generation_config.json,
                            tokenizer files; opened by AutoModelForCausalLM and extramerge alike
    RUN/resume/optimizer.pt resume state (model, optimizers, step, RNG states), written at every checkpoint
                            and every --save-every steps; the name keeps extramerge's scanner away from it
    RUN/resume/online.pt    with --online-merge: the online merges' state (extramerge.online), saved with it
    RUN/online/NAME/step_000700/  with --online-save: each online merge at each checkpoint (an HF folder)

With ``--online-merge SPEC`` (e.g. ``ema:0.99,sma:8,extra:0.5@4``) an ``extramerge.online.OnlineMerger``
is updated every ``--online-every`` steps, and each evaluation also logs ``val_loss_NAME``: the held-out
loss with that merge's weights swapped in (merges that have too few updates yet are left out).

Conventions: ``--steps`` counts optimizer updates; ``step_000700`` holds the weights after 700 updates, and
its recorded ``lr`` is the one that update used (``schedule(699)``: schedules are 0-based). Checkpoints are
written at ``ckpt_from, ckpt_from + ckpt_every, ...`` and at the final step; by default
``ckpt_from = steps - ckpt_every · floor(0.3 · steps / ckpt_every)``: a grid that ends on the final step and
reaches back over the last 30% of training (1000 steps, every 100: 700, 800, 900, 1000). ``--stop-at N``
pauses after step N (resume state saved); ``--resume`` continues it, as it does after Ctrl-C, SIGTERM or
SIGHUP (one line names the step the run is saved at and the command; exit 128 + signal); a run started
ignoring SIGINT or SIGHUP (``cmd &`` in a script, ``nohup``) keeps ignoring it, SIGTERM always stops it.
Every param group's lr is ``base_lr · schedule(step) / peak``, so the Muon matrices (``--lr``) and the
AdamW rest (``--adam-lr``) follow the same shape. Batches are random windows of ``seq_len + 1`` tokens of
train.npy drawn by a numpy Generator seeded from ``--seed`` (model init uses ``torch.manual_seed(seed)``), so
the same seed gives the same losses, and ``--resume`` reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from extramerge.eval.model import packed_inputs
from extramerge.io import open_checkpoint
from extramerge.online import OnlineMerger, parse_spec
from rivervalley.common.progress import progress_bar
from rivervalley.common.publish import deferred, write_file
from rivervalley.common.resources import available_cores, flush_denormals

from . import data as lmdata
from .batches import Batches, eval_windows
from .checkpointing import (
    check_run_folder,
    load_resume,
    remove_new_run,
    save_checkpoint,
    save_resume,
    write_run_json,
)
from .config import TrainConfig, build_schedule, checkpoint_steps_with_final, resolve
from .models import build_model, count_params
from .optimizers import build_optimizers
from .tokenizer import build_tokenizer

__all__ = ["Run", "train", "Interrupted", "ONLINE_FILE"]

ONLINE_FILE = "online.pt"  # RUN/resume/online.pt: the online merges' state

# -------------------------------------------------------------------------------------------------- train


def _lm_loss(model, chunk: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=chunk[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), chunk[:, 1:].reshape(-1))


class Run:
    """The state of one training run and the few things it does besides stepping."""

    def __init__(self, config: TrainConfig):
        self.t0 = time.perf_counter()
        self.config = config
        self.resolved = resolve(config)
        self.dir = Path(config.out)
        check_run_folder(self.dir, config.resume)
        self.device = torch.device(self.resolved.device)
        self.cuda = self.device.type == "cuda"
        self.timings = {"train_s": 0.0, "eval_s": 0.0, "ckpt_s": 0.0, "resume_s": 0.0, "setup_s": 0.0}
        self.elapsed0 = 0.0  # wall time of earlier segments (before a resume)
        self.checkpoints: list[dict] = []
        self.step = 0
        self.loss_sum = torch.zeros((), device=self.device)
        self.loss_n = 0
        self.last_train_loss = self.last_val_loss = None
        self.online: OnlineMerger | None = None
        self.last_online: dict[str, float] = {}  # val_loss_NAME of the online merges at the last evaluation
        self.saved_step: int | None = None  # step of the last resume save (what --resume continues from)
        self.created: Path | None = None  # the highest folder this run created

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
        r = self.resolved
        data_dir = lmdata.prepare(r.corpus, self.dir / "data", min_tokens=r.seq_len + 1)
        self.meta = lmdata.load_meta(data_dir)
        self.train_tokens = lmdata.load_split(data_dir, "train")
        self.val_tokens = lmdata.load_split(data_dir, "val")
        torch.manual_seed(r.seed)
        self.model = build_model(
            r.arch, r.size, n_layer=r.n_layer, d_model=r.d_model, n_head=r.n_head, seq_len=r.seq_len
        ).to(self.device)
        self.model.train()
        self.n_params = count_params(self.model)
        self.optimizers = build_optimizers(self.model, r)
        if r.online_merge:
            spec = parse_spec(r.online_merge, "--online-merge")
            self.online = OnlineMerger(self.model, spec, every=r.online_every, device=r.online_device)
        self.schedule = build_schedule(r)
        self.lr_factor = np.asarray(self.schedule(np.arange(r.steps)), dtype=np.float64) / self.schedule.peak
        self.batches = Batches(self.train_tokens, r.batch_size, r.seq_len, r.seed)
        self.eval_starts = eval_windows(len(self.val_tokens), r.seq_len, r.eval_batches * r.batch_size)
        self.ckpt_steps = checkpoint_steps_with_final(r.steps, r.ckpt_every, r.ckpt_from)
        self.tokenizer = build_tokenizer()
        self.forward = torch.compile(self.model) if r.compile else self.model
        if self.config.resume:
            load_resume(self)
            self._load_online()
        else:
            (self.dir / "log.jsonl").write_text("")
        self.log = open(self.dir / "log.jsonl", "a", encoding="utf-8")  # closed in finish()
        self.timings["setup_s"] += time.perf_counter() - self.t0
        write_run_json(self, "running")

    def _autocast(self):
        if self.cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ----------------------------------------------------------------------------------------- loop
    def run(self) -> None:
        r = self.resolved
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [g for opt in self.optimizers for g in opt.param_groups]
        ckpts, log_every, clip = set(self.ckpt_steps), r.log_every, r.grad_clip
        eval_every, save_every, tps = r.eval_every, r.save_every, r.tokens_per_step
        bar = progress_bar(  # in place on a terminal, a line at most every 30 s in a log
            enabled=self.config.progress, total=r.steps, initial=self.step, unit="step", desc=self.dir.name
        )
        t_loop, first = time.perf_counter(), self.step
        side = 0.0  # time spent in evaluation / checkpoints / resume saves (not the step path)
        grad_norm = torch.zeros(())
        last = min(r.steps, r.stop_at or r.steps)
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
                if self.online is not None:
                    self.online.update(step)
                bar.update(1)
                if step % log_every == 0 or step == r.steps:
                    train_loss = float(self.loss_sum) / self.loss_n
                    self.loss_sum.zero_()
                    self.loss_n = 0
                    self.last_train_loss = train_loss
                    now = time.perf_counter()
                    self._log(
                        step=step,
                        lr=r.lr * factor,
                        train_loss=train_loss,
                        grad_norm=float(grad_norm) if clip > 0 else None,
                        tokens=step * tps,
                        elapsed=round(self.elapsed0 + now - self.t0, 3),
                    )
                    bar.set_postfix(  # shown with the next update: in a log, not a line of its own
                        refresh=False,
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
                    with deferred():  # a signal waits: a published checkpoint has its resume state
                        if is_ckpt:
                            save_checkpoint(self, factor)
                            self._save_online_merges()
                        if is_ckpt or (save_every and step % save_every == 0):
                            save_resume(self)
                            self._save_online_state()
                    side += time.perf_counter() - t_side
        except BaseException:
            bar.close()  # a stop line goes below the bar, not onto it
            raise
        bar.close()
        self.timings["train_s"] += time.perf_counter() - t_loop - side
        if self.step < r.steps and not (self.step in ckpts or (save_every and self.step % save_every == 0)):
            save_resume(self)  # paused by --stop-at
            self._save_online_state()

    def _log(self, **entry) -> None:
        self.log.write(json.dumps({k: v for k, v in entry.items() if v is not None}) + "\n")
        self.log.flush()

    # ------------------------------------------------------------------------------------ evaluation
    def _evaluate(self) -> float:
        t = time.perf_counter()
        val = self._val_loss()
        self.last_val_loss = val
        self.last_online = {}
        if self.online is not None:
            for name in self.online.ready_names():
                with self.online.swapped(name):
                    self.last_online[f"val_loss_{name}"] = self._val_loss()
        self._log(step=self.step, val_loss=val, **self.last_online)
        self.timings["eval_s"] += time.perf_counter() - t
        return val

    @torch.no_grad()
    def _val_loss(self) -> float:
        """Mean loss over the fixed validation windows."""
        self.model.eval()
        bs, offsets = self.resolved.batch_size, np.arange(self.resolved.seq_len + 1)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(0, len(self.eval_starts), bs):
            starts = self.eval_starts[i : i + bs]
            chunk = torch.from_numpy(self.val_tokens[starts[:, None] + offsets].astype(np.int64)).to(
                self.device
            )
            with self._autocast():
                total += _lm_loss(self.forward, chunk).double() * len(starts)
        self.model.train()
        return float(total) / len(self.eval_starts)

    # ----------------------------------------------------------------------------------- online merges
    def _save_online_merges(self) -> None:
        """The checkpoint's record gets the online losses; with --online-save each merge that has a value
        is written as RUN/online/NAME/step_XXXXXX/ (an HF folder with the checkpoint's config)."""
        if self.online is None:
            return
        self.checkpoints[-1].update(self.last_online)
        if not self.resolved.online_save:
            return
        t = time.perf_counter()
        name = f"step_{self.step:06d}"
        template = open_checkpoint(self.dir / name)
        for merge in self.online.ready_names():
            out = self.dir / "online" / merge / name
            self.online.save(merge, out, fmt="hf-safetensors", template=template, force=True)
        self.timings["ckpt_s"] += time.perf_counter() - t

    def _save_online_state(self) -> None:
        if self.online is not None:
            state = {"step": self.step, "online": self.online.state_dict()}
            write_file(self.dir / "resume" / ONLINE_FILE, lambda p: torch.save(state, p))

    def _load_online(self) -> None:
        """The online merges as saved with the resume state; afresh (with a warning) when that file is
        missing or from another step (a stop between the two saves)."""
        if self.online is None:
            return
        path = self.dir / "resume" / ONLINE_FILE
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            state = None
        if state is None or state["step"] != self.step:
            warnings.warn(
                f"{path}: no online state for step {self.step}; the online merges start afresh", stacklevel=2
            )
            return
        self.online.load_state_dict(state["online"])

    def tokens_per_s(self) -> float:
        return (
            self.step * self.resolved.tokens_per_step / self.timings["train_s"]
            if self.timings["train_s"]
            else 0.0
        )

    def finish(self) -> None:
        self.log.close()
        write_run_json(self, "finished" if self.step >= self.resolved.steps else "stopped")
        if self.config.progress:
            print(self.summary())

    def summary(self) -> str:
        r = self.resolved
        steps = ", ".join(str(c["step"]) for c in self.checkpoints)
        val = f"{self.last_val_loss:.4f}" if self.last_val_loss is not None else "-"
        train = f"{self.last_train_loss:.4f}" if self.last_train_loss is not None else "-"
        t = self.timings
        return "\n".join(
            [
                f"run       {self.dir}",
                f"model     {r.arch} {r.size} ({self.n_params / 1e6:.2f} M params), {r.optimizer}, "
                f"{r.schedule} lr {r.lr:g}, {r.steps} steps x {r.tokens_per_step} tokens",
                f"speed     {self.tokens_per_s():,.0f} tokens/s "
                f"({self.step / max(t['train_s'], 1e-9):.2f} steps/s; "
                f"train {t['train_s']:.1f} s, eval {t['eval_s']:.1f} s, checkpoints {t['ckpt_s']:.1f} s)",
                f"loss      train {train}, val {val} (bits/byte {_bpb(self.last_val_loss)})",
                f"ckpts     {len(self.checkpoints)}: step {steps}",
                *(
                    ["online    " + ", ".join(f"{k[9:]} {v:.4f}" for k, v in self.last_online.items())]
                    if self.last_online
                    else []
                ),
            ]
        )


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
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads or available_cores())
    try:
        with flush_denormals():
            yield
    finally:
        torch.set_num_threads(old_threads)


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
    run = Run(config)
    try:
        with _cpu_settings(run.resolved.device, config.threads), packed_inputs():  # windows are packed text
            run.setup()
            if run.step < run.resolved.steps:
                run.run()
            run.finish()
    except KeyboardInterrupt as e:
        if run.saved_step is None and not config.resume:
            remove_new_run(run.dir, run.created)
        else:  # the record says the run stopped, not that it is still running
            with contextlib.suppress(Exception):  # a stop during set-up has no record to update yet
                write_run_json(run, "interrupted")
        raise Interrupted(getattr(e, "signum", signal.SIGINT), run.step, run.saved_step, config) from None
    return run.dir
