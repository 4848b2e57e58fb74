"""Writing a DCP checkpoint (``.metadata`` + ``__K_0.distcp`` files) that torch's own reader loads
(``torch.distributed.checkpoint.load``), streamed with bounded memory.

The layout is a pure function of the tensors and two sizes (``plan_dcp``): a tensor larger than
``chunk_bytes`` (256 MiB, or the file size if smaller) is cut into dim-0 row blocks, each its own DCP
chunk; chunks go, in order, into files of at most about ``file_bytes`` each. Each file is written on its
own (``write_distcp``: a chunk at a time, each a ``torch.save`` archive, as torch's FileSystemWriter
stores them), so different processes may write different files; ``write_metadata`` then builds
``.metadata`` from the gathered storage entries (sent between processes as JSON: ``written_json``) with
torch's own metadata classes and pickles it as ``FileSystemWriter.finish`` does. Byte entries (pickled
objects a trainer stored: train state, data loader state, Megatron's common state) are copied as raw bytes
from the newest input, never unpickled.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..dtypes import TensorInfo, is_torch, to_torch
from ..layout import DCP_METADATA

__all__ = ["CHUNK_BYTES", "FILE_BYTES", "OutChunk", "Written", "plan_dcp", "distcp_name", "write_distcp",
           "write_metadata", "chunk_feed", "written_json", "written_from_json"]  # fmt: skip

CHUNK_BYTES = 256 * 2**20  # a larger tensor is stored as dim-0 row blocks of at most this size
FILE_BYTES = 5 * 2**30


@dataclass(frozen=True)
class OutChunk:
    """Chunk of output tensor ``name``: elements [start, stop) of the flattened tensor, the box
    [offsets, offsets + sizes)."""

    name: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    start: int
    stop: int


@dataclass(frozen=True)
class Written:
    """Where a written entry lies: ``name`` (chunk ``offsets``, None for a byte entry) at [offset,
    offset + length) of ``file``."""

    name: str
    offsets: tuple[int, ...] | None
    file: str
    offset: int
    length: int


def _chunks_of(info: TensorInfo, chunk_bytes: int) -> list[OutChunk]:
    shape = info.shape
    if info.nbytes <= chunk_bytes or not shape or shape[0] <= 1:
        return [OutChunk(info.name, (0,) * len(shape), shape, 0, info.numel)]
    row = math.prod(shape[1:])
    step = max(1, chunk_bytes // max(row * info.itemsize, 1))
    return [
        OutChunk(
            info.name,
            (r, *(0,) * (len(shape) - 1)),
            (min(step, shape[0] - r), *shape[1:]),
            r * row,
            min(r + step, shape[0]) * row,
        )  # fmt: skip
        for r in range(0, shape[0], step)
    ]


def distcp_name(k: int) -> str:
    return f"__{k}_0.distcp"


def plan_dcp(
    infos: Mapping[str, TensorInfo], *, file_bytes: int = FILE_BYTES, chunk_bytes: int | None = None
) -> list[list[OutChunk]]:
    """The chunks of each output file, in order (file k is ``distcp_name(k)``): a deterministic function
    of the tensors (names, shapes, dtypes, order) and the two sizes (``chunk_bytes``: CHUNK_BYTES or
    ``file_bytes`` if smaller, so a file exceeds ``file_bytes`` only by a row wider than it)."""
    chunk_bytes = min(CHUNK_BYTES, file_bytes) if chunk_bytes is None else chunk_bytes
    files: list[list[OutChunk]] = [[]]
    used = 0
    for info in infos.values():
        for c in _chunks_of(info, chunk_bytes):
            nbytes = (c.stop - c.start) * info.itemsize
            if files[-1] and used + nbytes > file_bytes:
                files.append([])
                used = 0
            files[-1].append(c)
            used += nbytes
    return files


def written_json(stored: Iterable[Written]) -> bytes:
    """Storage entries as JSON bytes (what one process sends the process that writes ``.metadata``)."""
    rows = [
        [s.name, None if s.offsets is None else list(s.offsets), s.file, s.offset, s.length] for s in stored
    ]
    return json.dumps(rows, separators=(",", ":")).encode()


def written_from_json(raw: bytes) -> list[Written]:
    """The entries ``written_json`` encoded (ValueError if ``raw`` is not such a list)."""
    try:
        rows = json.loads(raw)
        return [
            Written(str(n), None if o is None else tuple(int(x) for x in o), str(f), int(at), int(size))
            for n, o, f, at, size in rows
        ]
    except (TypeError, ValueError) as e:
        raise ValueError(f"malformed DCP storage entries from another process: {e}") from None


def chunk_feed(pieces: Callable[[str], Iterable], infos: Mapping[str, TensorInfo]) -> Callable:
    """``data(chunk) -> tensor`` for chunks asked for in stream order, filled from ``pieces(name)`` (the
    flat pieces of each tensor, in order; a piece may straddle chunks). One chunk buffer per shape and
    dtype is reused: each is written before the next chunk is asked for."""
    import torch

    state: dict = {"name": None, "it": None, "rest": None}
    buffers: dict = {}

    def data(c: OutChunk):
        info = infos[c.name]
        if state["name"] != c.name:
            state.update(name=c.name, it=iter(pieces(c.name)), rest=None)
        key = (c.sizes, info.dtype)
        buf = buffers.get(key)
        if buf is None:
            buffers.clear()  # keep one buffer: memory stays one chunk
            buf = buffers[key] = torch.empty(c.sizes, dtype=info.dtype)
        flat, pos, need = buf.view(-1), 0, c.stop - c.start
        while pos < need:
            piece = state["rest"]
            if piece is None:
                piece = next(state["it"], None)
                if piece is None:
                    raise ValueError(f"tensor stream ended before tensor '{c.name}' was complete")
                piece = (piece if is_torch(piece) else to_torch(piece)).reshape(-1)
            n = min(need - pos, piece.numel())
            flat[pos : pos + n].copy_(piece[:n])
            state["rest"] = piece[n:] if n < piece.numel() else None
            pos += n
        if c.stop == info.numel:  # the tensor's last chunk: nothing may be left of its pieces
            rest = [state["rest"], *state["it"]]
            if any(p is not None and math.prod(p.shape) > 0 for p in rest):
                raise ValueError(f"tensor '{c.name}': pieces exceed its {info.numel} elements")
        return buf

    return data


def write_distcp(
    folder: Path,
    k: int,
    chunks: Iterable[OutChunk],
    data: Callable[[OutChunk], object],
    objects: Iterable[tuple[str, bytes]] = (),
    *,
    fsync: bool = True,
) -> tuple[list[Written], int, float]:
    """Write file ``distcp_name(k)`` in ``folder``: the byte ``objects`` (name, raw bytes) first, then each
    chunk's tensor (``data(chunk)``) as a torch.save archive. Returns (storage entries, tensor bytes,
    seconds spent in fsync)."""
    import torch

    fname = distcp_name(k)
    stored: list[Written] = []
    written = 0
    with open(folder / fname, "wb") as f:
        for name, raw in objects:
            at = f.tell()
            f.write(raw)
            stored.append(Written(name, None, fname, at, len(raw)))
        for c in chunks:
            t = data(c)
            at = f.tell()
            torch.save(t, f)
            stored.append(Written(c.name, c.offsets, fname, at, f.tell() - at))
            written += t.numel() * t.element_size()
        t_sync = _synced(f, fsync)
    return stored, written, t_sync


def write_metadata(
    folder: Path,
    infos: Mapping[str, TensorInfo],
    plan: list[list[OutChunk]],
    stored: Iterable[Written],
    planner_data: Mapping[str, tuple] | None = None,
    *,
    fsync: bool = True,
) -> float:
    """Write ``folder/.metadata`` for the tensors of ``plan`` and the ``stored`` entries of every file
    (byte entries are those with ``offsets`` None). Returns the seconds spent in fsync."""
    import torch
    from torch.distributed.checkpoint import metadata as md
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    # One object per distinct string: pickle writes a repeated object once and refers back to it, so the
    # bytes must not depend on where each string came from (this process, or JSON from another).
    strings: dict[str, str] = {}

    def one(x: str) -> str:
        return strings.setdefault(x, x)

    sdm: dict = {
        one(name): md.TensorStorageMetadata(md.TensorProperties(dtype=info.dtype), torch.Size(info.shape), [])
        for name, info in infos.items()
    }
    chunk_no: dict = {}
    for c in (c for file in plan for c in file):
        chunk_no[(c.name, c.offsets)] = len(sdm[c.name].chunks)
        sdm[c.name].chunks.append(md.ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)))
    storage: dict = {}
    for s in stored:
        if s.offsets is None:
            sdm[one(s.name)] = md.BytesStorageMetadata()
            key = md.MetadataIndex(one(s.name))
        else:
            key = md.MetadataIndex(one(s.name), s.offsets, chunk_no[(s.name, s.offsets)])
        storage[key] = _StorageInfo(one(s.file), s.offset, s.length)
    planner = {name: tuple(map(one, (planner_data or {}).get(name, (name,)))) for name in sdm}
    meta = md.Metadata(sdm, planner_data=planner, storage_data=storage, storage_meta=md.StorageMeta())
    meta.version = _dcp_version()
    with open(folder / DCP_METADATA, "wb") as f:
        pickle.dump(meta, f)  # as torch's FileSystemWriter.finish writes it
        return _synced(f, fsync)


def _synced(f, fsync: bool) -> float:
    """Flush ``f`` and, with ``fsync``, sync it to disk; the seconds that took."""
    f.flush()
    t0 = time.perf_counter()
    if fsync:
        os.fsync(f.fileno())
    return time.perf_counter() - t0 if fsync else 0.0


def _dcp_version() -> str:
    from torch.distributed.checkpoint import filesystem

    return getattr(filesystem, "CURRENT_DCP_VERSION", "1.0.0")
