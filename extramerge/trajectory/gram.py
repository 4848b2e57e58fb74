"""The one streaming pass of the analysis (``gram_pass``): Gram matrices of every checkpoint's difference
from a reference checkpoint, in float64, on worker threads or forked worker processes.

Each segment's block comes from the compiled kernel ``rv_gram_diff`` (``rivervalley/_native/gram.c``:
widens, subtracts and accumulates the products in registers in one pass over the read buffers) where it
builds and the inputs suit it, else from numpy (a float64 copy and a stacked gemm); both agree to ~1e-15
relative. ``RIVERVALLEY_NATIVE=0`` keeps to numpy.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import mmap
import os

import numpy as np

from extramerge import distributed
from extramerge.engine import units
from extramerge.engine.arith import all_finite
from extramerge.engine.parallel import can_fork, ordered_map, run_forked
from extramerge.engine.summary import progress_bar
from extramerge.io import CheckpointError, check_compatible
from extramerge.trajectory.data import GramData
from rivervalley.common import native

__all__ = ["gram_pass"]

_BLOCK_BYTES = 4 * 2**20  # float64 work block of all N checkpoints (8 x 64K elements for N = 8)
_GEMM_COLS = 8192  # columns per small Gram product: N x 64 KiB of float64 operands stay in L2
_UNIT_BYTES = 4 * 2**20  # per checkpoint and work unit (one worker maps N of these at a time)


def _kernel():
    """gram.c's library, or None (no C compiler, ``RIVERVALLEY_NATIVE=0``, a failed build: see
    ``rivervalley.common.native.gram_kernel_status``)."""
    return native.gram_kernel()


def _segment_gram(xs: list, ref: int, scratch, lib=None) -> tuple[np.ndarray, float]:
    """Σ over equal-length flat arrays xs (one per checkpoint) of (x_i − x_ref)(x_j − x_ref), as an
    (N−1) × (N−1) block (rows and columns: the checkpoints other than ``ref`` in order), and ‖x_ref‖², both
    in float64.

    Block by block, each checkpoint's slice is converted to float64 (exact) and the reference subtracted
    (exact for float32/bf16/fp16 inputs), laid out as S small matrices [N, _GEMM_COLS] whose last row is
    the reference itself, so that one stacked matmul (a BLAS gemm per matrix, operands in L2) forms the S
    N × N blocks: the differences' Gram in the first N−1 rows and columns and ‖x_ref‖² in the corner (the
    products of differences with x_ref that fill the rest are not used). With ``lib`` (``_kernel()``),
    the compiled kernel computes the same sums in one pass where it takes the inputs.
    """
    if lib is not None:
        got = native.gram_of_differences(lib, xs, ref)
        if got is not None:
            return got
    n, m = len(xs), xs[0].size
    others = [j for j in range(n) if j != ref]
    bg = min(_GEMM_COLS, max(64, 1 << max(m - 1, 0).bit_length()))
    s_max = max(1, _BLOCK_BYTES // (8 * n * bg))
    F3 = scratch.get("gram_F", (s_max * n * bg,), np.float64)
    Gs = scratch.get("gram_G", (s_max * n * n,), np.float64)
    G = np.zeros((n, n))
    for s in range(0, m, s_max * bg):
        e = min(s + s_max * bg, m)
        full, rest = divmod(e - s, bg)
        S = full + (rest > 0)
        F = F3[: S * n * bg].reshape(S, n, bg)

        def put(dst, x, s=s, e=e, full=full, rest=rest):  # x[s:e] into dst [S, bg], zero-padded
            if full:
                np.copyto(dst[:full], x[s : s + full * bg].reshape(full, bg))
            if rest:
                np.copyto(dst[full, :rest], x[s + full * bg : e])
                dst[full, rest:] = 0.0

        put(F[:, n - 1, :], xs[ref])
        for row, j in enumerate(others):
            put(F[:, row, :], xs[j])
        np.subtract(F[:, : n - 1, :], F[:, n - 1 :, :], out=F[:, : n - 1, :])
        out = Gs[: S * n * n].reshape(S, n, n)
        np.matmul(F, F.transpose(0, 2, 1), out=out)
        G += out.sum(axis=0)
    return G[: n - 1, : n - 1], float(G[n - 1, n - 1])


def _embed(G: np.ndarray, ref: int) -> np.ndarray:
    """The N × N Gram from the (N−1) × (N−1) block of ``_segment_gram`` (reference row and column zero),
    symmetrised."""
    n = G.shape[0] + 1
    others = [j for j in range(n) if j != ref]
    full = np.zeros((n, n))
    full[np.ix_(others, others)] = G
    return (full + full.T) / 2


def _nonfinite(ckpts, name, pieces) -> Exception:
    for c, t in zip(ckpts, pieces, strict=True):
        if not all_finite(t):
            return CheckpointError(f"tensor '{name}' in {c.name} contains NaN or Inf values")
    return CheckpointError(f"tensor '{name}': its Gram matrix overflows float64 (values too large)")


def gram_pass(
    ckpts, *, reference: int = -1, progress: bool = True, workers: int = 2, background=None
) -> GramData:
    """One streaming pass over opened checkpoints → Gram matrices of differences from ``reference``.

    ``reference`` indexes the checkpoints (default −1: the newest). Floating-point tensors only; integer
    buffers are listed in ``skipped``. The tensors are cut into units of a few MiB per checkpoint, which
    each worker maps in, reduces to small Gram blocks and unmaps again, so memory does not grow with the
    model or the tensor size. ``workers`` ≥ 2 run as forked processes where that is safe (Linux, no other
    thread; see extramerge.engine.parallel.run_forked), else as threads; 0 runs inline. Workers only
    compute each segment's Gram block; this process adds the blocks up in unit order (segment order within
    a unit) on every path, so the result is bit-for-bit the same whatever the timing or which worker
    computed what. ``background`` (a callable) runs in this process while worker processes do the pass.
    Raises CheckpointError for NaN/Inf naming the tensor and file.

    Inside a process group (``extramerge.distributed``) every rank calls this: each computes the blocks of
    its contiguous share of the units into a zeroed array, one all-reduce (sum) fills in the others' (each
    entry has one non-zero term, so the sum is exact), and every rank adds the blocks up in the same unit
    order: the result is bit-identical to one process's, on every rank.
    """
    n = len(ckpts)
    if n < 2:
        raise ValueError(f"trajectory analysis needs at least 2 checkpoints, got {n}")
    ref = range(n)[reference]
    infos = check_compatible(ckpts)
    names = [k for k, info in infos.items() if info.is_float]
    skipped = [k for k, info in infos.items() if not info.is_float]
    if not names:
        raise ValueError("no floating-point tensors to analyse")
    floats = {k: infos[k] for k in names}
    itemsize = min(i.itemsize for i in floats.values())
    plan = units.plan_units(floats, max(1, _UNIT_BYTES // itemsize))
    read_bytes = units.unit_bytes(plan, floats)
    everyone = list(range(n))
    scratch = units.Scratch()
    lib = _kernel()  # built and loaded here, before any worker forks

    def run(segs):
        arrays, spans = units.unit_arrays(
            ckpts, floats, segs, lambda _: everyone, zero_copy=True, scratch=scratch, read_bytes=read_bytes
        )
        if spans:
            units.advise_spans(spans, "populate")
        try:
            out = []
            for (name, _, _), xs in zip(segs, arrays, strict=True):
                with np.errstate(over="ignore", invalid="ignore"):
                    G, r2 = _segment_gram(xs, ref, scratch, lib)
                if not (np.all(np.isfinite(G)) and math.isfinite(r2)):
                    raise _nonfinite(ckpts, name, xs)
                out.append((names_idx[name], G, r2))
            return out, sum(x.nbytes for row in arrays for x in row)
        finally:
            if spans:
                units.advise_spans(spans, "drop")

    names_idx = {k: t for t, k in enumerate(names)}
    total = sum(i.nbytes for i in floats.values()) * n
    group = distributed.current()
    if group is not None:
        sizes = [sum((b - a) * floats[k].itemsize * n for k, a, b in u) for u in plan]
        todo = list(distributed.rank_block(sizes, group))
        blocks, done = _blocks(plan, n, workers)
        mine = sum(sizes[u] for u in todo)
        per_rank = distributed.workers_per_rank(workers, group)
        leads = group.leader
        with distributed.agreed(group):  # a failure on any rank (bad tensor, I/O) stops every rank
            _fill(
                run,
                plan,
                todo,
                blocks,
                done,
                per_rank,
                mine,
                progress and leads,
                background if leads else None,
            )
        group.all_reduce_sum(blocks)
        grams, norms = _add_blocks(blocks, len(names), n)
        return _gram_data(ckpts, infos, names, skipped, grams, norms, ref)
    if workers >= 2 and len(plan) >= 2 and can_fork():
        blocks, done = _blocks(plan, n, workers)
        _fill(run, plan, range(len(plan)), blocks, done, workers, total, progress, background)
        grams, norms = _add_blocks(blocks, len(names), n)
        return _gram_data(ckpts, infos, names, skipped, grams, norms, ref)
    grams = np.zeros((len(names), n - 1, n - 1))
    norms = np.zeros(len(names))
    bar = _progress(total, progress)
    try:
        for parts, nbytes in ordered_map(run, plan, workers=workers, depth=2 * max(workers, 1)):
            for t, G, r2 in parts:
                grams[t] += G
                norms[t] += r2
            bar.update(nbytes)
    finally:
        bar.close()
    if background is not None:
        background()
    return _gram_data(ckpts, infos, names, skipped, grams, norms, ref)


def _blocks(plan, n: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Zeroed rows, one per segment of the plan (unit order, segment order), each a Gram block, ‖θ_ref‖²
    and the tensor index; and a counter of bytes read per worker. In shared memory, so forked workers
    can fill them."""
    rows = sum(len(u) for u in plan)
    width = (n - 1) * (n - 1) + 2
    shm = np.frombuffer(mmap.mmap(-1, 8 * (rows * width + max(workers, 1))), dtype=np.float64)
    return shm[: rows * width].reshape(rows, width), shm[rows * width :]


def _fill(run, plan, todo, blocks, done, workers, total, progress, background) -> None:
    """Fill the rows of the units ``todo`` — on ``workers`` forked processes where possible (workers claim
    units from a pipe of unit numbers, so a worker slowed down by other work takes fewer), else on
    threads — while this process shows progress and runs ``background``."""
    first = np.cumsum([0] + [len(u) for u in plan])  # row of each unit's first segment

    def put(u: int, parts) -> None:
        for i, (t, G, r2) in enumerate(parts):
            row = blocks[first[u] + i]
            row[:-2] = G.reshape(-1)
            row[-2], row[-1] = r2, t

    if not (workers >= 2 and len(todo) >= 2 and can_fork()):
        bar = _progress(total, progress)
        try:
            units_todo = [plan[u] for u in todo]
            results = ordered_map(run, units_todo, workers=workers, depth=2 * max(workers, 1))
            for u, (parts, nbytes) in zip(todo, results, strict=True):
                put(u, parts)
                bar.update(nbytes)
        finally:
            bar.close()
        if background is not None:
            background()
        return
    feed = _UnitFeed(todo)

    def job(k: int) -> None:
        for u in feed.claim():
            parts, nbytes = run(plan[u])
            put(u, parts)
            done[k] += nbytes

    bar, shown = None, [0.0]

    def poll() -> None:
        nonlocal bar
        feed.top_up()
        if progress:
            bar = bar or _progress(total, True)  # made after the fork: tqdm may start a thread
            now = float(done.sum())
            bar.update(now - shown[0])
            shown[0] = now

    try:
        jobs = [lambda k=k: job(k) for k in range(workers)]
        poll_if = poll if progress or feed.w >= 0 else None  # else nothing to do but wait
        run_forked(jobs, poll=poll_if, idle=background, before=feed.fork)
    finally:
        feed.close()
        if bar is not None:
            bar.close()


def _add_blocks(blocks: np.ndarray, n_names: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-tensor Gram blocks and ‖θ_ref‖², added up row by row: unit order, segment order, the inline
    pass's order of additions, so the result is bit-for-bit the same whoever computed what."""
    grams = np.zeros((n_names, n - 1, n - 1))
    norms = np.zeros(n_names)
    for row in blocks:
        t = int(row[-1])
        grams[t] += row[:-2].reshape(n - 1, n - 1)
        norms[t] += row[-2]
    return grams, norms


class _UnitFeed:
    """Unit numbers in a pipe: each forked worker reads 4 bytes at a time (atomic for a pipe) until the
    pipe is empty and closed. The parent writes what fits before forking and tops up while waiting."""

    def __init__(self, todo):
        n = len(todo)
        self.r, self.w = os.pipe()
        with contextlib.suppress(OSError, AttributeError):  # Linux: room for up to 256K units at once
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, min(2**20, max(2**16, 4 * n)))
        os.set_blocking(self.w, False)
        self.pending = memoryview(b"".join(int(u).to_bytes(4, "little") for u in todo))
        self.top_up()

    def top_up(self) -> None:
        while self.w >= 0 and len(self.pending):
            try:
                wrote = os.write(self.w, self.pending[: 4 * 4096])
            except BlockingIOError:
                return
            self.pending = self.pending[wrote:]
        if self.w >= 0 and not len(self.pending):
            os.close(self.w)  # workers see the end once the pipe is drained
            self.w = -1

    def fork(self) -> None:
        """In a child: keep only the read end."""
        if self.w >= 0:
            os.close(self.w)
            self.w = -1

    def claim(self):
        while True:
            got = os.read(self.r, 4)
            if not got:
                return
            yield int.from_bytes(got, "little")

    def close(self) -> None:
        for fd in (self.r, self.w):
            if fd >= 0:
                os.close(fd)
        self.r = self.w = -1


def _gram_data(ckpts, infos, names, skipped, grams, norms, ref) -> GramData:
    per_tensor = np.stack([_embed(G, ref) for G in grams])
    return GramData(
        gram=per_tensor.sum(axis=0),
        names=names,
        per_tensor=per_tensor,
        numel=np.asarray([infos[k].numel for k in names], dtype=np.int64),
        ref_norm2=np.asarray(norms, dtype=np.float64),
        reference=ref,
        paths=[str(c.path) for c in ckpts],
        steps=[c.step for c in ckpts],
        skipped=skipped,
    )


def _progress(total: int, progress: bool):
    bar = progress_bar(total, progress)
    if progress:
        bar.set_description("gram pass")
    return bar
