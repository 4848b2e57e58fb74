"""A transformers ``TrainerCallback`` that keeps online merges during ``Trainer.train()`` (needs
transformers; ``import extramerge.online`` does not import this module).

    trainer = Trainer(model, args, ...)
    add_online_merging(trainer, "ema:0.999,sma:8,extra:0.5@4", every=10)  # or callbacks=[...]

- on_step_end: ``merger.update(state.global_step)`` (an update every ``every`` steps);
- on_evaluate: the held-out loss of each merge that has a value, the weights swapped in and back, added
  to the metrics ``Trainer.evaluate`` returns as ``eval_loss_<name>`` and appended to
  ``state.log_history`` (the Trainer has logged its own metrics before callbacks see them);
- on_save: each merge written as ``OUTPUT_DIR/online/<name>/checkpoint-N/`` (an HF folder with the
  checkpoint's config; beside the checkpoint, not inside it, which is an input of the write); merges whose
  ``checkpoint-N`` the Trainer has rotated away (``save_total_limit``) are removed with it.

The held-out loss of a merge is computed as ``eval_loss`` is when the callback knows its Trainer
(``add_online_merging(trainer, ...)``, or ``callback.attach(trainer)``): by ``trainer.evaluation_loop`` on
the same dataloader (Trainer's token-count normalisation, its distributed gathering). Without it,
``dataloader_loss``: the batch-size-weighted mean of the model's own loss, which for causal LMs differs
from ``eval_loss`` by the Trainer's normalisation (it divides by the unshifted label count). The merges
start afresh on ``resume_from_checkpoint``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback

from extramerge.io import CheckpointError, open_checkpoint
from rivervalley.common.publish import own_json

from .merger import OnlineMerger

__all__ = ["OnlineMergeCallback", "add_online_merging", "dataloader_loss"]


@torch.no_grad()
def dataloader_loss(model, dataloader) -> float:
    """Σ_b loss_b · n_b / Σ_b n_b over the batches of ``dataloader`` (dicts the model takes, with labels)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for batch in dataloader:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            n = len(batch["labels"] if "labels" in batch else next(iter(batch.values())))
            total += float(model(**batch).loss) * n
            count += n
    finally:
        model.train(was)
    if count == 0:
        raise ValueError("the eval dataloader yielded no batches")
    return total / count


class OnlineMergeCallback(TrainerCallback):
    """Online merges of the Trainer's model (see the module docstring); ``merger`` is the
    ``OnlineMerger`` once training has begun. ``averages``, ``every``, ``device``, ``dtype`` as
    ``OnlineMerger`` takes them; ``evaluate`` / ``save`` turn the eval and save hooks off."""

    def __init__(
        self, averages="ema:0.999", every: int = 1, *, device=None, dtype=None, evaluate=True, save=True
    ):
        self.kw = {"averages": averages, "every": every, "device": device, "dtype": dtype}
        self.evaluate, self.save = evaluate, save
        self.merger: OnlineMerger | None = None
        self.trainer = None

    def attach(self, trainer) -> OnlineMergeCallback:
        """Evaluate the merges with ``trainer.evaluation_loop``, exactly as ``eval_loss`` is computed."""
        self.trainer = trainer
        return self

    def _loss(self, name: str, model, dataloader) -> float:
        if self.trainer is None:
            return dataloader_loss(model, dataloader)
        out = self.trainer.evaluation_loop(
            dataloader, f"Evaluation ({name})", prediction_loss_only=True, metric_key_prefix="eval"
        )
        return float(out.metrics["eval_loss"])

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.merger is None:
            self.merger = OnlineMerger(model, **self.kw)

    def on_step_end(self, args, state, control, **kwargs):
        self.merger.update(state.global_step)

    def on_evaluate(self, args, state, control, metrics=None, model=None, eval_dataloader=None, **kwargs):
        if not self.evaluate or self.merger is None or eval_dataloader is None:
            return
        losses = {}
        for name in self.merger.ready_names():
            with self.merger.swapped(name):
                losses[f"eval_loss_{name}"] = self._loss(name, model, eval_dataloader)
        if losses:
            if metrics is not None:
                metrics.update(losses)
            state.log_history.append({**losses, "step": state.global_step})

    def on_save(self, args, state, control, model=None, **kwargs):
        if not self.save or self.merger is None:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        try:
            template = open_checkpoint(folder)
        except CheckpointError:
            template = None  # not an HF folder we can read: plain safetensors files instead
        root = Path(args.output_dir) / "online"
        for name in self.merger.ready_names():
            self.merger.save(
                name,
                root / name / folder.name,
                fmt="hf-safetensors" if template is not None else "safetensors",
                template=template,
                force=True,
            )
        _drop_rotated(root, Path(args.output_dir))


def _drop_rotated(root: Path, output_dir: Path) -> None:
    """Remove our merges of checkpoints the Trainer has deleted (only folders holding our merge.json)."""
    for merge in root.glob("*/checkpoint-*"):
        if not (output_dir / merge.name).exists() and own_json(merge / "merge.json", "tool", "extramerge"):
            shutil.rmtree(merge, ignore_errors=True)


def add_online_merging(trainer, averages="ema:0.999", every: int = 1, **kwargs) -> OnlineMergeCallback:
    """Add an ``OnlineMergeCallback`` bound to ``trainer`` (its merges evaluated as ``eval_loss`` is)."""
    callback = OnlineMergeCallback(averages, every, **kwargs).attach(trainer)
    trainer.add_callback(callback)
    return callback
