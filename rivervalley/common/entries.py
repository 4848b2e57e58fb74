"""Folder entries acted on as they were checked, where someone else may write the parent folder (a shared
project folder without the sticky bit can have any entry renamed or swapped at any moment):

* ``identity(path)``: (device, inode) of the entry itself, what a check remembers;
* ``rename_noreplace(src, dst)``: rename that never replaces what is at ``dst`` (renameat2
  RENAME_NOREPLACE where the kernel has it);
* ``remove_checked(path, expect)``: delete ``path`` only if it is still the entry ``expect``, a folder
  through a descriptor opened on it, so a folder swapped in under its name is never emptied;
* ``own_json(path, key, value)`` / ``owned(path, key, value, marker=)``: whether a file (or a folder's
  ``marker`` file) is a JSON record of ours, ``owned`` returning the identity of the very entry whose
  record was read (through descriptors opened on it), so what is later replaced is what was recognised.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import stat
from pathlib import Path

__all__ = ["identity", "rename_noreplace", "remove_checked", "own_json", "owned"]

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAMEAT2: list = []


def identity(path) -> tuple[int, int] | None:
    """(device, inode) of the entry ``path`` (a link itself, not what it points to); None when absent."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _renameat2():
    if not _RENAMEAT2:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        except (OSError, AttributeError):
            fn = None
        _RENAMEAT2.append(fn)
    return _RENAMEAT2[0]


def rename_noreplace(src, dst) -> None:
    """Rename ``src`` to ``dst``, raising FileExistsError when ``dst`` exists (atomically where the
    kernel and file system support RENAME_NOREPLACE; elsewhere checked just before)."""
    fn = _renameat2()
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # EINVAL: a file system without the flag
            raise OSError(err, os.strerror(err), os.fspath(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(dst))
    os.rename(src, dst)


def remove_checked(path, expect: tuple[int, int] | None) -> bool:
    """Delete the entry ``path`` if it is (device, inode) ``expect``; returns whether it was. A folder is
    opened without following links, compared on the descriptor, and emptied through it (its entries
    removed relative to that descriptor, sub-folders by ``shutil.rmtree(dir_fd=)``), then removed by
    name only if empty; a file or link is compared by ``lstat`` and unlinked. Errors are ignored: what
    cannot be removed stays."""
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno not in (errno.ENOTDIR, errno.ELOOP) or identity(path) != expect or expect is None:
            return False
        with contextlib.suppress(OSError):
            os.unlink(path)
        return True
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != expect:
            return False
        for name in os.listdir(fd):
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(os.lstat(name, dir_fd=fd).st_mode):
                    shutil.rmtree(name, dir_fd=fd)
                else:
                    os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(path)  # only an empty folder goes, whatever is under that name by now
    return True


_READ = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


def _record_fd(fd: int, key: str, value: str, limit: int) -> tuple[int, int] | None:
    """Identity of the regular file open as ``fd`` (closed here) if it holds, in at most ``limit`` bytes,
    a JSON object with ``key`` = ``value``."""
    try:
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return None
            raw = f.read(limit + 1)
        doc = json.loads(raw) if len(raw) <= limit else None
    except (OSError, ValueError, RecursionError):
        return None
    return (st.st_dev, st.st_ino) if isinstance(doc, dict) and doc.get(key) == value else None


def own_json(path, key: str, value: str, *, limit: int = 2**20) -> bool:
    """Whether ``path`` is a regular file of at most ``limit`` bytes holding a JSON object with ``key`` =
    ``value`` (how an output marker, a merge record or a report is recognised as this package's own).
    Opened without blocking: a FIFO is not waited on, and anything but a regular file is not ours."""
    try:
        fd = os.open(path, _READ)
    except OSError:
        return False
    return _record_fd(fd, key, value, limit) is not None


def owned(path, key: str, value: str, *, marker: str | None = None, limit: int = 2**20):
    """The identity of ``path`` when it is a record of ours, else None: a regular file (not a link)
    as ``own_json`` accepts, or with ``marker`` a folder (not a link) holding such a file of that name,
    read through a descriptor of the folder whose identity is returned."""
    try:
        if marker is None:
            return _record_fd(os.open(path, _READ | os.O_NOFOLLOW), key, value, limit)
        dfd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(dfd)
        fd = os.open(marker, _READ, dir_fd=dfd)
    except OSError:
        return None
    finally:
        os.close(dfd)
    return (st.st_dev, st.st_ino) if _record_fd(fd, key, value, limit) is not None else None
