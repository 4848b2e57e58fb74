"""Where every byte of a sharded output goes: the shard split and names, safetensors headers and the
offset of each tensor's data (``safetensors_files``), and the HF index json. The streaming writer and the
ranks of a distributed merge use the same plan, so both produce the same bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .dtypes import ST_DTYPES, TensorInfo
from .errors import CheckpointError

__all__ = [
    "FileLayout",
    "shard_plan",
    "shard_names",
    "safetensors_files",
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
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for info in infos:
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
    fmt: str,
    fname: str,
    *,
    shard_size: int,
    metadata: Mapping[str, str] | None,
    aliases: Mapping[str, str],
) -> list[FileLayout]:
    """The files of a safetensors (``fname``) or hf-safetensors (shards above ``shard_size``) output of
    ``infos`` in order: the one layout both the streaming writer and the ranks of a distributed merge
    (``io.ranged``) write, so their outputs are byte-identical."""
    meta = dict(metadata or {})
    if fmt == "hf-safetensors":
        meta = {"format": "pt", **meta}
        shards = shard_plan(infos, shard_size)
        names = shard_names("model", ".safetensors", len(shards))
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
