"""Raw OS-level I/O below the readers and the writer: madvise of memory-mapped pages (through ctypes, so
the GIL is released), early writeback (sync_file_range), and ``FileWriter``, which appends a new file's
bytes through the page cache or with direct I/O (O_DIRECT, page-aligned blocks written from a thread)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import time
from pathlib import Path

import numpy as np

__all__ = [
    "DIRECT_ALIGN",
    "DIRECT_BLOCK",
    "DIRECT_IO_MIN_BYTES",
    "WRITEBACK_EVERY",
    "FileWriter",
    "madvise",
    "start_writeback",
]

_LIBC = None
_MADV = {
    "populate": 22,
    "willneed": getattr(mmap, "MADV_WILLNEED", 3),
    "drop": getattr(mmap, "MADV_DONTNEED", 4),
}


def madvise(addr: int, length: int, advice: str) -> None:
    """madvise through ctypes, which releases the GIL (mmap.madvise does not): populating pages may read
    from disk, and that must overlap the main thread's arithmetic."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
            _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC:
        return
    if _LIBC.madvise(addr, length, _MADV[advice]) != 0 and advice == "populate":
        _LIBC.madvise(addr, length, _MADV["willneed"])  # kernels before 5.14: asynchronous read-ahead


WRITEBACK_EVERY = 64 * 2**20
_SYNC_FILE_RANGE = None


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask Linux to start writing [offset, offset+length) to disk now, without waiting
    (sync_file_range(SYNC_FILE_RANGE_WRITE)), so the final fsync finds little left to do and disk writes
    overlap the merge. A no-op where unavailable."""
    global _SYNC_FILE_RANGE
    if _SYNC_FILE_RANGE is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            _SYNC_FILE_RANGE = fn
        except (OSError, AttributeError):
            _SYNC_FILE_RANGE = False
    if _SYNC_FILE_RANGE:
        _SYNC_FILE_RANGE(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE


DIRECT_BLOCK = 8 * 2**20  # bytes per direct write: large, page-aligned
DIRECT_ALIGN = 4096  # O_DIRECT needs offsets, lengths and addresses aligned to the logical block size
DIRECT_IO_MIN_BYTES = 64 * 2**20  # smaller files are written through the page cache


class FileWriter:
    """Appends bytes to a new file, either through the page cache (starting writeback every
    WRITEBACK_EVERY bytes, so the final fsync is short) or with direct I/O.

    Direct I/O (O_DIRECT) gathers the bytes into page-aligned blocks and writes whole blocks straight to
    the device from a background thread, while the next block fills: no page-cache copy to make and
    later flush, and no fresh page-cache memory to allocate, which on a VM whose free memory was handed
    back to the host costs more than the disk write itself. Where the filesystem refuses O_DIRECT
    (tmpfs, some network filesystems) the file continues through the page cache."""

    def __init__(self, path: Path, *, direct: bool, writeback: bool):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self.direct = bool(direct and hasattr(os, "O_DIRECT"))
        self.fd = -1
        if self.direct:
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, 0o666)
            except OSError:
                self.direct = False
        if self.fd < 0:
            self.fd = os.open(path, flags, 0o666)
        self.writeback = writeback
        self.pos = 0  # file offset of the next byte
        self.synced = 0
        self.fill = 0  # bytes gathered in the current direct-I/O block
        self._blocks: list = []
        self._io = None  # the direct writes' thread and the write in flight
        self._inflight = None
        if self.direct:
            from concurrent.futures import ThreadPoolExecutor

            self._blocks = [mmap.mmap(-1, DIRECT_BLOCK) for _ in range(2)]  # anonymous maps: page-aligned
            self._arr = np.frombuffer(self._blocks[0], dtype=np.uint8)
            self._io = ThreadPoolExecutor(1, thread_name_prefix="extramerge-write")

    def write(self, data: memoryview) -> None:
        if not self.direct:
            self._write_buffered(data)
            return
        src = np.frombuffer(data, dtype=np.uint8) if len(data) else None
        done = 0
        while done < len(data):
            n = min(len(data) - done, DIRECT_BLOCK - self.fill)
            np.copyto(self._arr[self.fill : self.fill + n], src[done : done + n])  # releases the GIL
            self.fill += n
            done += n
            if self.fill == DIRECT_BLOCK:
                self._write_block(DIRECT_BLOCK)

    def _write_buffered(self, data: memoryview) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], self.pos + done)
        self.pos += len(data)
        if self.writeback and self.pos - self.synced >= WRITEBACK_EVERY:
            start_writeback(self.fd, self.synced, self.pos - self.synced)
            self.synced = self.pos

    def _write_block(self, length: int) -> None:
        """Hand the gathered block (``length``: a multiple of DIRECT_ALIGN, the tail padded) to the I/O
        thread and switch to the other block once its previous write is done."""
        block = self._blocks[0]
        fut = self._io.submit(_pwrite_direct, self.fd, memoryview(block)[:length], self.pos, self.fill)
        self.pos += self.fill
        self.fill = 0
        self._wait()  # the other block's write: it must be done before that block is refilled
        self._inflight = fut
        self._blocks.reverse()
        self._arr = np.frombuffer(self._blocks[0], dtype=np.uint8)

    def _wait(self) -> None:
        fut, self._inflight = self._inflight, None
        if fut is not None:
            fut.result()  # re-raises the I/O thread's error here

    def close(self, fsync: bool) -> float:
        """Write what is left, fsync (if asked) and close; returns the seconds spent in fsync."""
        try:
            if self.direct:
                size = self.pos + self.fill
                if self.fill:
                    padded = -(-self.fill // DIRECT_ALIGN) * DIRECT_ALIGN
                    self._arr[self.fill : padded] = 0
                    self._write_block(padded)
                self._wait()
                os.ftruncate(self.fd, size)  # drop the padding of the last block
            t_sync = 0.0
            if fsync:
                t0 = time.perf_counter()
                os.fsync(self.fd)
                t_sync = time.perf_counter() - t0
            return t_sync
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop: let a write in flight finish (it uses the descriptor), then close everything."""
        if self._io is not None:
            with contextlib.suppress(BaseException):
                self._wait()
            self._io.shutdown(wait=True)
            self._io = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._arr = None
        self._blocks = []  # unmapped once unreferenced (a failed write's traceback may still hold one)


def _pwrite_direct(fd: int, view: memoryview, pos: int, size: int) -> None:
    """Write a direct-I/O block at ``pos`` (``size`` bytes of it are data, the rest padding). A filesystem
    that refuses it (EINVAL) or writes short gets the file switched to the page cache for good."""
    try:
        done = os.pwrite(fd, view, pos)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        done = 0  # the filesystem accepted O_DIRECT at open but not for writes
    if done < min(size, len(view)):
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        while done < size:
            done += os.pwrite(fd, view[done:size], pos + done)
