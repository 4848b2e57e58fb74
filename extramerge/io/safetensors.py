"""Safetensors files, read lazily: strict validation of the header (untrusted input) before any field is
used, then ``SafetensorsFile``, which reads tensor bytes with pread or serves zero-copy views of a shared
read-only memory map (pages populated ahead of use and dropped once consumed).

    header = parse_header(path, raw, data_start, size, itemsizes)   # -> Header(metadata, entries)

The header is ``{name: {"dtype": CODE, "shape": [ints], "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}``. Every rule below is checked and a violation raises one CheckpointError
naming the file and the offending field (tensor names escaped and shortened, never raw bytes):

* JSON: UTF-8, an object, no duplicate keys, no NaN/Infinity/overflowing numbers, bounded nesting;
* ``__metadata__``: absent, or an object of strings to strings;
* each entry: an object with exactly a known ``dtype`` code, a ``shape`` list of non-negative integers and
  ``data_offsets`` of two integers 0 <= begin <= end, with end - begin = numel · itemsize;
* byte ranges lie within the file's data section and do not overlap.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .dtypes import ST_ITEMSIZE, TensorInfo, bytes_of, is_torch, to_torch
from .errors import CheckpointError
from .mapped import MappedFile
from .safety import parse_json, shown

__all__ = ["Entry", "Header", "parse_header", "SafetensorsFile"]

_ST_HEADER_LIMIT = 100 * 2**20  # the safetensors library refuses larger headers too
_FIELDS = frozenset({"dtype", "shape", "data_offsets"})


class Entry(NamedTuple):
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class Header(NamedTuple):
    metadata: dict[str, str]
    entries: list[Entry]  # sorted by begin (the stored order)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _metadata(path: Path, meta) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    for k, v in meta.items():
        if not isinstance(v, str):
            raise CheckpointError(
                f"{path}: corrupt safetensors header (__metadata__ field {shown(k)} is not a string)"
            )
    return meta


def _entry(path: Path, name: str, meta, itemsizes: Mapping[str, int]) -> Entry:
    where = f"{path}: tensor {shown(name)}"
    if not isinstance(meta, dict) or set(meta) != _FIELDS:
        raise CheckpointError(
            f"{where}: corrupt header entry (expected exactly dtype, shape and data_offsets)"
        )
    code, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(code, str) or code not in itemsizes:
        raise CheckpointError(f"{where}: unsupported or invalid dtype {shown(code, 20)}")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise CheckpointError(f"{where}: invalid shape (expected a list of non-negative integers)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise CheckpointError(f"{where}: invalid data_offsets (expected two integers)")
    begin, end = offsets
    if not 0 <= begin <= end or end - begin != math.prod(shape) * itemsizes[code]:
        raise CheckpointError(
            f"{where} has data offsets inconsistent with its shape and dtype ([{begin}, {end}])"
        )
    return Entry(name, code, tuple(shape), begin, end)


def parse_header(path: Path, raw: bytes, data_start: int, size: int, itemsizes: Mapping[str, int]) -> Header:
    """Validated header of ``path`` (``size`` bytes) from its JSON bytes ``raw``; the data section starts
    at byte ``data_start``."""
    header = parse_json(raw, f"{path}: corrupt safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = _metadata(path, header.pop("__metadata__", None))
    entries = sorted((_entry(path, n, m, itemsizes) for n, m in header.items()), key=lambda e: e.begin)
    end = 0
    for e in entries:
        if data_start + e.end > size:
            raise CheckpointError(
                f"{path}: truncated file: tensor {shown(e.name)} ends at byte {data_start + e.end} but the "
                f"file has {size} bytes"
            )
        if e.begin < end and e.end > e.begin:
            raise CheckpointError(
                f"{path}: tensor {shown(e.name)}: data_offsets overlap another tensor's bytes"
            )
        end = max(end, e.end)
    return Header(metadata, entries)


class SafetensorsFile:
    """One .safetensors file: header parsed and validated up front, tensor bytes read with pread or
    through the shared read-only memory map of its ``MappedFile`` (``file``)."""

    def __init__(self, path: Path, root: Path | None = None):
        self.path = path
        self.file = MappedFile(path, root)  # refuses a FIFO/device before reading a byte
        size = self.file.size
        try:
            with os.fdopen(self.file.open(), "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header)")
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, _ST_HEADER_LIMIT):
                    raise CheckpointError(
                        f"{path}: truncated or not a safetensors file (header length {n} exceeds the file's "
                        f"{size} bytes)"
                    )
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e
        self.data_start = 8 + n
        header = parse_header(path, raw, self.data_start, size, ST_ITEMSIZE)
        self.metadata = header.metadata
        # stored order = data order, the order to read sequentially
        self.infos = {e.name: TensorInfo(e.name, e.shape, e.dtype) for e in header.entries}
        self.offsets = {e.name: self.data_start + e.begin for e in header.entries}
        self._drop = (0, 0)  # pending page range to unmap, batched (see advise)

    @property
    def mappable(self) -> bool:
        return self.file.mappable

    @mappable.setter
    def mappable(self, value: bool) -> None:
        self.file.mappable = value

    def read_array(self, name: str, start: int, stop: int, out=None) -> np.ndarray:
        """Elements [start, stop) read with pread into ``out`` (any contiguous array or tensor with enough
        bytes, reused by the caller) or a fresh array."""
        info = self.infos[name]
        count = stop - start
        dt = info.np_dtype
        if out is None:
            arr = np.empty(count, dtype=dt)
        else:
            arr = bytes_of(out)[: count * dt.itemsize].view(dt)
        pos = self.offsets[name] + start * dt.itemsize
        self.file.pread(memoryview(arr.view(np.uint8)), pos, f"tensor {shown(name)}")
        return arr

    def read_range(self, name: str, start: int, stop: int, out=None, *, numpy: bool = False):
        arr = self.read_array(name, start, stop, out)
        if numpy:
            return arr
        if out is not None and is_torch(out):  # keep the caller's tensor as the storage
            import torch

            tdt = self.infos[name].dtype
            return out.view(torch.uint8).reshape(-1)[: arr.nbytes].view(tdt)
        return to_torch(arr)

    def read(self, name: str, *, numpy: bool = False):
        info = self.infos[name]
        arr = self.read_array(name, 0, info.numel).reshape(info.shape)
        return arr if numpy else to_torch(arr)

    # Zero-copy path for the engine: a read-only shared mapping of the file. Pages are populated ahead of
    # use (madvise POPULATE_READ, off the arithmetic's critical path) and dropped from this process again
    # once consumed (madvise DONTNEED), so resident memory stays a few chunks although nothing is copied.

    def mapping(self):
        return self.file.mapping()

    def view_array(self, name: str, start: int, stop: int) -> np.ndarray | None:
        """Elements [start, stop) as a read-only view of the mapped file, or None when it cannot be
        mapped."""
        info = self.infos[name]
        if stop <= start:
            return np.empty(0, dtype=info.np_dtype)
        return self.file.view(info.np_dtype, self.offsets[name] + start * info.itemsize, stop - start)

    def check_size(self) -> None:
        """CheckpointError if the mapped file has shrunk (see ``MappedFile.check_size``)."""
        self.file.check_size()

    def view_range(self, name: str, start: int, stop: int, *, numpy: bool = False):
        arr = self.view_array(name, start, stop)
        return arr if arr is None or numpy else to_torch(arr)

    def span(self, name: str, start: int, stop: int) -> tuple[int, int]:
        """File byte range [lo, hi) of elements [start, stop)."""
        info = self.infos[name]
        base = self.offsets[name]
        return base + start * info.itemsize, base + stop * info.itemsize

    def madvise_span(self, lo: int, hi: int, advice: str) -> None:
        """madvise the mapped pages of file bytes [lo, hi): 'populate' or 'drop' (thread-safe)."""
        self.file.madvise_span(lo, hi, advice)

    def release(self) -> None:
        """Forget the memory map (views already handed out keep it alive)."""
        self.file.close()

    def advise(self, name: str, start: int, stop: int, advice: str) -> None:
        """madvise the pages of elements [start, stop): 'populate' (map them now), 'drop' (unmap; adjacent
        small ranges are batched into one call of at least _DROP_BATCH bytes) or 'flush' (pending drops)."""
        if self.file.mm is None:
            return
        if advice == "flush":
            lo, hi = self._drop
            self.file.madvise_span(lo, hi, "drop")
            self._drop = (0, 0)
            return
        if stop <= start:
            return
        lo, hi = self.span(name, start, stop)
        lo -= lo % mmap.PAGESIZE
        if advice != "drop":
            self.file.madvise_span(lo, hi, advice)
            return
        plo, phi = self._drop
        if phi > plo and plo <= hi and lo <= phi + mmap.PAGESIZE:  # touches the pending range: extend it
            lo, hi = min(lo, plo), max(hi, phi)
        elif phi > plo:
            self.file.madvise_span(plo, phi, "drop")
        self._drop = (lo, hi)
        if hi - lo >= _DROP_BATCH:
            self.advise(name, 0, 0, "flush")


_DROP_BATCH = 2 * 2**20
