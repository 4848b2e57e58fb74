"""Outputs written in parts by several processes: files preallocated at their final size
(``create_files``: header written, then ftruncate), and ``RangedWriter``, which writes one process's byte
ranges of them at their offsets (pwrite through the page cache, writeback started early with
sync_file_range, fsync at the end).

The files' layout (``shards.safetensors_files``) is the one the streaming writer uses, so a distributed
merge's output is byte-identical to one process's. Several machines need the staging folder on a shared
filesystem that shows a file created (and closed) by one of them to the others (NFS close-to-open, Lustre,
GPFS all do).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from .raw import start_writeback
from .shards import FileLayout

__all__ = ["create_files", "RangedWriter"]

_WRITEBACK_EVERY = 64 * 2**20


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

    def __init__(self, folder: Path, files: Sequence[FileLayout], *, writeback: bool = True):
        self.folder = Path(folder)
        self.where: dict[str, tuple[FileLayout, int, int]] = {}  # name → (file, data start, data end)
        for f in files:
            ends = [*(f.offsets[n] for n in f.tensors[1:]), f.size]
            for n, end in zip(f.tensors, ends, strict=True):
                self.where[n] = (f, f.offsets[n], end)
        self.writeback = writeback
        self.fds: dict[str, int] = {}
        self.pending: dict[int, list[int]] = {}  # fd → [lo, hi) written since writeback was last started
        self.written = 0

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
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], pos + done)
        self.written += len(data)
        if not self.writeback:
            return
        span = self.pending.setdefault(fd, [pos, pos])
        if pos != span[1]:  # not contiguous with what came before: start writeback of that now
            self._flush(fd, span)
            span[0] = pos
        span[1] = pos + len(data)
        if span[1] - span[0] >= _WRITEBACK_EVERY:
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
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.pending.clear()
