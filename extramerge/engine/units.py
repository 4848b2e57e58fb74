"""Work units of a streaming pass: how the tensors are cut into units of about ``chunk`` elements, and how
a worker gets a unit's data (views of the memory-mapped files, populated and dropped with madvise, or
preads into per-thread scratch buffers).
"""

from __future__ import annotations

import mmap
import threading

import numpy as np

from ..io import TensorInfo

__all__ = [
    "ranges",
    "plan_units",
    "clip_units",
    "align",
    "unit_bytes",
    "Scratch",
    "unit_arrays",
    "advise_spans",
]


def ranges(numel: int, chunk: int) -> list[tuple[int, int]]:
    """[start, stop) element ranges covering a tensor; an empty tensor still gets one (empty) range."""
    if numel == 0:
        return [(0, 0)]
    return [(a, min(a + chunk, numel)) for a in range(0, numel, chunk)]


def plan_units(infos: dict[str, TensorInfo], chunk: int) -> list[list[tuple[str, int, int]]]:
    """Units of work in write order: lists of (name, start, stop) segments of about ``chunk`` elements
    in all (a slice of a large tensor, or a run of small tensors)."""
    units: list[list[tuple[str, int, int]]] = []
    cur: list[tuple[str, int, int]] = []
    used = 0
    for name, info in infos.items():
        for a, b in ranges(info.numel, chunk):
            if cur and used + (b - a) > chunk:
                units.append(cur)
                cur, used = [], 0
            cur.append((name, a, b))
            used += b - a
    if cur:
        units.append(cur)
    return units


def clip_units(
    units: list[list[tuple[str, int, int]]], extent: dict[str, tuple[int, int]]
) -> list[list[tuple[str, int, int]]]:
    """The parts of ``units`` inside ``extent`` (name → elements [start, stop) of that tensor), in order;
    units left empty are dropped, none grows."""
    out = []
    for unit in units:
        segs = []
        for name, a, b in unit:
            if name in extent:
                lo, hi = max(a, extent[name][0]), min(b, extent[name][1])
                if lo < hi or a == b:  # a == b: an empty tensor's one segment
                    segs.append((name, lo, hi) if lo < hi else (name, a, b))
        if segs:
            out.append(segs)
    return out


def align(n: int, to: int = 64) -> int:
    """``n`` rounded up to a multiple of ``to`` (segments of a unit buffer start on cache lines)."""
    return -(-n // to) * to


def unit_bytes(units: list, infos: dict[str, TensorInfo]) -> int:
    """Bytes of the largest unit, each segment cache-line aligned."""
    return max((sum(align((b - a) * infos[n].itemsize) for n, a, b in u) for u in units), default=1)


class Scratch(threading.local):
    """Per-thread L2-sized work arrays (and pread buffers for files that cannot be mapped)."""

    def get(self, key, shape, dtype) -> np.ndarray:
        cache = self.__dict__.setdefault("arrays", {})
        a = cache.get(key)
        size = int(np.prod(shape))
        if a is None or a.dtype != dtype or a.size < size:
            a = cache[key] = np.empty(size, dtype=dtype)
        return a[:size].reshape(shape)


def unit_arrays(ckpts, infos, segs, sources, *, zero_copy: bool, scratch, read_bytes: int):
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
        at += align((b - a) * infos[name].itemsize)
    return arrays, spans


def advise_spans(spans: list, advice: str) -> None:
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
