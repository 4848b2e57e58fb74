"""Checkpoint names on disk: the format names, weight-file suffixes, the training step carried by a
checkpoint's name, and where a merge's record (merge.json) lies beside its output."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["FORMATS", "TORCH_SUFFIXES", "WEIGHT_SUFFIXES", "parse_step", "record_path"]

FORMATS = ("hf-safetensors", "hf-bin", "safetensors", "torch")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)


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


def record_path(output: Path) -> Path:
    """merge.json beside the output: inside an output folder, or <stem>.merge.json next to an output file."""
    if output.suffix in WEIGHT_SUFFIXES:
        return output.with_name(output.name[: -len(output.suffix)] + ".merge.json")
    return output / "merge.json"
