"""The streaming engine: Σ_j w_j θ_j over real checkpoints, tensor chunk by tensor chunk.

Each checkpoint is read once, in stored order, in chunks of ``chunk_bytes`` (16 MiB by default). Reads are
zero-copy: a chunk is a view of the memory-mapped safetensors file whose pages a small thread pool maps in
ahead of use (madvise POPULATE_READ, so page faults and disk reads overlap the arithmetic) and which are
unmapped from the process right after use (madvise DONTNEED), so resident memory stays a few chunks. The
chunk is accumulated in place into a float32 (or float64) accumulator with ``acc.add_(piece, alpha=w)``,
cast to the output dtype and handed to the streaming writer, which writes its bytes straight to the output
file and starts their writeback early. Peak memory is therefore a few chunks — independent of the model
size and of the number of checkpoints — except for PyTorch-file outputs, which torch.save must hold whole
(and PyTorch-file inputs, which torch memory-maps itself: their touched pages count as resident).

Checkpoints with weight exactly 0 are not read at all. Integer and bool tensors (step counters, masks)
are not averaged: they are copied from the newest checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import resource
import shutil
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoints import (
    Checkpoint,
    CheckpointError,
    TensorInfo,
    check_compatible,
    check_output,
    default_format,
    output_layout,
    write_checkpoint,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MergeSummary",
    "iter_aligned",
    "iter_chunks",
    "iter_reads",
    "weighted_sum",
    "merge_weights",
    "output_dtype",
]

DEFAULT_CHUNK_BYTES = 16 * 2**20
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}  # fmt: skip
_ARITH = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INLINE_BYTES = 256 * 2**10  # zero-copy views this small are made on the spot, not on a reader thread


# ----------------------------------------------------------------------------------------- read pipeline


def _ranges(numel: int, chunk: int) -> list[tuple[int, int]]:
    """[start, stop) element ranges covering a tensor; an empty tensor still gets one (empty) range."""
    if numel == 0:
        return [(0, 0)]
    return [(a, min(a + chunk, numel)) for a in range(0, numel, chunk)]


def _read(ck: Checkpoint, name: str, start, stop, buf):
    if start is None:
        return ck.read(name)
    return ck.read_range(name, start, stop, buf)


def _view(ck: Checkpoint, name: str, start: int, stop: int, populate: bool = True):
    if populate:  # page faults (and disk reads) happen here, off the main thread
        ck.advise(name, start, stop, "populate")
    return ck.view_range(name, start, stop)


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
    units (and about ``max_bytes``) in flight ahead of the consumer; yield (tag, tensors) in order.

    Ranged reads (start is not None) are valid only until the consumer asks for the next unit: with
    ``zero_copy`` they are views of the memory-mapped files whose pages are populated by the reader threads
    and dropped from the process afterwards; otherwise (or where a file cannot be mapped) they land in
    reusable buffers of ``buf_bytes``. Whole-tensor reads (start None) are fresh and may be kept.
    """
    free: list[torch.Tensor] = []
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
                buf = free.pop() if free else torch.empty(buf_bytes, dtype=torch.uint8)
                args = (ck, name, start, stop, buf)
                bufs.append(buf)
            info = ck.infos[ck.aliases.get(name, name)]
            size = (info.numel if start is None else stop - start) * info.dtype.itemsize
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


def iter_aligned(
    ckpts: Sequence[Checkpoint],
    names: Iterable[str] | None = None,
    *,
    prefetch: int = 2,
    workers: int = 2,
    max_bytes: int | None = 2**30,
) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """For each tensor name in order: the N checkpoints' whole tensors (fresh or memory-mapped, the
    caller may keep them). At most ``prefetch`` groups (and about ``max_bytes``) are read ahead on
    ``workers`` threads, so memory is about (prefetch + 1) × N × one tensor; for very large tensors prefer
    ``iter_chunks``, whose memory does not grow with the tensor."""
    units = (((name), [(ck, name, None, None) for ck in ckpts]) for name in _names(ckpts, names))
    yield from _pipeline(units, depth=prefetch, workers=workers, buf_bytes=None, max_bytes=max_bytes)


def iter_chunks(
    ckpts: Sequence[Checkpoint],
    names: Iterable[str] | None = None,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    prefetch: int = 2,
    workers: int = 2,
    zero_copy: bool = True,
) -> Iterator[tuple[str, int, int, list[torch.Tensor]]]:
    """(name, start, stop, [N flat pieces]) covering each tensor in chunks of about ``chunk_bytes`` bytes
    per checkpoint. The pieces are zero-copy views of the memory-mapped files (or, with ``zero_copy=False``
    or a file that cannot be mapped, reused buffers): valid only until the next item is requested, never to
    be modified. Memory stays about (prefetch + 1) × N × chunk_bytes whatever the tensor sizes; inner
    products such as a Gram matrix accumulate chunk by chunk (G += P Pᵀ)."""
    names = _names(ckpts, names)
    ref = ckpts[-1]

    def units():
        for name in names:
            info = ref.infos[ref.aliases.get(name, name)]
            for a, b in _ranges(info.numel, max(1, chunk_bytes // info.dtype.itemsize)):
                yield (name, a, b), [(ck, name, a, b) for ck in ckpts]

    itemsize = max((i.dtype.itemsize for i in ref.infos.values()), default=1)
    buf_bytes = max(chunk_bytes, itemsize)
    pipe = _pipeline(units(), depth=prefetch, workers=workers, buf_bytes=buf_bytes, zero_copy=zero_copy)
    for (name, a, b), pieces in pipe:
        yield name, a, b, pieces


def iter_reads(
    ckpts: Sequence[Checkpoint],
    requests: Iterable[tuple[int, str, int, int]],
    *,
    buf_bytes: int = DEFAULT_CHUNK_BYTES,
    prefetch: int = 4,
    workers: int = 2,
    zero_copy: bool = True,
) -> Iterator[tuple[tuple[int, str, int, int], torch.Tensor]]:
    """Read ``requests`` (checkpoint index, name, start, stop) in order with ``prefetch`` reads in flight;
    yields (request, flat piece), the piece valid until the next item is requested (a view of the
    memory-mapped file, or a reused buffer of ``buf_bytes``) and never to be modified."""
    units = ((r, [(ckpts[r[0]], r[1], r[2], r[3])]) for r in requests)
    pipe = _pipeline(units, depth=prefetch, workers=workers, buf_bytes=buf_bytes, zero_copy=zero_copy)
    for req, (piece,) in pipe:
        yield req, piece


# ------------------------------------------------------------------------------------------- arithmetic


def weighted_sum(
    tensors: Sequence[torch.Tensor], weights, *, accumulate: torch.dtype = torch.float32
) -> torch.Tensor:
    """Σ_j w_j t_j accumulated in ``accumulate`` (float32 by default) whatever the input dtype; returned in
    the accumulation dtype. Integer/bool tensors are not averaged: the last (newest) one is returned."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(tensors) != w.size:
        raise ValueError(f"got {w.size} weights for {len(tensors)} tensors")
    if not tensors:
        raise ValueError("weighted_sum of no tensors")
    if not tensors[-1].dtype.is_floating_point:
        return tensors[-1].clone()
    acc = torch.zeros(tensors[0].shape, dtype=accumulate)
    for t, wj in zip(tensors, w, strict=True):
        if wj != 0.0:
            acc.add_(t if t.dtype in _ARITH else t.to(accumulate), alpha=float(wj))
    return acc


def output_dtype(info: TensorInfo, dtype: str) -> torch.dtype:
    """The dtype a tensor is written in: 'same' keeps it; otherwise floating tensors are cast to ``dtype``
    and integer/bool tensors keep theirs."""
    if dtype == "same" or not info.is_float:
        return info.dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; choose same, float32, bfloat16, float16 or float64"
        ) from None


def _accumulate_dtype(accumulate) -> torch.dtype:
    if isinstance(accumulate, torch.dtype):
        acc = accumulate
    else:
        acc = _DTYPES.get(str(accumulate))
    if acc not in (torch.float32, torch.float64):
        raise ValueError(f"accumulate must be float32 or float64, got {accumulate!r}")
    return acc


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
            parts = ", ".join(f"{k} {v:.2f}s" for k, v in t.items() if k != "total")
            lines += [
                f"  read          {_fmt_bytes(self.bytes_read)} at {_fmt_bytes(self.read_bandwidth)}/s",
                f"  written       {_fmt_bytes(self.bytes_written)} in {len(self.files)} file(s)",
                f"  time          {self.seconds:.2f}s ({parts})",
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


def _nonfinite_error(ckpts, active, name, a, b, acc_dtype) -> CheckpointError:
    for j in active:
        piece = ckpts[j].read_range(name, a, b)
        if not bool(torch.isfinite(piece).all()):
            return CheckpointError(
                f"tensor '{name}' in {ckpts[j].name} contains NaN or Inf values (allow_nonfinite=True / "
                "--allow-nonfinite merges anyway)"
            )
    return CheckpointError(
        f"tensor '{name}': the merged values overflow {acc_dtype} (try accumulate='float64')"
    )


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
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    prefetch: int = 4,
    workers: int = 2,
    fsync: bool = True,
    zero_copy: bool = True,
) -> MergeSummary:
    """Write Σ_j w_j θ_j of ``ckpts`` (oldest first, one weight each) to ``output``, streaming.

    Floating tensors accumulate in ``accumulate`` (float32 or float64) and are written in ``dtype``
    ('same' keeps each tensor's dtype; 'float32', 'bfloat16', 'float16' cast floating tensors). Integer and
    bool tensors are copied from the newest checkpoint; checkpoints with weight exactly 0 are not read.
    NaN/Inf in an input raises CheckpointError naming the tensor and file (unless ``allow_nonfinite``).
    Everything is validated before the first byte is read: compatibility of all checkpoints, the weights,
    the output path and the free disk space; ``dry_run`` stops there and returns projected bytes and memory.
    ``fmt`` defaults to the output's suffix (.safetensors, .pt, ...) or else the newest checkpoint's format
    family (see checkpoints.default_format); ``record`` extends the merge.json record.

    Tuning: ``chunk_bytes`` per read, ``prefetch`` reads in flight on ``workers`` threads; ``zero_copy``
    reads safetensors through memory maps (pages dropped after use) instead of pread into buffers;
    ``fsync=False`` skips flushing the output to disk before it is published.
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
    acc_dtype = _accumulate_dtype(accumulate)
    infos = check_compatible(ckpts)
    template = ckpts[-1]
    fmt = fmt or default_format(output, template)
    out_infos = {n: TensorInfo(n, i.shape, output_dtype(i, dtype)) for n, i in infos.items()}
    out_path = check_output(output, ckpts, force=force)
    output_layout(out_path, fmt, template)

    notes = []
    if acc_dtype != torch.float64 and any(i.dtype == torch.float64 for i in infos.values()):
        acc_dtype = torch.float64  # never accumulate below the inputs' precision
        notes.append("float64 inputs: accumulating in float64")
    if abs(w.sum() - 1.0) > 1e-6:
        notes.append(f"weights sum to {w.sum():.6g}, not 1: the result is not an affine merge")
    copied = [n for n, i in infos.items() if not i.is_float]
    n_torch = sum(1 for j in active if ckpts[j].format in ("torch", "hf-bin"))
    bytes_read = sum(i.nbytes * (len(active) if i.is_float else 1) for i in infos.values())
    bytes_written = sum(i.nbytes for i in out_infos.values())
    float_numel = [i.numel for i in infos.values() if i.is_float]
    chunk = max(1, chunk_bytes // 4)
    acc_numel = min(chunk, max(float_numel, default=0))
    itemsize = max((i.dtype.itemsize for i in infos.values()), default=1)
    buf_bytes = chunk * itemsize
    out_itemsize = max((i.dtype.itemsize for i in out_infos.values()), default=1)
    collects = fmt in ("torch", "hf-bin")
    projected = (
        _rss_now()
        + (prefetch + 2) * min(buf_bytes, max(i.nbytes for i in infos.values()) if infos else 0)
        + acc_numel * (acc_dtype.itemsize + out_itemsize)
        + (bytes_written if collects else 0)
        + (bytes_read if n_torch else 0)  # torch-file inputs are memory-mapped: touched pages count as RSS
    )
    free_disk = shutil.disk_usage(_first_existing(out_path.parent)).free
    if bytes_written > free_disk:
        raise CheckpointError(
            f"output {output}: needs {_fmt_bytes(bytes_written)} but only {_fmt_bytes(free_disk)} is "
            "free there"
        )
    if dtype == "float16" and any(i.dtype in (torch.bfloat16, torch.float32) for i in infos.values()):
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
        accumulate=str(acc_dtype).removeprefix("torch."),
        dry_run=dry_run,
        notes=notes,
    )
    if dry_run:
        summary.seconds = time.perf_counter() - t0
        return summary

    newest = len(ckpts) - 1

    def requests():
        for name, info in infos.items():
            sources = active if info.is_float else [newest]
            for a, b in _ranges(info.numel, chunk):
                for j in sources:
                    yield j, name, a, b

    _raise_fd_limit(sum(len(c.files) for c in ckpts) + 256)  # each memory-mapped file keeps a descriptor
    acc = torch.empty(acc_numel, dtype=acc_dtype)
    outbuf = torch.empty(acc_numel * out_itemsize, dtype=torch.uint8)
    stats = {"read_wait": 0.0, "compute": 0.0}
    rss = [summary.merge_rss_bytes]
    last_of = {n: (active[-1] if i.is_float else newest) for n, i in infos.items()}

    bar = _progress_bar(bytes_read, progress)

    def produce():
        reads = iter_reads(
            ckpts, requests(), buf_bytes=buf_bytes, prefetch=prefetch, workers=workers, zero_copy=zero_copy
        )
        with contextlib.closing(reads):  # stop the reader threads now, even when the writer fails
            yield from _accumulate(reads)

    def _accumulate(reads):
        sampled = [time.perf_counter()]
        while True:
            t_a = time.perf_counter()
            item = next(reads, None)
            t_b = time.perf_counter()
            stats["read_wait"] += t_b - t_a
            if item is None:
                return
            (j, name, a, b), piece = item
            info = infos[name]
            bar.update(piece.numel() * piece.element_size())
            if t_b - sampled[0] > 0.05:  # sample resident memory ~20 times a second
                sampled[0] = t_b
                rss.append(_rss_now())
            if not info.is_float:
                stats["compute"] += time.perf_counter() - t_b
                yield name, piece
                continue
            n = b - a
            acc_v = acc[:n]
            if piece.dtype not in _ARITH:
                piece = piece.to(acc_dtype)
            if j == active[0]:
                if piece.dtype == acc_dtype:
                    torch.mul(piece, float(w[j]), out=acc_v)
                else:
                    acc_v.copy_(piece)
                    acc_v.mul_(float(w[j]))
            else:
                acc_v.add_(piece, alpha=float(w[j]))
            if j != last_of[name]:
                stats["compute"] += time.perf_counter() - t_b
                continue
            if not allow_nonfinite and not bool(torch.isfinite(acc_v.sum())):
                if not bool(torch.isfinite(acc_v).all()):
                    raise _nonfinite_error(ckpts, active, name, a, b, acc_dtype)
            odt = out_infos[name].dtype
            if odt == acc_dtype:
                out_piece = acc_v
            else:
                out_piece = outbuf[: n * odt.itemsize].view(odt)
                out_piece.copy_(acc_v)
                if odt == torch.float16 and not allow_nonfinite and not bool(torch.isfinite(out_piece).all()):
                    raise CheckpointError(
                        f"tensor '{name}': merged values overflow float16; choose dtype float32 or bfloat16"
                    )
            stats["compute"] += time.perf_counter() - t_b
            yield name, out_piece

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
    # Reader threads plus torch's intra-op pool must not oversubscribe the cores: an OpenMP barrier waiting
    # on a descheduled thread costs a scheduler time slice per operation (measured: 8x slower on 2 cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - workers)))
    try:
        result = write_checkpoint(
            out_path,
            produce(),
            infos=out_infos,
            template=template,
            fmt=fmt,
            shard_size=shard_size,
            metadata=meta,
            record=full_record,
            force=force,
            inputs=ckpts,
            fsync=fsync,
        )
    finally:
        torch.set_num_threads(threads)
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
        "write": max(
            0.0,
            result.seconds
            - stats["read_wait"]
            - stats["compute"]
            - result.fsync_seconds
            - result.publish_seconds,
        ),
        "fsync": result.fsync_seconds,
        "publish": result.publish_seconds,
        "total": seconds,
    }
    return summary
