"""``GramData``, what the one-pass analysis keeps: Gram matrices of the checkpoints' differences from a
reference, overall and per tensor, saved as and read back from ``gram.npz``.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from extramerge.io import CheckpointError, safety

__all__ = ["GramData", "load_gram"]


@dataclass
class GramData:
    """Gram matrices of differences from checkpoint ``reference`` (0-based), overall and per tensor."""

    gram: np.ndarray  # [N, N] float64
    names: list[str]  # tensors included (floating point), in pass order
    per_tensor: np.ndarray  # [T, N, N] float64, sums to ``gram``
    numel: np.ndarray  # [T] elements per tensor
    ref_norm2: np.ndarray  # [T] ‖θ_ref‖² per tensor
    reference: int
    paths: list[str] = field(default_factory=list)
    steps: list[int | None] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # non-float tensors, not part of the geometry

    @property
    def n(self) -> int:
        return int(self.gram.shape[0])

    @property
    def ref_norm(self) -> float:
        return math.sqrt(float(self.ref_norm2.sum()))

    def save(self, path) -> None:
        np.savez(
            path,
            gram=self.gram,
            names=np.array(self.names, dtype=str),
            per_tensor=self.per_tensor,
            numel=self.numel,
            ref_norm2=self.ref_norm2,
            reference=np.array(self.reference),
            paths=np.array(self.paths, dtype=str),
            steps=np.array([-1 if s is None else s for s in self.steps], dtype=np.int64),
            skipped=np.array(self.skipped, dtype=str),
        )


def load_gram(path) -> GramData:
    """Read a ``gram.npz`` written by ``GramData.save`` (for example by ``extramerge analyze``): a regular
    file, no pickles, every array present with consistent shapes and finite values, else one
    CheckpointError naming the file."""
    fd = safety.open_regular(Path(path))  # np.load would block on a FIFO
    with os.fdopen(fd, "rb") as f:
        # a zip bomb is refused before numpy allocates what it claims, on the file numpy then reads
        safety.check_npz(f, Path(path), "a gram.npz written by extramerge analyze")
        return _gram_of(f, path)


def _gram_of(f, path) -> GramData:
    try:
        with np.load(f, allow_pickle=False) as z:
            data = GramData(
                gram=np.asarray(z["gram"], dtype=np.float64),
                names=[str(s) for s in z["names"]],
                per_tensor=np.asarray(z["per_tensor"], dtype=np.float64),
                numel=z["numel"],
                ref_norm2=np.asarray(z["ref_norm2"], dtype=np.float64),
                reference=int(z["reference"]),
                paths=[str(s) for s in z["paths"]],
                steps=[None if s < 0 else int(s) for s in z["steps"]],
                skipped=[str(s) for s in z["skipped"]],
            )
    except (KeyError, ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile) as e:
        what = "a required array is missing" if isinstance(e, KeyError) else type(e).__name__
        raise CheckpointError(f"{path}: not a gram.npz written by extramerge analyze ({what})") from None
    n, t = data.gram.shape[0] if data.gram.ndim == 2 else -1, len(data.names)
    ok = data.gram.shape == (n, n) and data.per_tensor.shape == (t, n, n) and len(data.paths) == n
    ok = ok and len(data.numel) == t and len(data.ref_norm2) == t and 0 <= data.reference < n
    if not ok or not (np.isfinite(data.gram).all() and np.isfinite(data.per_tensor).all()):
        raise CheckpointError(f"{path}: corrupt gram.npz (inconsistent shapes or non-finite values)")
    return data
