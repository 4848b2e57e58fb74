"""Streaming reads of aligned tensors across checkpoints (``iter_aligned``, ``iter_chunks``, ``iter_reads``):
a thread pool reads a few units ahead of the consumer into views of the memory-mapped files or reused
buffers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..io import Checkpoint, check_compatible, to_torch
from .units import ranges

__all__ = ["DEFAULT_CHUNK_BYTES", "iter_aligned", "iter_chunks", "iter_reads"]

DEFAULT_CHUNK_BYTES = 16 * 2**20
_INLINE_BYTES = 256 * 2**10  # zero-copy views this small are made on the spot, not on a reader thread


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
            if start is not None and zero_copy and ck.mappable(name):
                fn, args = _view, (ck, name, start, stop)
                bufs.append((ck, name, start, stop))
                touched.add(ck)
            elif buf_bytes and start is not None and ck.copies(name):
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
            for a, b in ranges(info.numel, max(1, chunk_bytes // info.itemsize)):
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
