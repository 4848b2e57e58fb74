"""Checkpoint names on disk: weight-file suffixes, the training step carried by a checkpoint's name,
where a merge's record (merge.json) lies beside its output, and the names of torch.distributed.checkpoint
(DCP) and Megatron ``torch_dist`` checkpoints: their metadata files, the iteration folders and tracker
file of a Megatron run, and which stored keys are training state. (Format names: ``formats``.)"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = [
    "TORCH_SUFFIXES",
    "WEIGHT_SUFFIXES",
    "DCP_METADATA",
    "MEGATRON_CONFIG",
    "MEGATRON_COMMON",
    "MEGATRON_TRACKER",
    "TRAINING_STATE_KEYS",
    "COPIED_STATE_KEYS",
    "GAMMA_KEY",
    "STEP_KEY",
    "parse_step",
    "record_path",
    "is_training_state",
    "megatron_iteration",
]

DCP_METADATA = ".metadata"
MEGATRON_CONFIG = "metadata.json"  # {"sharded_backend": "torch_dist", ...}: marks a Megatron iteration
MEGATRON_COMMON = "common.pt"  # Megatron's non-sharded state (argparse args: a pickle, never loaded)
MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"
# Top-level names of training state rather than model weights: optimizer moments, schedulers, loss scaler,
# data loader and RNG state (nanoGPT, Lightning, torchtitan, Megatron, plain FSDP2 loops). A merged
# checkpoint leaves them out: the first component of a DCP key (``is_training_state``), a top-level entry
# of a PyTorch training checkpoint (``io.torchfile``).
TRAINING_STATE_KEYS = frozenset({
    "optimizer", "optimizers", "optimizer_states", "optim", "optimizer_state", "optim_state",
    "lr_scheduler", "lr_schedulers", "scheduler", "dataloader", "rng_state", "rng_states", "scaler",
    "grad_scaler", "train_state",
})  # fmt: skip
# ... of which these are copied from the newest checkpoint rather than dropped (counters and data position,
# not tensors to merge): a torch file's top-level entries, a DCP checkpoint's byte entries.
COPIED_STATE_KEYS = frozenset({"dataloader", "train_state"})
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)

# Safetensors metadata of a power-EMA snapshot (written by extramerge.online, read by the posthoc-ema
# method): its exponent γ and the training step it was taken at.
GAMMA_KEY = "extramerge.gamma"
STEP_KEY = "extramerge.step"


def parse_step(name: str) -> int | None:
    """Training step in a checkpoint's name: step_001000, checkpoint-2000, iter_0003000, model_004000.pt,
    ckpt-5000.pt, global_step6000, step7000, 8000 ... ; None when the name carries no step."""
    stem = Path(str(name).rstrip("/")).name
    for suffix in (*WEIGHT_SUFFIXES, ".index.json"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    hits = re.findall(r"(?:step|iter|iteration|checkpoint|ckpt|model|it|epoch)[_\-.]?(\d+)", stem, re.I)
    if hits:
        return int(hits[-1])
    m = re.fullmatch(r"(?:.*[_\-])?(\d+)", stem)
    return int(m.group(1)) if m else None


def is_training_state(key: str) -> bool:
    """Whether a DCP key is training state (``optimizer.state.…``, ``lr_scheduler``, ...), not a weight."""
    return key.split(".", 1)[0].split("/", 1)[0] in TRAINING_STATE_KEYS


def megatron_iteration(step: int) -> str:
    """Megatron's iteration folder name: iter_0001000."""
    return f"iter_{int(step):07d}"


def record_path(output: Path) -> Path:
    """merge.json beside the output: inside an output folder, or <stem>.merge.json next to an output file."""
    if output.suffix in WEIGHT_SUFFIXES:
        return output.with_name(output.name[: -len(output.suffix)] + ".merge.json")
    return output / "merge.json"
