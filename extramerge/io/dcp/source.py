"""``DcpSource``: a DCP folder as a source of a ``Checkpoint``, read lazily per tensor.

Opening reads ``.metadata`` only (validated, see ``metadata``); a tensor's chunk archives are located on
its first use (``chunks.stored_layout``: no data read). Then:

* a tensor whose chunks are each one interval of its flattened elements and stored contiguously (a
  single chunk; FSDP2's Shard(0) row blocks; Megatron's per-layer pieces of a layer-stacked tensor) is
  served directly from the files: ranges inside one chunk as zero-copy views of the memory-mapped
  ``.distcp`` file (with page advice), ranges across chunks by pread into the caller's buffer;
* any other chunking (tensor parallelism along a later dimension, transposed chunks) is assembled a slab
  of dim-0 rows at a time (at most about ``SLAB_BYTES`` beyond the rows asked for; one slab cached per
  checkpoint), each chunk's rows read with pread.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import safety
from ..dtypes import TensorInfo, bytes_of, to_numpy, to_torch
from ..errors import CheckpointError
from ..mapped import MappedFile
from .chunks import Stored, stored_layout
from .metadata import METADATA, Chunk, DcpIndex

__all__ = ["SLAB_BYTES", "DcpSource"]

SLAB_BYTES = 64 * 2**20


@dataclass(frozen=True)
class _Layout:
    flat: bool  # every chunk one stored-contiguous interval of the flattened tensor
    chunks: tuple[Chunk, ...]  # sorted by flat start when flat
    stored: tuple[Stored, ...]
    starts: tuple[int, ...]  # flat start of each chunk (when flat)


def _flat_start(shape: tuple, c: Chunk) -> int | None:
    """Flat index of the chunk's first element if its box is one interval of the flattened tensor
    (leading dims of size 1, then one partial dim, then whole dims), else None."""
    k = -1
    for j, (o, s, d) in enumerate(zip(c.offsets, c.sizes, shape, strict=True)):
        if not (o == 0 and s == d):
            k = j
    if any(c.sizes[j] != 1 for j in range(max(k, 0))):
        return None
    start, acc = 0, 1
    for j in reversed(range(len(shape))):
        start += c.offsets[j] * acc
        acc *= shape[j]
    return start


class DcpSource:
    """The tensors of a DCP folder: ``infos`` (those ``keep`` accepts: the model's), ``state_tensors``
    (the others, e.g. optimizer state: never merged), ``objects`` (byte entries: name -> Blob)."""

    def __init__(self, folder: Path, index: DcpIndex, *, root: Path | None = None, keep: Callable = bool):
        self.folder = Path(folder)
        self.path = self.folder / METADATA
        self.index = index
        root = self.folder if root is None else root
        self.files = {name: MappedFile(self.folder / name, root) for name in index.files}
        self.paths = [self.path, *(f.path for f in self.files.values())]
        self.infos: dict[str, TensorInfo] = {}
        self.state_tensors: dict[str, TensorInfo] = {}
        for name, entry in index.tensors.items():
            (self.infos if keep(name) else self.state_tensors)[name] = TensorInfo(
                name, entry.shape, entry.dtype
            )
        self.objects = dict(index.objects)
        self.metadata: dict[str, str] = {}
        self._layouts: dict[str, _Layout] = {}
        self._lock = threading.Lock()
        self._slab = None  # (name, first row, rows tensor)

    # ----------------------------------------------------------------------------------------- layout

    def _layout(self, name: str) -> _Layout:
        lay = self._layouts.get(name)
        if lay is not None:
            return lay
        with self._lock:
            if name not in self._layouts:
                entry = self.index.tensors[name]
                what = f"tensor {safety.shown(name)}"
                stored = [
                    stored_layout(
                        self.files[c.blob.file],
                        c.blob,
                        entry.dtype,
                        c.sizes,
                        f"{what}, chunk at {list(c.offsets)}",
                    )
                    for c in entry.chunks
                ]
                starts = [_flat_start(entry.shape, c) for c in entry.chunks]
                flat = all(s is not None for s in starts) and all(s.contiguous for s in stored)
                if flat:
                    order = sorted(range(len(starts)), key=starts.__getitem__)
                    self._layouts[name] = _Layout(
                        True,
                        tuple(entry.chunks[i] for i in order),
                        tuple(stored[i] for i in order),
                        tuple(starts[i] for i in order),
                    )
                else:
                    self._layouts[name] = _Layout(False, entry.chunks, tuple(stored), ())
        return self._layouts[name]

    def _pieces(self, name: str, start: int, stop: int):
        """(chunk index, file byte position, first output element, count) covering [start, stop) of a flat
        tensor."""
        lay, itemsize = self._layout(name), self.infos[name].itemsize
        i = max(bisect.bisect_right(lay.starts, start) - 1, 0)
        while i < len(lay.starts) and start < stop:
            c_lo = lay.starts[i]
            c_hi = c_lo + lay.chunks[i].numel
            if c_hi > start:
                b = min(stop, c_hi)
                yield (
                    i,
                    lay.stored[i].lo + (lay.stored[i].storage_offset + start - c_lo) * itemsize,
                    start,
                    b - start,
                )
                start = b
            i += 1

    def _single(self, name: str, start: int, stop: int):
        """(file, byte lo) when [start, stop) lies in one chunk of a flat tensor, else None."""
        if stop <= start or not self._layout(name).flat:
            return None
        pieces = list(self._pieces(name, start, stop))
        if len(pieces) != 1:
            return None
        i, pos, _, _ = pieces[0]
        return self.files[self._layout(name).chunks[i].blob.file], pos

    # ----------------------------------------------------------------------------------------- reads

    def read_array(self, name: str, start: int, stop: int, out=None) -> np.ndarray:
        """Elements [start, stop) of the flattened tensor, read into ``out`` (a contiguous array or tensor
        with enough bytes) or a fresh array."""
        info = self.infos[name]
        dt, count = info.np_dtype, stop - start
        arr = np.empty(count, dtype=dt) if out is None else bytes_of(out)[: count * dt.itemsize].view(dt)
        if count <= 0:
            return arr
        lay = self._layout(name)
        if lay.flat:
            view = memoryview(arr.view(np.uint8))
            for i, pos, at, n in self._pieces(name, start, stop):
                lo = (at - start) * dt.itemsize
                self.files[lay.chunks[i].blob.file].pread(
                    view[lo : lo + n * dt.itemsize], pos, f"tensor {safety.shown(name)}"
                )
            return arr
        row = math.prod(info.shape[1:])
        first, rows = self._rows(name, start // row, -(-stop // row))
        flat = rows.reshape(-1)[start - first * row : stop - first * row]
        np.copyto(arr, to_numpy(flat))
        return arr

    def read_range(self, name: str, start: int, stop: int, out=None, *, numpy: bool = False):
        arr = self.read_array(name, start, stop, out)
        return arr if numpy else to_torch(arr)  # in ``out``'s memory when given

    def read(self, name: str, *, numpy: bool = False):
        info = self.infos[name]
        arr = self.read_array(name, 0, info.numel).reshape(info.shape)
        return arr if numpy else to_torch(arr)

    def view_range(self, name: str, start: int, stop: int, *, numpy: bool = False):
        """A zero-copy view of elements [start, stop) when they lie in one chunk of a mappable file, else
        None (use ``read_range``)."""
        info = self.infos[name]
        if stop <= start:
            arr = np.empty(0, dtype=info.np_dtype)
        else:
            where = self._single(name, start, stop)
            arr = None if where is None else where[0].view(info.np_dtype, where[1], stop - start)
        return arr if arr is None or numpy else to_torch(arr)

    def _rows(self, name: str, r0: int, r1: int):
        """(first row, tensor of dim-0 rows [first, first + n)) holding rows [r0, r1), assembled from the
        chunks that meet them; the last slab is kept for the next call."""
        import torch

        info, lay = self.infos[name], self._layout(name)
        with self._lock:
            s = self._slab
            if s is not None and s[0] == name and s[1] <= r0 and r1 <= s[1] + s[2].shape[0]:
                return s[1], s[2]
            self._slab = None  # free the old slab before building the next
            row_bytes = max(math.prod(info.shape[1:]) * info.itemsize, 1)
            r1 = min(info.shape[0], max(r1, r0 + max(1, SLAB_BYTES // row_bytes)))
            slab = torch.empty((r1 - r0, *info.shape[1:]), dtype=info.dtype)
            for c, st in zip(lay.chunks, lay.stored, strict=True):
                lo, hi = max(r0, c.offsets[0]), min(r1, c.offsets[0] + c.sizes[0])
                if lo < hi:
                    part = self._chunk_rows(name, c, st, lo - c.offsets[0], hi - c.offsets[0])
                    box = tuple(slice(o, o + n) for o, n in zip(c.offsets[1:], c.sizes[1:], strict=True))
                    slab[(slice(lo - r0, hi - r0), *box)] = part
            self._slab = (name, r0, slab)
            return r0, slab

    def _chunk_rows(self, name: str, c: Chunk, st: Stored, i: int, j: int):
        """Rows [i, j) of a chunk as a tensor (only those rows read when it is stored contiguously)."""
        info = self.infos[name]
        f = self.files[c.blob.file]
        what = f"tensor {safety.shown(name)}"
        if st.contiguous:
            per_row = math.prod(c.sizes[1:])
            buf = np.empty((j - i) * per_row * info.itemsize, dtype=np.uint8)
            f.pread(memoryview(buf), st.lo + (st.storage_offset + i * per_row) * info.itemsize, what)
            return to_torch(buf).view(info.dtype).reshape((j - i, *c.sizes[1:]))
        buf = np.empty(st.nbytes - st.nbytes % info.itemsize, dtype=np.uint8)
        f.pread(memoryview(buf), st.lo, what)
        whole = to_torch(buf).view(info.dtype).as_strided(c.sizes, st.stride, st.storage_offset)
        return whole[i:j]

    def held_bytes(self, chunk: int, workers: int) -> int:
        """Memory that reading the tensors in ranges of ``chunk`` elements on ``workers`` threads takes
        besides the caller's buffers: for a tensor not stored as flat pieces, the slab of whole dim-0 rows
        kept between calls (``_rows``) and, per thread, a chunk stored non-contiguously read whole
        (``_chunk_rows``); the largest such tensor counts (one slab is kept at a time)."""
        most = 0
        for name, info in self.infos.items():
            lay = self._layout(name)
            if lay.flat or info.numel == 0:
                continue
            row = max(math.prod(info.shape[1:]), 1)
            row_bytes = max(row * info.itemsize, 1)
            rows = min(info.shape[0], max(-(-chunk // row) + 1, SLAB_BYTES // row_bytes))
            strided = max((st.nbytes for st in lay.stored if not st.contiguous), default=0)
            most = max(most, rows * row_bytes + workers * strided)
        return most

    # ------------------------------------------------------------------------- the Checkpoint protocol

    def copies(self, name: str) -> bool:
        return True

    def mappable(self, name: str) -> bool:
        info = self.infos[name]
        if info.numel == 0:
            return True
        lay = self._layout(name)
        return lay.flat and len(lay.chunks) == 1 and self.files[lay.chunks[0].blob.file].mapping() is not None

    def file_span(self, name: str, start: int, stop: int):
        where = self._single(name, start, stop)
        if where is None or where[0].mapping() is None:
            return None
        f, lo = where
        return f, lo, lo + (stop - start) * self.infos[name].itemsize

    def advise(self, name: str, start: int, stop: int, advice: str) -> None:
        if advice == "flush" or stop <= start or not self._layout(name).flat:
            return
        lay, itemsize = self._layout(name), self.infos[name].itemsize
        for i, pos, _, n in self._pieces(name, start, stop):
            self.files[lay.chunks[i].blob.file].madvise_span(pos, pos + n * itemsize, advice)

    def flush_advice(self) -> None:
        """Nothing is batched."""

    def release(self) -> None:
        for f in self.files.values():
            f.close()
        self._slab = None
        self._layouts = {}

    def object_bytes(self, name: str) -> bytes:
        """The raw stored bytes of byte entry ``name`` (never unpickled here)."""
        blob = self.objects[name]
        if blob.file not in self.files:
            raise CheckpointError(f"{self.folder}: entry {safety.shown(name)}: unknown storage file")
        buf = bytearray(blob.length)
        self.files[blob.file].pread(memoryview(buf), blob.offset, f"entry {safety.shown(name)}")
        return bytes(buf)
