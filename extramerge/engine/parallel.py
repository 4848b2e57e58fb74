"""Worker pools of the streaming passes: an ordered thread map and forked worker processes.

Both keep BLAS single-threaded in each worker, since the workers already use every core.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import mmap
import os
import select
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from ..io.errors import error_bytes, rebuild_error

__all__ = ["ordered_map", "can_fork", "run_forked"]

_BLAS_LOCAL: list = []


def _blas_single_thread() -> None:
    """Keep BLAS calls made from this thread single-threaded: our workers already use every core, and
    OpenBLAS's own threads would oversubscribe them (measured: 2x slower Gram pass on 2 cores). Uses
    OpenBLAS's per-thread ``openblas_set_num_threads_local`` (0.3.27+) where numpy's OpenBLAS has it;
    a no-op elsewhere."""
    if not _BLAS_LOCAL:
        fns = []
        try:
            with open("/proc/self/maps") as f:
                libs = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
            for lib in sorted(libs):
                handle = ctypes.CDLL(lib)
                for sym in ("openblas_set_num_threads_local", "scipy_openblas_set_num_threads_local64_"):
                    fn = getattr(handle, sym, None)
                    if fn is not None:
                        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
                        fns.append(fn)
                        break
        except OSError:
            pass
        _BLAS_LOCAL.append(fns)
    for fn in _BLAS_LOCAL[0]:
        fn(1)


_END = object()


def ordered_map(fn: Callable, items: Iterable, *, workers: int, depth: int) -> Iterator:
    """fn(item) for each item on ``workers`` threads, yielded in order, with at most ``depth`` items
    submitted ahead of the consumer. workers=0 runs inline. Closing the generator (or an exception in
    fn, re-raised here) cancels what has not started and waits for what has."""
    items = iter(items)
    if workers <= 0:
        for item in items:
            yield fn(item)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="extramerge", initializer=_blas_single_thread)
    pending: deque = deque()
    try:
        for item in itertools.islice(items, max(depth, workers)):
            pending.append(pool.submit(fn, item))
        while pending:
            result = pending.popleft().result()
            nxt = next(items, _END)
            if nxt is not _END:
                pending.append(pool.submit(fn, nxt))
            yield result
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True)


def can_fork() -> bool:
    """Whether CPU-bound passes may run in forked worker processes: Linux, and no other Python thread
    (forking a multi-threaded process can leave a lock held forever in the child)."""
    return hasattr(os, "fork") and sys.platform.startswith("linux") and threading.active_count() == 1


_ERR_BYTES = 4096


def run_forked(
    jobs: list[Callable[[], None]],
    *,
    poll: Callable[[], None] | None = None,
    idle: Callable[[], None] | None = None,
    before: Callable[[], None] | None = None,
) -> None:
    """Run each job in a forked child process and wait for all of them.

    Threads would serialise here: numpy releases the GIL inside each call, but handing it back and forth
    between threads every few tens of microseconds costs as much as the calls (measured: 2 threads 1.3x,
    2 processes 1.9x one). Children share the parent's memory copy-on-write; jobs report through shared
    memory the caller maps before forking (``mmap.mmap(-1, n)``). ``before`` runs first in each child,
    ``idle`` once in the parent right after forking (work it can overlap), ``poll`` in the parent every
    20 ms while it waits (progress). A child's exception is re-raised in the parent (CheckpointError,
    ValueError and OSError keep their type and message) as soon as that child ends; the other children
    are killed. Children die with the parent (PR_SET_PDEATHSIG).
    """
    errors = mmap.mmap(-1, _ERR_BYTES * len(jobs))
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    pids: list[int] = []
    ends: dict[int, int] = {}  # read end of a pipe whose write end only child pid holds: EOF = it ended
    try:
        for k, job in enumerate(jobs):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # child: never returns
                code = 1
                try:
                    for fd in (r, *ends):
                        os.close(fd)
                    with contextlib.suppress(Exception):
                        ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
                    _blas_single_thread()
                    if before is not None:
                        before()
                    job()
                    code = 0
                except BaseException as e:  # noqa: BLE001 - everything is reported to the parent
                    msg = error_bytes(e, _ERR_BYTES - 1)
                    errors[k * _ERR_BYTES : k * _ERR_BYTES + len(msg)] = msg
                finally:
                    os._exit(code)
            os.close(w)
            ends[r] = pid
            pids.append(pid)
        if idle is not None:
            idle()
        failed = None
        while ends and failed is None:
            ready, _, _ = select.select(list(ends), [], [], 0.02 if poll is not None else None)
            for r in ready:
                pid = ends.pop(r)
                os.close(r)
                if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0 and failed is None:
                    failed = pids.index(pid)
            if poll is not None:
                poll()
        if failed is not None:
            raise rebuild_error(errors[failed * _ERR_BYTES : (failed + 1) * _ERR_BYTES])
    finally:
        for r in ends:
            os.close(r)
        for pid in pids:  # on failure or interrupt: stop the others, and reap every child
            with contextlib.suppress(OSError):
                if os.waitpid(pid, os.WNOHANG) == (0, 0):
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
        errors.close()
