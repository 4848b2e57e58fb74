"""Where every byte of a sharded output goes: the shard split and names, safetensors headers and the
offset of each tensor's data (``safetensors_files``), and the HF index json. The streaming writer
(``write_safetensors``) and the ranks of a distributed merge use the same plan, so both produce the same
bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dtypes import ST_DTYPES, ST_METADATA, TensorInfo, is_torch, to_numpy
from .errors import CheckpointError
from .raw import DIRECT_IO_MIN_BYTES, FileWriter

__all__ = [
    "FileLayout",
    "shard_plan",
    "shard_names",
    "safetensors_files",
    "write_safetensors",
    "write_index",
    "write_safetensors_index",
]


def shard_plan(infos: Mapping[str, TensorInfo], shard_size: int) -> list[list[str]]:
    """Greedy split in order: a new shard starts when the next tensor would exceed ``shard_size``."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, info in infos.items():
        if shards[-1] and used + info.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += info.nbytes
    return shards


def shard_names(stem: str, ext: str, n: int) -> list[str]:
    """HF shard file names: STEM.EXT for one shard, else STEM-0000k-of-0000n.EXT."""
    if n == 1:
        return [f"{stem}{ext}"]
    return [f"{stem}-{k + 1:05d}-of-{n:05d}{ext}" for k in range(n)]


def _safetensors_header(infos: Sequence[TensorInfo], metadata: Mapping[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        header[ST_METADATA] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for info in infos:
        if info.name == ST_METADATA:
            raise CheckpointError(f"tensor {ST_METADATA!r}: safetensors reserves this name for its metadata")
        if info.dtype_str not in ST_DTYPES:
            raise CheckpointError(
                f"tensor '{info.name}': dtype {info.dtype_name} cannot be stored in safetensors"
            )
        header[info.name] = {
            "dtype": info.dtype_str,
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header with spaces to 8-byte alignment
    return struct.pack("<Q", len(raw)) + raw


@dataclass
class FileLayout:
    """One safetensors file of an output: its name, header bytes, tensors in order, and where each tensor's
    data starts in the file (``offsets``); ``size`` is the whole file's length."""

    name: str
    header: bytes
    tensors: list[str]
    offsets: dict[str, int]
    size: int


def safetensors_files(
    infos: Mapping[str, TensorInfo],
    fname: str,
    *,
    shard_stem: str | None = None,
    shard_size: int,
    metadata: Mapping[str, str] | None,
    aliases: Mapping[str, str],
) -> list[FileLayout]:
    """The files of a safetensors output of ``infos`` in order: one file ``fname`` (tied ``aliases`` in its
    metadata), or with a ``shard_stem`` an HF folder's STEM.safetensors, or STEM-0000k-of-0000K.safetensors
    shards above ``shard_size``. The one layout both the streaming writer and the ranks of a distributed
    merge (``io.ranged``) write, so their outputs are byte-identical."""
    meta = dict(metadata or {})
    if shard_stem is not None:
        meta = {"format": "pt", **meta}
        shards = shard_plan(infos, shard_size)
        names = shard_names(shard_stem, ".safetensors", len(shards))
    else:
        shards, names = [list(infos)], [fname]
        if aliases:
            meta["extramerge.aliases"] = json.dumps(dict(aliases), sort_keys=True)
        meta = {"format": "pt", **meta} if meta else meta
    files = []
    for shard, name in zip(shards, names, strict=True):
        header = _safetensors_header([infos[n] for n in shard], meta)
        offsets, at = {}, len(header)
        for n in shard:
            offsets[n] = at
            at += infos[n].nbytes
        files.append(FileLayout(name, header, shard, offsets, at))
    return files


def _byte_view(t) -> memoryview:
    """The bytes of a numpy array or CPU tensor, flattened (a copy only if it is not contiguous)."""
    if is_torch(t):
        t = t.contiguous().reshape(-1)
        return memoryview(to_numpy(t).view(np.uint8)) if t.numel() else memoryview(b"")
    return memoryview(np.ascontiguousarray(t).reshape(-1).view(np.uint8))


def write_safetensors(
    folder: Path, stream, files: Sequence[FileLayout], *, fsync: bool, direct_io: bool | None
) -> tuple[int, float]:
    """Stream ``files`` (``safetensors_files``) into ``folder``: each header, then the pieces of each of its
    tensors as ``stream.pieces(name)`` yields them. ``direct_io`` writes with O_DIRECT (None: when fsync is
    on and the file has at least DIRECT_IO_MIN_BYTES). Returns (tensor bytes written, seconds in fsync)."""
    written, t_sync = 0, 0.0
    for layout in files:
        size = layout.size - len(layout.header)
        direct = fsync and size >= DIRECT_IO_MIN_BYTES if direct_io is None else direct_io
        f = FileWriter(folder / layout.name, direct=direct, writeback=fsync)
        try:
            f.write(memoryview(layout.header))
            for name in layout.tensors:
                for piece in stream.pieces(name):
                    data = _byte_view(piece)
                    f.write(data)
                    written += len(data)
        except BaseException:
            f.abort()
            raise
        t_sync += f.close(fsync)
    return written, t_sync


def write_safetensors_index(folder: Path, files: Sequence[FileLayout], infos) -> list[str]:
    """model.safetensors.index.json in ``folder`` when the output has several shards; its name, or []."""
    if len(files) < 2:
        return []
    shards = [f.tensors for f in files]
    return [write_index(folder, "model.safetensors.index.json", infos, shards, [f.name for f in files], {})]


def write_index(folder: Path, index_name: str, infos, shards, files, extra_meta) -> str:
    """An HF index json (total size and parameters, tensor → shard file) in ``folder``; returns its name."""
    weight_map = {n: f for shard, f in zip(shards, files, strict=False) for n in shard}
    total = sum(i.nbytes for i in infos.values())
    params = sum(i.numel for i in infos.values())
    doc = {
        "metadata": {"total_size": total, "total_parameters": params, **extra_meta},
        "weight_map": weight_map,
    }
    (folder / index_name).write_text(json.dumps(doc, indent=2) + "\n")
    return index_name
