"""The streaming engine: Σ_j w_j θ_j over real checkpoints, chunk by chunk, with numpy only.

The model is cut into units of about ``chunk_bytes`` per checkpoint (a slice of a large tensor, or a run
of small tensors). A small thread pool works on consecutive units: each worker maps the unit's pages of
every checkpoint in (madvise POPULATE_READ on the shared read-only maps of the safetensors files: no
copy), accumulates Σ_j w_j x_j in float32 (or float64) in cache-sized blocks (tmp = w·x stays in L2,
acc += tmp), casts to the output dtype (bfloat16 through ml_dtypes, round-to-nearest-even) into a pooled
buffer and unmaps the pages again (madvise DONTNEED), so resident memory stays a few units. The calling
thread meanwhile hands finished units, in order, to the streaming writer (direct I/O for large outputs),
so reading, arithmetic and writing overlap. Peak memory is a few units — independent of the model size
and of the number of checkpoints — except for PyTorch-file outputs, which torch.save must hold whole
(and PyTorch-file inputs, which torch memory-maps itself: their touched pages count as resident).

torch is never imported for safetensors inputs and outputs. Checkpoints with weight exactly 0 are not
read at all. Integer and bool tensors (step counters, masks) are not averaged: they are copied from the
newest checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import itertools
import mmap
import os
import resource
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rivervalley.memory import require_memory

from .checkpoints import (
    _DIRECT_BLOCK,
    Checkpoint,
    CheckpointError,
    TensorInfo,
    check_compatible,
    check_merge_output,
    check_output,
    default_format,
    output_layout,
    to_numpy,
    to_torch,
    write_checkpoint,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MERGE_CHUNK_BYTES",
    "MergeSummary",
    "iter_aligned",
    "iter_chunks",
    "iter_reads",
    "weighted_sum",
    "merge_weights",
    "output_dtype",
]

DEFAULT_CHUNK_BYTES = 16 * 2**20
MERGE_CHUNK_BYTES = 4 * 2**20  # per checkpoint and unit: 8 checkpoints x 4 MiB mapped per worker
_BLOCK = 64 * 2**10  # elements per arithmetic block: acc and tmp (float32) take 512 KiB of L2
_DTYPES = {
    "float32": "F32", "fp32": "F32", "float": "F32",
    "bfloat16": "BF16", "bf16": "BF16",
    "float16": "F16", "fp16": "F16", "half": "F16",
    "float64": "F64", "fp64": "F64", "double": "F64",
}  # fmt: skip
_INLINE_BYTES = 256 * 2**10  # zero-copy views this small are made on the spot, not on a reader thread


# ------------------------------------------------------------------------------------------ threading


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


def _ordered_map(fn: Callable, items: Iterable, *, workers: int, depth: int) -> Iterator:
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
    import select

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
                    msg = f"{type(e).__name__}\0{e}".encode(errors="replace")[: _ERR_BYTES - 1]
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
            raise _child_error(errors[failed * _ERR_BYTES : (failed + 1) * _ERR_BYTES])
    finally:
        for r in ends:
            os.close(r)
        for pid in pids:  # on failure or interrupt: stop the others, and reap every child
            with contextlib.suppress(OSError):
                if os.waitpid(pid, os.WNOHANG) == (0, 0):
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
        errors.close()


def _child_error(raw: bytes) -> BaseException:
    kind, _, msg = raw.rstrip(b"\0").decode(errors="replace").partition("\0")
    for cls in (CheckpointError, ValueError, OSError, MemoryError):
        if kind == cls.__name__:
            return cls(msg)
    if not kind:
        return RuntimeError("a worker process died without reporting an error (out of memory?)")
    return RuntimeError(f"worker process failed: {kind}: {msg}")


def _advise_spans(spans: list, advice: str) -> None:
    """madvise ('populate' | 'drop') the byte ranges [(file, lo, hi), ...], merging adjacent ranges of
    one file into one call."""
    by_file: dict = {}
    for f, lo, hi in spans:
        by_file.setdefault(id(f), (f, []))[1].append((lo, hi))
    for f, ranges in by_file.values():
        ranges.sort()
        cur_lo, cur_hi = ranges[0]
        for lo, hi in ranges[1:]:
            if lo <= cur_hi + mmap.PAGESIZE:
                cur_hi = max(cur_hi, hi)
            else:
                f.madvise_span(cur_lo, cur_hi, advice)
                cur_lo, cur_hi = lo, hi
        f.madvise_span(cur_lo, cur_hi, advice)
        if advice == "populate":
            f.check_size()  # a file that shrank meanwhile: an error now rather than SIGBUS on first touch


def _unit_arrays(ckpts, infos, segs, sources, *, zero_copy: bool, scratch, read_bytes: int):
    """For each segment (name, a, b) of a unit, elements [a, b) of every checkpoint index in
    ``sources(name)`` as numpy arrays: views of the memory-mapped files (whose byte spans are returned,
    to be populated before use and dropped after) or, for files we cannot map, preads into this
    thread's buffers (``read_bytes`` per source) — valid until the thread's next unit."""
    spans: list = []
    arrays, at = [], 0
    for name, a, b in segs:
        row = []
        for k, j in enumerate(sources(name)):
            ck = ckpts[j]
            where = ck.span(name, a, b) if zero_copy else None
            if where is not None:
                spans.append(where)
                row.append(ck.view_range(name, a, b, numpy=True))
            else:
                nbytes = (b - a) * infos[name].itemsize
                buf = scratch.get(("read", k), (read_bytes,), np.uint8)
                row.append(ck.read_range(name, a, b, buf[at : at + nbytes], numpy=True))
        arrays.append(row)
        at += _align((b - a) * infos[name].itemsize)
    return arrays, spans


# ----------------------------------------------------------------------------------------- read pipeline


def _ranges(numel: int, chunk: int) -> list[tuple[int, int]]:
    """[start, stop) element ranges covering a tensor; an empty tensor still gets one (empty) range."""
    if numel == 0:
        return [(0, 0)]
    return [(a, min(a + chunk, numel)) for a in range(0, numel, chunk)]


def _read(ck: Checkpoint, name: str, start, stop, buf):
    if start is None:
        return ck.read(name, numpy=True)
    return ck.read_range(name, start, stop, buf, numpy=True)


def _view(ck: Checkpoint, name: str, start: int, stop: int, populate: bool = True):
    if populate:  # page faults (and disk reads) happen here, off the main thread
        ck.advise(name, start, stop, "populate")
    return ck.view_range(name, start, stop, numpy=True)


class _Done:
    """An already computed result with a Future's ``result``/``cancel`` (cheaper than a Future)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value

    def cancel(self) -> bool:
        return False


def _pipeline(
    units: Iterable,
    *,
    depth: int,
    workers: int,
    buf_bytes: int | None,
    max_bytes: int | None = None,
    zero_copy: bool = False,
):
    """Run the reads of each unit (tag, [(ckpt, name, start, stop), ...]) on a thread pool, at most ``depth``
    units (and about ``max_bytes``) in flight ahead of the consumer; yield (tag, arrays) in order.

    Ranged reads (start is not None) are valid only until the consumer asks for the next unit: with
    ``zero_copy`` they are views of the memory-mapped files whose pages are populated by the reader threads
    and dropped from the process afterwards; otherwise (or where a file cannot be mapped) they land in
    reusable buffers of ``buf_bytes``. Whole-tensor reads (start None) are fresh and may be kept.
    """
    free: list[np.ndarray] = []
    pool = ThreadPoolExecutor(workers, thread_name_prefix="extramerge-read") if workers > 0 else None
    depth = max(depth, 1) if pool is not None else 0
    pending: deque = deque()
    touched: set = set()
    inflight = 0
    units = iter(units)

    def submit() -> bool:
        nonlocal inflight
        unit = next(units, None)
        if unit is None:
            return False
        tag, reads = unit
        futs, bufs, nbytes = [], [], 0
        for ck, name, start, stop in reads:
            fn, args = _read, (ck, name, start, stop, None)
            if start is not None and zero_copy and ck._mappable(name):
                fn, args = _view, (ck, name, start, stop)
                bufs.append((ck, name, start, stop))
                touched.add(ck)
            elif buf_bytes and start is not None and ck._copies(name):
                buf = free.pop() if free else np.empty(buf_bytes, dtype=np.uint8)
                args = (ck, name, start, stop, buf)
                bufs.append(buf)
            info = ck.infos[ck.aliases.get(name, name)]
            size = (info.numel if start is None else stop - start) * info.itemsize
            nbytes += size
            if pool is None or (fn is _view and size <= _INLINE_BYTES):  # a thread hop costs more
                fut = _Done(fn(*args, False) if fn is _view else fn(*args))
            else:
                fut = pool.submit(fn, *args)
            futs.append(fut)
        pending.append((tag, futs, bufs, nbytes))
        inflight += nbytes
        return True

    def room() -> bool:
        return len(pending) < depth and (max_bytes is None or inflight < max_bytes)

    held: list = []
    try:
        while room() and submit():
            pass
        while pending or submit():
            tag, futs, bufs, nbytes = pending.popleft()
            results = [f.result() for f in futs]
            inflight -= nbytes
            _release(held, free)  # the consumer is done with the previous unit
            held = bufs
            while room() and submit():
                pass
            yield tag, results
    finally:
        for _, futs, _, _ in pending:
            for f in futs:
                f.cancel()
        if pool is not None:
            pool.shutdown(wait=True)  # no read may still be filling a buffer we drop
        _release(held, free)
        for _, _, bufs, _ in pending:
            _release(bufs, free)
        for ck in touched:
            ck.flush_advice()


def _release(held: list, free: list) -> None:
    """Hand buffers back to the pool; unmap the pages of consumed zero-copy views."""
    for h in held:
        if isinstance(h, tuple):
            ck, name, start, stop = h
            ck.advise(name, start, stop, "drop")
        else:
            free.append(h)


def _names(ckpts: Sequence[Checkpoint], names) -> list[str]:
    if names is None:
        return list(check_compatible(ckpts))
    return list(names)


def _as(arrays: list, numpy: bool) -> list:
    return arrays if numpy else [to_torch(a) for a in arrays]


def iter_aligned(
    ckpts: Sequence[Checkpoint],
    names: Iterable[str] | None = None,
    *,
    prefetch: int = 2,
    workers: int = 2,
    max_bytes: int | None = 2**30,
    numpy: bool = False,
) -> Iterator[tuple[str, list]]:
    """For each tensor name in order: the N checkpoints' whole tensors (fresh or memory-mapped, the
    caller may keep them; torch tensors, or numpy arrays with ``numpy``). At most ``prefetch`` groups
    (and about ``max_bytes``) are read ahead on ``workers`` threads, so memory is about
    (prefetch + 1) × N × one tensor; for very large tensors prefer ``iter_chunks``, whose memory does not
    grow with the tensor."""
    units = (((name), [(ck, name, None, None) for ck in ckpts]) for name in _names(ckpts, names))
    pipe = _pipeline(units, depth=prefetch, workers=workers, buf_bytes=None, max_bytes=max_bytes)
    for name, arrays in pipe:
        yield name, _as(arrays, numpy)


def iter_chunks(
    ckpts: Sequence[Checkpoint],
    names: Iterable[str] | None = None,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    prefetch: int = 2,
    workers: int = 2,
    zero_copy: bool = True,
    numpy: bool = False,
) -> Iterator[tuple[str, int, int, list]]:
    """(name, start, stop, [N flat pieces]) covering each tensor in chunks of about ``chunk_bytes`` bytes
    per checkpoint. The pieces (torch tensors, or numpy arrays with ``numpy``) are zero-copy views of the
    memory-mapped files (or, with ``zero_copy=False`` or a file that cannot be mapped, reused buffers):
    valid only until the next item is requested, never to be modified. Memory stays about
    (prefetch + 1) × N × chunk_bytes whatever the tensor sizes; inner products such as a Gram matrix
    accumulate chunk by chunk (G += P Pᵀ)."""
    names = _names(ckpts, names)
    ref = ckpts[-1]

    def units():
        for name in names:
            info = ref.infos[ref.aliases.get(name, name)]
            for a, b in _ranges(info.numel, max(1, chunk_bytes // info.itemsize)):
                yield (name, a, b), [(ck, name, a, b) for ck in ckpts]

    itemsize = max((i.itemsize for i in ref.infos.values()), default=1)
    buf_bytes = max(chunk_bytes, itemsize)
    pipe = _pipeline(units(), depth=prefetch, workers=workers, buf_bytes=buf_bytes, zero_copy=zero_copy)
    for (name, a, b), pieces in pipe:
        yield name, a, b, _as(pieces, numpy)


def iter_reads(
    ckpts: Sequence[Checkpoint],
    requests: Iterable[tuple[int, str, int, int]],
    *,
    buf_bytes: int = DEFAULT_CHUNK_BYTES,
    prefetch: int = 4,
    workers: int = 2,
    zero_copy: bool = True,
    numpy: bool = False,
) -> Iterator[tuple[tuple[int, str, int, int], object]]:
    """Read ``requests`` (checkpoint index, name, start, stop) in order with ``prefetch`` reads in flight;
    yields (request, flat piece), the piece valid until the next item is requested (a view of the
    memory-mapped file, or a reused buffer of ``buf_bytes``) and never to be modified."""
    units = ((r, [(ckpts[r[0]], r[1], r[2], r[3])]) for r in requests)
    pipe = _pipeline(units, depth=prefetch, workers=workers, buf_bytes=buf_bytes, zero_copy=zero_copy)
    for req, (piece,) in pipe:
        yield req, piece if numpy else to_torch(piece)


# ------------------------------------------------------------------------------------------- arithmetic


def _is_float_array(a: np.ndarray) -> bool:
    return a.dtype.kind == "f" or a.dtype.name in ("bfloat16", "float8_e5m2", "float8_e4m3fn")


def _all_finite(a: np.ndarray) -> bool:
    if a.dtype.kind != "f":  # bfloat16 / float8 (ml_dtypes): check in float32
        a = a.astype(np.float32)
    return bool(np.isfinite(a).all())


def weighted_sum(tensors: Sequence, weights, *, accumulate="float32"):
    """Σ_j w_j t_j accumulated in ``accumulate`` (float32 by default; a name or a numpy/torch dtype)
    whatever the input dtype; returned in the accumulation dtype, as a torch tensor when the inputs are
    torch tensors, else a numpy array. Integer/bool tensors are not averaged: the last (newest) one is
    returned."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(tensors) != w.size:
        raise ValueError(f"got {w.size} weights for {len(tensors)} tensors")
    if not tensors:
        raise ValueError("weighted_sum of no tensors")
    torch_in = not isinstance(tensors[-1], np.ndarray)
    arrays = [to_numpy(t) for t in tensors]
    if not _is_float_array(arrays[-1]):
        out = arrays[-1].copy()
    else:
        acc = np.dtype(_accumulate_name(accumulate))
        out = np.zeros(arrays[0].shape, dtype=acc)
        tmp = np.empty_like(out)
        for a, wj in zip(arrays, w, strict=True):
            if wj != 0.0:
                np.copyto(tmp, a)
                tmp *= acc.type(wj)
                out += tmp
    return to_torch(out) if torch_in else out


def _output_code(info: TensorInfo, dtype: str) -> str:
    if dtype == "same" or not info.is_float:
        return info.dtype_str
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; choose same, float32, bfloat16, float16 or float64"
        ) from None


def output_dtype(info: TensorInfo, dtype: str):
    """The (torch) dtype a tensor is written in: 'same' keeps it; otherwise floating tensors are cast to
    ``dtype`` and integer/bool tensors keep theirs. The engine itself uses the safetensors code."""
    return TensorInfo(info.name, info.shape, _output_code(info, dtype)).dtype


def _accumulate_name(accumulate) -> str:
    name = str(accumulate).removeprefix("torch.")
    name = {"F32": "float32", "F64": "float64"}.get(name, name)
    name = {"fp32": "float32", "float": "float32", "fp64": "float64", "double": "float64"}.get(name, name)
    if name not in ("float32", "float64"):
        raise ValueError(f"accumulate must be float32 or float64, got {accumulate!r}")
    return name


class _Scratch(threading.local):
    """Per-thread L2-sized work arrays (and pread buffers for files that cannot be mapped)."""

    def get(self, key, shape, dtype) -> np.ndarray:
        cache = self.__dict__.setdefault("arrays", {})
        a = cache.get(key)
        size = int(np.prod(shape))
        if a is None or a.dtype != dtype or a.size < size:
            a = cache[key] = np.empty(size, dtype=dtype)
        return a[:size].reshape(shape)


def _weighted_into(out: np.ndarray, xs: list, ws: list, acc: np.dtype, scratch: _Scratch, check: bool):
    """out = Σ_k ws[k] xs[k], accumulated in ``acc`` block by block so the block's acc and tmp stay in
    L2; cast to out's dtype (round-to-nearest-even) per block. Returns the first block start whose
    result is not finite (when ``check``), else None."""
    n = out.size
    direct = out.dtype == acc
    blk = min(_BLOCK, max(n, 1))
    tmp_all = scratch.get("tmp", (blk,), acc)
    acc_all = tmp_all if direct else scratch.get("acc", (blk,), acc)
    for s in range(0, n, blk):
        e = min(s + blk, n)
        m = e - s
        a = out[s:e] if direct else acc_all[:m]
        tmp = tmp_all[:m]
        for k, x in enumerate(xs):
            xb = x[s:e]
            if xb.dtype != acc:
                np.copyto(tmp, xb)  # exact widening: bfloat16/float16/float8 -> float32, float32 -> float64
                xb = tmp
            if k == 0:
                np.multiply(xb, ws[k], out=a)
            else:
                np.multiply(xb, ws[k], out=tmp)
                np.add(a, tmp, out=a)
        if check and not np.isfinite(a.sum()) and not np.isfinite(a).all():
            return s
        if not direct:
            ob = out[s:e]
            np.copyto(ob, a, casting="unsafe")
            if check and ob.dtype == np.float16 and not np.isfinite(ob).all():
                return -1 - s  # finite in the accumulator, overflowed in float16
    return None


# ---------------------------------------------------------------------------------------------- summary


def _rss_now() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _rss_peak() -> int:
    """This process's resident high-water mark: VmHWM (per address space, so unlike ru_maxrss it does not
    carry over the parent's peak into an exec'ed child), falling back to ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if os.uname().sysname == "Darwin" else peak * 1024


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n}"


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, progress: bool):
    """A tqdm bar over bytes read with ETA; importing tqdm costs ~0.1 s, so only when shown."""
    if not progress:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merge", mininterval=0.5)


@dataclass
class MergeSummary:
    """What a merge did (or, for a dry run, would do). Bytes are tensor data bytes."""

    output: Path
    files: list[Path]
    format: str
    weights: list[float]
    steps: list[int | None]
    n_checkpoints: int
    n_read: int
    n_tensors: int
    n_copied: int
    bytes_read: int
    bytes_written: int
    seconds: float
    read_bandwidth: float
    peak_rss_bytes: int
    merge_rss_bytes: int
    projected_peak_rss_bytes: int
    dtype: str
    accumulate: str
    dry_run: bool = False
    workers: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        head = (
            "extramerge dry run (nothing written)" if self.dry_run else f"extramerge merged -> {self.output}"
        )
        ws = [f"{x:+.4g}" for x in self.weights]
        w = ", ".join(ws if len(ws) <= 12 else [*ws[:4], "...", *ws[-6:]])
        steps = [s for s in self.steps if s is not None]
        span = f", steps {steps[0]}..{steps[-1]}" if len(steps) == len(self.steps) and steps else ""
        lines = [
            head,
            f"  checkpoints   {self.n_checkpoints} given{span}, {self.n_read} read (weight != 0)",
            f"  weights       [{w}] (oldest first, sum {sum(self.weights):.6g})",
            f"  tensors       {self.n_tensors} ({self.n_copied} integer/bool copied from the newest)",
            f"  format        {self.format}, dtype {self.dtype}, accumulate {self.accumulate}",
        ]
        if self.dry_run:
            lines += [
                f"  would read    {_fmt_bytes(self.bytes_read)}",
                f"  would write   {_fmt_bytes(self.bytes_written)}",
                f"  peak memory   ~{_fmt_bytes(self.projected_peak_rss_bytes)} projected",
            ]
        else:
            t = self.timings
            # Workers map pages in/out (read_wait) and compute while the writer writes: these overlap.
            threads = f"on {self.workers} worker thread(s)" if self.workers else "inline"
            work = ", ".join(f"{k} {t[k]:.2f}s" for k in ("read_wait", "compute") if k in t)
            io = ", ".join(f"{k} {t[k]:.2f}s" for k in ("write", "fsync", "publish") if k in t)
            lines += [
                f"  read          {_fmt_bytes(self.bytes_read)} at {_fmt_bytes(self.read_bandwidth)}/s",
                f"  written       {_fmt_bytes(self.bytes_written)} in {len(self.files)} file(s)",
                f"  time          {self.seconds:.2f}s ({work} {threads}; overlapped with {io})",
                f"  peak memory   {_fmt_bytes(self.merge_rss_bytes)} during the merge "
                f"(process high-water mark {_fmt_bytes(self.peak_rss_bytes)}; "
                f"projected {_fmt_bytes(self.projected_peak_rss_bytes)})",
            ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ merge


def _raise_fd_limit(need: int) -> None:
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < need:
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY else min(hard, need), hard)
            )
    except (ValueError, OSError):
        pass


def _first_existing(p: Path) -> Path:
    p = Path(os.path.abspath(p))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _nonfinite_error(ckpts, active, name, a, b, acc_name) -> CheckpointError:
    for j in active:
        piece = ckpts[j].read_range(name, a, b, numpy=True)
        if not _all_finite(piece):
            return CheckpointError(
                f"tensor '{name}' in {ckpts[j].name} contains NaN or Inf values (allow_nonfinite=True / "
                "--allow-nonfinite merges anyway)"
            )
    return CheckpointError(
        f"tensor '{name}': the merged values overflow {acc_name} (try accumulate='float64')"
    )


def plan_units(infos: dict[str, TensorInfo], chunk: int) -> list[list[tuple[str, int, int]]]:
    """Units of work in write order: lists of (name, start, stop) segments of about ``chunk`` elements
    in all (a slice of a large tensor, or a run of small tensors)."""
    units: list[list[tuple[str, int, int]]] = []
    cur: list[tuple[str, int, int]] = []
    used = 0
    for name, info in infos.items():
        for a, b in _ranges(info.numel, chunk):
            if cur and used + (b - a) > chunk:
                units.append(cur)
                cur, used = [], 0
            cur.append((name, a, b))
            used += b - a
    if cur:
        units.append(cur)
    return units


def _align(n: int, to: int = 64) -> int:
    return -(-n // to) * to


def _unit_bytes(units: list, infos: dict[str, TensorInfo]) -> int:
    """Bytes of the largest unit, each segment cache-line aligned."""
    return max((sum(_align((b - a) * infos[n].itemsize) for n, a, b in u) for u in units), default=1)


def merge_weights(
    ckpts: Sequence[Checkpoint],
    weights,
    output: str | os.PathLike,
    *,
    dtype: str = "same",
    accumulate: str = "float32",
    shard_size: int = 5 * 2**30,
    allow_nonfinite: bool = False,
    dry_run: bool = False,
    force: bool = False,
    progress: bool = True,
    metadata: dict[str, str] | None = None,
    record: dict | None = None,
    fmt: str | None = None,
    chunk_bytes: int = MERGE_CHUNK_BYTES,
    prefetch: int = 4,
    workers: int = 2,
    fsync: bool = True,
    zero_copy: bool = True,
    direct_io: bool | None = None,
) -> MergeSummary:
    """Write Σ_j w_j θ_j of ``ckpts`` (oldest first, one weight each) to ``output``, streaming.

    Floating tensors accumulate in ``accumulate`` (float32 or float64) and are written in ``dtype``
    ('same' keeps each tensor's dtype; 'float32', 'bfloat16', 'float16' cast floating tensors, rounding
    to nearest even). Integer and bool tensors are copied from the newest checkpoint; checkpoints with
    weight exactly 0 are not read. NaN/Inf in an input raises CheckpointError naming the tensor and file
    (unless ``allow_nonfinite``). Everything is validated before the first byte is read: compatibility
    of all checkpoints, the weights, the output path and the free disk space; ``dry_run`` stops there and
    returns projected bytes and memory. ``fmt`` defaults to the output's suffix (.safetensors, .pt, ...)
    or else the newest checkpoint's format family (see checkpoints.default_format); ``record`` extends the
    merge.json record.

    Tuning: units of ``chunk_bytes`` per checkpoint are computed on ``workers`` threads (0: inline), at
    most ``prefetch`` units ahead of the writer; ``zero_copy`` reads safetensors through memory maps
    (pages dropped after use) instead of pread into buffers; ``fsync=False`` skips flushing the output to
    disk before it is published; ``direct_io`` (None: automatic) writes large safetensors with O_DIRECT.
    """
    t0 = time.perf_counter()
    ckpts = list(ckpts)
    if not ckpts:
        raise ValueError("no checkpoints given")
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size != len(ckpts):
        raise ValueError(
            f"got {w.size} weights for {len(ckpts)} checkpoints: give exactly one per checkpoint"
        )
    if not np.all(np.isfinite(w)):
        raise ValueError(f"weights must be finite, got {w.tolist()}")
    active = [j for j in range(len(ckpts)) if w[j] != 0.0]
    if not active:
        raise ValueError("all weights are zero")
    acc_name = _accumulate_name(accumulate)
    infos = check_compatible(ckpts)
    template = ckpts[-1]
    fmt = fmt or default_format(output, template)
    out_infos = {n: TensorInfo(n, i.shape, _output_code(i, dtype)) for n, i in infos.items()}
    out_path = check_output(output, ckpts, force=force, clean=not dry_run)  # a dry run changes nothing
    out_path, _ = output_layout(out_path, fmt, template)
    check_merge_output(out_path)  # what --force may replace: refused now, not after the merge

    notes = []
    if acc_name != "float64" and any(i.dtype_str == "F64" for i in infos.values()):
        acc_name = "float64"  # never accumulate below the inputs' precision
        notes.append("float64 inputs: accumulating in float64")
    acc = np.dtype(acc_name)
    if abs(w.sum() - 1.0) > 1e-6:
        notes.append(f"weights sum to {w.sum():.6g}, not 1: the result is not an affine merge")
    copied = [n for n, i in infos.items() if not i.is_float]
    n_torch = sum(1 for j in active if ckpts[j].format in ("torch", "hf-bin"))
    bytes_read = sum(i.nbytes * (len(active) if i.is_float else 1) for i in infos.values())
    bytes_written = sum(i.nbytes for i in out_infos.values())
    chunk = max(1, chunk_bytes // 4)
    units = plan_units(infos, chunk)
    in_itemsize = max((i.itemsize for i in infos.values()), default=1)
    unit_bytes = max(
        (sum(_align((b - a) * out_infos[n].itemsize) for n, a, b in u) for u in units), default=1
    )
    read_bytes = max((sum(_align((b - a) * infos[n].itemsize) for n, a, b in u) for u in units), default=1)
    collects = fmt in ("torch", "hf-bin")
    n_workers = max(workers, 1)
    projected = (
        _rss_now()
        + n_workers
        * len(active)
        * min(chunk, max((i.numel for i in infos.values()), default=0))
        * in_itemsize
        + (max(prefetch, n_workers) + 1) * unit_bytes
        + n_workers * 2 * _BLOCK * acc.itemsize
        + (2 * _DIRECT_BLOCK if not collects else 0)  # the direct-I/O blocks
        + (bytes_written if collects else 0)
        + (bytes_read if n_torch else 0)  # torch-file inputs are memory-mapped: touched pages count as RSS
    )
    free_disk = shutil.disk_usage(_first_existing(out_path.parent)).free
    if bytes_written > free_disk:
        raise CheckpointError(
            f"output {output}: needs {_fmt_bytes(bytes_written)} but only {_fmt_bytes(free_disk)} is "
            "free there"
        )
    anon = projected - _rss_now() - (bytes_read if n_torch else 0)  # mapped input pages can be reclaimed
    require_memory(
        anon, f"merge to {output} ({'buffers and the collected output' if collects else 'buffers'})"
    )
    if dtype == "float16" and any(i.dtype_str in ("BF16", "F32") for i in infos.values()):
        notes.append("casting to float16 can overflow values beyond ±65504; overflow raises an error")

    summary = MergeSummary(
        output=out_path,
        files=[],
        format=fmt,
        weights=[float(x) for x in w],
        steps=[c.step for c in ckpts],
        n_checkpoints=len(ckpts),
        n_read=len(active),
        n_tensors=len(infos),
        n_copied=len(copied),
        bytes_read=bytes_read,
        bytes_written=bytes_written,
        seconds=0.0,
        read_bandwidth=0.0,
        peak_rss_bytes=_rss_peak(),
        merge_rss_bytes=_rss_now(),
        projected_peak_rss_bytes=projected,
        dtype=dtype,
        accumulate=acc_name,
        dry_run=dry_run,
        workers=workers,
        notes=notes,
    )
    if dry_run:
        summary.seconds = time.perf_counter() - t0
        return summary

    newest = len(ckpts) - 1
    w_active = [acc.type(w[j]) for j in active]

    def sources(name: str) -> list[int]:
        return active if infos[name].is_float else [newest]

    scratch = _Scratch()
    stats = {"read_wait": 0.0, "compute": 0.0, "wait": 0.0}
    stats_lock = threading.Lock()

    def run(item):
        """One unit on a worker: map its pages in, compute into the unit's output buffer, unmap."""
        segs, buf = item
        t_a = time.perf_counter()
        srcs, spans = _unit_arrays(
            ckpts, infos, segs, sources, zero_copy=zero_copy, scratch=scratch, read_bytes=read_bytes
        )
        if spans:
            _advise_spans(spans, "populate")  # page faults (and any disk reads) happen here, in one go
        t_b = time.perf_counter()
        pieces, off, nread = [], 0, 0
        try:
            for (name, a, b), xs in zip(segs, srcs, strict=True):
                oinfo = out_infos[name]
                n = b - a
                out = buf[off : off + n * oinfo.itemsize].view(oinfo.np_dtype)
                off += _align(n * oinfo.itemsize)
                nread += sum(x.nbytes for x in xs)
                if not infos[name].is_float:
                    np.copyto(out, xs[0])
                    pieces.append((name, out))
                    continue
                with np.errstate(over="ignore", invalid="ignore"):  # non-finite results are checked
                    bad = _weighted_into(out, xs, w_active, acc, scratch, not allow_nonfinite)
                if bad is not None and bad < 0:
                    raise CheckpointError(
                        f"tensor '{name}': merged values overflow float16; choose dtype float32 or bfloat16"
                    )
                if bad is not None:
                    raise _nonfinite_error(ckpts, active, name, a, b, acc_name)
                pieces.append((name, out))
        finally:
            t_c = time.perf_counter()
            if spans:
                _advise_spans(spans, "drop")
            t_d = time.perf_counter()
            with stats_lock:
                stats["read_wait"] += (t_b - t_a) + (t_d - t_c)
                stats["compute"] += t_c - t_b
        return pieces, nread, buf

    _raise_fd_limit(sum(len(c.files) for c in ckpts) + 256)  # each memory-mapped file keeps a descriptor
    rss = [summary.merge_rss_bytes]
    bar = _progress_bar(bytes_read, progress)
    free: list[np.ndarray] = []

    def with_buffers():
        for segs in units:
            yield segs, (free.pop() if free else np.empty(unit_bytes, dtype=np.uint8))

    def produce():
        results = _ordered_map(run, with_buffers(), workers=workers, depth=max(prefetch, workers))
        sampled = time.perf_counter()
        with contextlib.closing(results):  # stop the workers now, even when the writer fails
            while True:
                t_a = time.perf_counter()
                item = next(results, None)
                t_b = time.perf_counter()
                stats["wait"] += t_b - t_a
                if item is None:
                    return
                pieces, nread, buf = item
                bar.update(nread)
                if t_b - sampled > 0.05:  # sample resident memory ~20 times a second
                    sampled = t_b
                    rss.append(_rss_now())
                yield from pieces
                free.append(buf)  # the writer has consumed every piece of this unit

    full_record = {
        "tool": "extramerge",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "inputs": [
            {"path": str(c.path), "step": c.step, "format": c.format, "weight": float(x)}
            for c, x in zip(ckpts, w, strict=True)
        ],
        "weights": [float(x) for x in w],
        "output_format": fmt,
        "dtype": dtype,
        "accumulate": summary.accumulate,
        "tensors": len(infos),
        "copied_from_newest": copied,
        "aliases": dict(template.aliases),
        **(record or {}),
    }
    meta = {"extramerge.weights": ",".join(repr(float(x)) for x in w), **(metadata or {})}
    stream = produce()
    try:
        result = write_checkpoint(
            out_path,
            stream,
            infos=out_infos,
            template=template,
            fmt=fmt,
            shard_size=shard_size,
            metadata=meta,
            record=full_record,
            force=force,
            inputs=ckpts,
            fsync=fsync,
            direct_io=direct_io,
        )
    finally:
        stream.close()  # stops the workers now, not when the traceback lets go of the generator
        bar.close()
    rss.append(_rss_now())
    seconds = time.perf_counter() - t0
    summary.files = result.files
    summary.bytes_written = result.bytes_written
    summary.seconds = seconds
    summary.read_bandwidth = bytes_read / seconds if seconds > 0 else 0.0
    summary.peak_rss_bytes = _rss_peak()
    summary.merge_rss_bytes = max(rss)
    summary.timings = {
        "read_wait": stats["read_wait"],
        "compute": stats["compute"],
        "write": max(0.0, result.seconds - stats["wait"] - result.fsync_seconds - result.publish_seconds),
        "fsync": result.fsync_seconds,
        "publish": result.publish_seconds,
        "total": seconds,
    }
    return summary
