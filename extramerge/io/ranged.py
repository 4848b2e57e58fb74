"""Outputs written in parts by several processes: files preallocated at their final size
(``create_files``: header written, then ftruncate), and ``RangedWriter``, which writes one process's byte
ranges of them at their offsets: the whole pages inside a process's contiguous range with direct I/O
(O_DIRECT, page-aligned blocks, as the one-process writer does), the partial pages at its two ends (which
a neighbouring process may share) through the page cache, writeback started early with sync_file_range,
fsync at the end.

The files' layout (``shards.safetensors_files``) is the one the streaming writer uses, so a distributed
merge's output is byte-identical to one process's. Several machines need the staging folder on a shared
filesystem that shows a file created (and closed) by one of them to the others (NFS close-to-open, Lustre,
GPFS all do).
"""

from __future__ import annotations

import errno
import mmap
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .raw import DIRECT_ALIGN, DIRECT_BLOCK, DIRECT_IO_MIN_BYTES, WRITEBACK_EVERY, start_writeback
from .shards import FileLayout

__all__ = ["create_files", "RangedWriter"]


def create_files(folder: Path, files: Sequence[FileLayout]) -> None:
    """Create each file in ``folder`` (which must not hold it yet) with its header, at its full size (the
    rest a hole until the ranks write it)."""
    for f in files:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(folder / f.name, flags, 0o666)
        try:
            done = 0
            while done < len(f.header):
                done += os.pwrite(fd, f.header[done:], done)
            os.ftruncate(fd, f.size)
        finally:
            os.close(fd)


class RangedWriter:
    """Writes byte ranges of tensors into the preallocated files of ``files`` in ``folder``.

    ``write(name, start, data)`` puts ``data`` at byte ``start`` of tensor ``name``'s data; a range outside
    that tensor is an error. Files are opened on first use; ``writeback`` starts writing every 64 MiB of
    each file to disk as it goes, so the final fsync finds little left to do."""

    def __init__(
        self, folder: Path, files: Sequence[FileLayout], *, writeback: bool = True, direct: bool | None = None
    ):
        self.folder = Path(folder)
        # direct I/O (None: when writeback is on and a file has at least DIRECT_IO_MIN_BYTES)
        self.direct = {f.name: (writeback and f.size >= DIRECT_IO_MIN_BYTES) if direct is None else direct
                       for f in files}  # fmt: skip
        self.streams: dict[str, _DirectRun] = {}
        self.where: dict[str, tuple[FileLayout, int, int]] = {}  # name → (file, data start, data end)
        for f in files:
            ends = [*(f.offsets[n] for n in f.tensors[1:]), f.size]
            for n, end in zip(f.tensors, ends, strict=True):
                self.where[n] = (f, f.offsets[n], end)
        self.writeback = writeback
        self.fds: dict[str, int] = {}
        self.pending: dict[int, list[int]] = {}  # fd → [lo, hi) written since writeback was last started

    def _fd(self, fname: str) -> int:
        fd = self.fds.get(fname)
        if fd is None:
            fd = self.fds[fname] = os.open(self.folder / fname, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        return fd

    def write(self, name: str, start: int, data: memoryview) -> None:
        f, lo, hi = self.where[name]
        pos = lo + start
        if start < 0 or pos + len(data) > hi:
            raise ValueError(f"bytes [{start}, {start + len(data)}) are outside tensor '{name}' in {f.name}")
        fd = self._fd(f.name)
        if self.direct.get(f.name):
            for other in [k for k in self.streams if k != f.name]:  # on to the next file: finish the last
                self.streams.pop(other).finish()
            run = self.streams.get(f.name)
            if run is None or run.end != pos:  # a new contiguous run: finish the last one
                if run is not None:
                    run.finish()
                run = self.streams[f.name] = _DirectRun(self.folder / f.name, fd, pos)
                if run.dfd < 0:
                    self.direct[f.name] = False
            if run.dfd >= 0:
                run.write(data)
                return
        _pwrite(fd, data, pos)
        if not self.writeback:
            return
        span = self.pending.setdefault(fd, [pos, pos])
        if pos != span[1]:  # not contiguous with what came before: start writeback of that now
            self._flush(fd, span)
            span[0] = pos
        span[1] = pos + len(data)
        if span[1] - span[0] >= WRITEBACK_EVERY:
            self._flush(fd, span)

    @staticmethod
    def _flush(fd: int, span: list[int]) -> None:
        if span[1] > span[0]:
            start_writeback(fd, span[0], span[1] - span[0])
        span[0] = span[1]

    def close(self, fsync: bool) -> float:
        """fsync (if asked) and close every file written; returns the seconds spent in fsync."""
        t_sync = 0.0
        try:
            for run in self.streams.values():
                run.finish()
            if fsync:
                t0 = time.perf_counter()
                for fd in self.fds.values():
                    os.fsync(fd)
                t_sync = time.perf_counter() - t0
        finally:
            self.abort()
        return t_sync

    def abort(self) -> None:
        """Close every file without flushing."""
        for run in self.streams.values():
            run.close()
        self.streams.clear()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.pending.clear()


def _pwrite(fd: int, data, pos: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], pos + done)


class _DirectRun:
    """One contiguous run of bytes written from file position ``start`` on: its first partial page through
    the page cache (``fd``), then whole pages gathered into a page-aligned block and written with O_DIRECT,
    the last partial page through the page cache again (``finish``). ``dfd`` < 0: the filesystem refuses
    O_DIRECT (the caller writes through the page cache instead)."""

    def __init__(self, path: Path, fd: int, start: int):
        self.fd, self.end = fd, start
        self.head = -start % DIRECT_ALIGN
        self.block_at = start + self.head  # aligned file position of the block being filled
        self.fill = 0
        self.block = None
        try:
            self.dfd = os.open(path, os.O_WRONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
        except (OSError, AttributeError):
            self.dfd = -1
            return
        self.block = mmap.mmap(-1, DIRECT_BLOCK)  # anonymous: page-aligned
        self.arr = np.frombuffer(self.block, dtype=np.uint8)

    def write(self, data: memoryview) -> None:
        n0 = min(self.head, len(data))
        if n0:  # the partial page before the first boundary (a neighbour may write the rest of it)
            _pwrite(self.fd, data[:n0], self.end)
            self.head -= n0
            self.end += n0
        src = np.frombuffer(data, dtype=np.uint8)
        done = n0
        while done < len(data):
            n = min(len(data) - done, DIRECT_BLOCK - self.fill)
            np.copyto(self.arr[self.fill : self.fill + n], src[done : done + n])  # releases the GIL
            self.fill += n
            done += n
            self.end += n
            if self.fill == DIRECT_BLOCK:
                self._write_block(DIRECT_BLOCK)

    def _write_block(self, length: int) -> None:
        """Write the block's first ``length`` bytes (a multiple of the page size) at ``block_at``."""
        view = memoryview(self.block)[:length]
        try:
            done = os.pwrite(self.dfd, view, self.block_at)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            done = 0  # accepted at open, refused at write: through the page cache
        if done < length:
            _pwrite(self.fd, view[done:], self.block_at + done)
        self.block_at += length
        rest = self.fill - length
        if rest:
            self.arr[:rest] = self.arr[length : self.fill]
        self.fill = rest

    def finish(self) -> None:
        """Write what is gathered: whole pages directly, the last partial page through the page cache."""
        if self.dfd >= 0 and self.fill:
            whole = self.fill - self.fill % DIRECT_ALIGN
            if whole:
                self._write_block(whole)
            if self.fill:
                _pwrite(self.fd, memoryview(self.block)[: self.fill], self.block_at)
                self.block_at += self.fill
                self.fill = 0
        self.close()

    def close(self) -> None:
        if self.dfd >= 0:
            os.close(self.dfd)
            self.dfd = -1
        self.block = self.arr = None
