"""Naive checkpoint averaging: load every checkpoint fully into RAM, average, save.

The baseline most people write first. Peak memory is about N model copies plus the output.

    python benchmarks/naive_merge.py -o OUT_DIR CKPT [CKPT ...]

Each CKPT is a safetensors file or a folder holding ``*.safetensors`` (shards are concatenated).
The output is ``OUT_DIR/model.safetensors`` (plus ``config.json`` copied from the first checkpoint).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors under {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state


def naive_average(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Return (1/N) Σ_j θ_j computed with every θ_j resident in memory at once."""
    states = [_load_checkpoint(p) for p in paths]
    n = len(states)
    return {name: sum(s[name] for s in states) / n for name in states[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint files or folders")
    ap.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    args = ap.parse_args()

    merged = naive_average(args.checkpoints)
    args.output.mkdir(parents=True, exist_ok=True)
    save_file(merged, args.output / "model.safetensors", metadata={"format": "pt"})
    first = args.checkpoints[0]
    config = (first if first.is_dir() else first.parent) / "config.json"
    if config.exists():
        shutil.copy(config, args.output / "config.json")


if __name__ == "__main__":
    main()
