"""Where a DCP chunk's elements lie in its ``.distcp`` file, found without reading them.

torch's FileSystemWriter stores each chunk as a complete ``torch.save`` archive (a zip) at
[offset, offset + length) of a ``.distcp`` file. ``stored_layout`` loads that archive with
``torch.load(map_location="meta", weights_only=True)`` (shape, dtype, strides, storage offset; no data
read) and reads its zip directory: the one storage record is STORED (uncompressed) and little-endian, so
its bytes are a plain span of the file, served by pread or as views of the memory-mapped file.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from dataclasses import dataclass

from .. import pickles, safety
from ..errors import CheckpointError
from ..mapped import MappedFile
from .metadata import Blob

__all__ = ["Stored", "stored_layout"]

_STORAGE_RECORD = re.compile(r"[^/]+/data/\d+")
_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field


@dataclass(frozen=True)
class Stored:
    """A chunk's storage: ``nbytes`` bytes at file position ``lo``; chunk element (i0, i1, ...) is storage
    element ``storage_offset + Σ i_k·stride_k``. ``contiguous``: row-major without gaps, so chunk element
    i is at byte ``lo + (storage_offset + i)·itemsize``."""

    lo: int
    nbytes: int
    stride: tuple[int, ...]
    storage_offset: int
    contiguous: bool


class _Window(io.RawIOBase):
    """Bytes [offset, offset + length) of an open file, as a seekable read-only stream. Its first and
    last _EDGE bytes (where a torch.save archive keeps its pickle, records and zip directory) are read
    once; other reads go to pread."""

    def __init__(self, f: MappedFile, fd: int, offset: int, length: int):
        super().__init__()
        self.f, self.fd, self.offset, self.length, self.pos = f, fd, offset, length, 0
        self.head = self._read(0, min(length, _EDGE))
        self.tail_at = max(length - _EDGE, 0)
        self.tail = self._read(self.tail_at, length - self.tail_at)

    def _read(self, pos: int, n: int) -> bytearray:
        buf = bytearray(n)
        self.f.pread(memoryview(buf), self.offset + pos, "a chunk", self.fd)
        return buf

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, pos if whence == 0 else (self.pos + pos if whence == 1 else self.length + pos))
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        out, a = memoryview(b).cast("B")[:n], self.pos
        if a + n <= len(self.head):
            out[:] = self.head[a : a + n]
        elif a >= self.tail_at:
            out[:] = self.tail[a - self.tail_at : a - self.tail_at + n]
        elif n:
            self.f.pread(out, self.offset + a, "a chunk", self.fd)
        self.pos += n
        return n


_EDGE = 16 * 2**10


def _meta_tensor(win: _Window, where: str):
    import torch

    pickles.check_torch_zip(win, where, win.length)  # no compressed records, its data.pkl bounded
    win.seek(0)
    try:
        t = torch.load(win, map_location="meta", weights_only=True)
    except Exception as e:  # a corrupt or crafted archive: torch's own message, shortened
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        what = safety.shown(text, 160)[1:-1]
        raise CheckpointError(
            f"{where}: not a readable torch.save archive ({type(e).__name__}: {what})"
        ) from None
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"{where}: holds a {type(t).__name__}, not a tensor")
    return t


def _record(win: _Window, where: str, nbytes: int) -> zipfile.ZipInfo:
    try:
        z = zipfile.ZipFile(win)
        records = z.infolist()
        order = [r for r in records if r.filename.endswith("/byteorder")]
        if order and z.read(order[0]).strip() != b"little":
            raise CheckpointError(f"{where}: stored big-endian, which extramerge does not read")
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{where}: corrupt torch.save archive ({type(e).__name__})") from None
    data = [r for r in records if _STORAGE_RECORD.fullmatch(r.filename)]
    if len(data) != 1:
        raise CheckpointError(f"{where}: expected one storage record in its archive, found {len(data)}")
    rec = data[0]
    if rec.compress_type != zipfile.ZIP_STORED or rec.file_size != nbytes:
        raise CheckpointError(
            f"{where}: its storage record is compressed or not {nbytes} bytes long ({rec.file_size})"
        )
    return rec


def stored_layout(f: MappedFile, blob: Blob, dtype, sizes: tuple[int, ...], what: str) -> Stored:
    """Where the chunk stored at ``blob`` of ``f`` lies (``what`` names tensor and chunk in errors); its
    dtype and sizes must be those the metadata claims."""
    where = f"{f.path}: {what}"
    fd = f.open()
    try:
        win = _Window(f, fd, blob.offset, blob.length)
        t = _meta_tensor(win, where)
        if t.dtype != dtype or tuple(t.shape) != tuple(sizes):
            raise CheckpointError(
                f"{where}: stored as {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, but the "
                f"metadata says {str(dtype).removeprefix('torch.')} {list(sizes)}"
            )
        itemsize = t.element_size()
        nbytes = t.untyped_storage().nbytes()
        stride, offset = tuple(t.stride()), t.storage_offset()
        reach = offset + sum((s - 1) * st for s, st in zip(sizes, stride, strict=True)) + 1
        if min(stride, default=0) < 0 or reach * itemsize > nbytes:
            raise CheckpointError(f"{where}: its strides reach outside its storage")
        win.seek(0)
        rec = _record(win, where, nbytes)
        head = bytearray(_LOCAL_HEADER)
        f.pread(memoryview(head), blob.offset + rec.header_offset, "a chunk's zip header", fd)
        start = rec.header_offset + _LOCAL_HEADER + int.from_bytes(head[26:28], "little")
        start += int.from_bytes(head[28:30], "little")
        if head[:4] != b"PK\x03\x04" or start + nbytes > blob.length:
            raise CheckpointError(f"{where}: corrupt zip header of its storage record")
    finally:
        os.close(fd)
    return Stored(blob.offset + start, nbytes, stride, offset, bool(t.is_contiguous()))
