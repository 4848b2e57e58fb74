"""``MappedFile``: one input file read at byte positions, with pread or through a shared read-only memory
map whose pages are populated ahead of use and dropped once consumed (the 'file' of the engine's spans:
``madvise_span``, ``check_size``). The file is checked to be a regular file inside its checkpoint folder
when opened, and every later open must find the very same file at the same size.

Reads go through pread unless ``EXTRAMERGE_MMAP=1`` (``maps_allowed``): a page of a memory map past the
end of a file that another program truncates kills the process with SIGBUS, which Python cannot catch,
and no check made before touching the page closes that window; a pread of a truncated file returns short,
which is one error naming the file. Maps save a copy (about 1.5x faster on inputs already in the page
cache) where the inputs are known not to change; their size is still checked before each chunk.
"""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path

import numpy as np

from . import safety
from .errors import CheckpointError
from .raw import madvise

__all__ = ["MappedFile", "maps_allowed", "MAP_ENV"]

MAP_ENV = "EXTRAMERGE_MMAP"


def maps_allowed() -> bool:
    """Whether input files may be memory-mapped (``EXTRAMERGE_MMAP=1``; default off, see the module)."""
    return os.environ.get(MAP_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


class MappedFile:
    """A regular file (inside ``root``), identified by device, inode and size when opened."""

    def __init__(self, path: Path, root: Path | None = None):
        self.path = Path(path)
        fd = safety.open_regular(self.path, root=root)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        self.size = st.st_size
        self.ident = (st.st_dev, st.st_ino, st.st_size)
        self.mappable = maps_allowed()
        self.mm = None
        self.base = 0
        self.lock = threading.Lock()

    def open(self) -> int:
        """A descriptor of the file opened at construction (one swapped in or resized since is refused)."""
        fd = safety.open_regular(self.path)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino, st.st_size) != self.ident:
            os.close(fd)
            raise CheckpointError(f"{self.path}: replaced or resized while open; run again")
        return fd

    def pread(self, view: memoryview, pos: int, what: str, fd: int | None = None) -> None:
        """Fill ``view`` with the file's bytes from ``pos`` (``what`` names them in the error); reads
        through ``fd`` when given, else opens the file for this read."""
        own = fd is None
        fd = self.open() if own else fd
        try:
            done = 0
            while done < len(view):
                got = os.preadv(fd, [view[done:]], pos + done)
                if got <= 0:
                    raise CheckpointError(f"{self.path}: unexpected end of file reading {what}")
                done += got
        finally:
            if own:
                os.close(fd)

    def mapping(self):
        """The shared read-only map of the whole file, or None where the file cannot be mapped."""
        if self.mm is None:
            with self.lock:
                if self.mm is None and self.mappable and self.size > 0:
                    try:
                        with os.fdopen(self.open(), "rb") as f:
                            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                        anchor = np.frombuffer(mm, dtype=np.uint8, count=1)
                        self.base = anchor.__array_interface__["data"][0]
                        self.mm = mm
                    except (OSError, ValueError):
                        self.mappable = False  # e.g. a filesystem without mmap: fall back to pread
        return self.mm

    def view(self, dtype: np.dtype, pos: int, count: int) -> np.ndarray | None:
        """``count`` elements of ``dtype`` at byte ``pos`` as a read-only view of the map (None: unmapped)."""
        mm = self.mapping()
        if mm is None:
            return None
        self.check_size()
        return np.frombuffer(mm, dtype=dtype, count=count, offset=pos)

    def check_size(self) -> None:
        """CheckpointError if the mapped file has shrunk (touching a page past its end would kill the
        process with SIGBUS). One fstat, called before mapped bytes are used."""
        try:
            now = self.mm.size() if self.mm is not None else self.size
        except (OSError, ValueError):  # closed meanwhile: nothing is read from it any more
            return
        if now < self.size:
            raise CheckpointError(f"{self.path}: shrank from {self.size} to {now} bytes while being read")

    def madvise_span(self, lo: int, hi: int, advice: str) -> None:
        """madvise the mapped pages of file bytes [lo, hi): 'populate' or 'drop' (thread-safe)."""
        if self.mm is None or hi <= lo:
            return
        lo -= lo % mmap.PAGESIZE
        madvise(self.base + lo, hi - lo, advice)

    def close(self) -> None:
        """Forget the map (views already handed out keep it alive)."""
        self.mm = None
