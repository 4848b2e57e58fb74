"""An attacker for the race tests: a separate process that swaps two paths in a loop, as someone who can
write their parent folder would (docs/SECURITY.md; issue 21 item 4).

Public helpers:
    can_exchange(folder)     whether renameat2(RENAME_EXCHANGE) works in ``folder`` (Linux, most file systems)
    exchange(a, b)           swap the entries ``a`` and ``b`` atomically (both always exist)
    swapping(a, b)           context manager: a process exchanging ``a`` and ``b`` as fast as it can until
                             the block ends (then the swaps stop; which one is where is left as it falls)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2

_LOOP = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
a, b = os.fsencode(sys.argv[1]), os.fsencode(sys.argv[2])
sys.stdout.write("go\n"); sys.stdout.flush()
while True:
    libc.renameat2(-100, a, -100, b, 2)
"""


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def exchange(a, b) -> None:
    """Swap the directory entries ``a`` and ``b`` in one step (renameat2 RENAME_EXCHANGE)."""
    libc = _libc()
    if libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(a))


def can_exchange(folder) -> bool:
    try:
        if not hasattr(_libc(), "renameat2"):
            return False
        with tempfile.TemporaryDirectory(dir=folder) as d:
            Path(d, "a").write_text("a")
            Path(d, "b").mkdir()
            exchange(Path(d, "a"), Path(d, "b"))
            return Path(d, "a").is_dir()
    except OSError:
        return False


@contextlib.contextmanager
def swapping(a, b):
    """Run the swapping process for the block (started before the block begins, stopped after)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _LOOP, os.fspath(a), os.fspath(b)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "go"
        time.sleep(0.01)
        yield proc
    finally:
        proc.kill()
        proc.wait()
