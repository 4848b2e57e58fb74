"""The one streaming pass of the analysis (``gram_pass``): Gram matrices of every checkpoint's difference
from a reference checkpoint, in float64, on worker threads or forked worker processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import mmap
import os

import numpy as np

from extramerge.engine import units
from extramerge.engine.arith import all_finite
from extramerge.engine.parallel import can_fork, ordered_map, run_forked
from extramerge.engine.summary import progress_bar
from extramerge.io import CheckpointError, check_compatible, to_numpy
from extramerge.trajectory.data import GramData

__all__ = ["gram_pass"]

_BLOCK_BYTES = 4 * 2**20  # float64 work block of all N checkpoints (8 x 64K elements for N = 8)
_GEMM_COLS = 8192  # columns per small Gram product: N x 64 KiB of float64 operands stay in L2
_UNIT_BYTES = 4 * 2**20  # per checkpoint and work unit (one worker maps N of these at a time)


def _segment_gram(xs: list, ref: int, scratch) -> tuple[np.ndarray, float]:
    """Σ over equal-length flat arrays xs (one per checkpoint) of (x_i − x_ref)(x_j − x_ref), as an
    (N−1) × N block (rows: the checkpoints other than ``ref`` in order; the last column is 0), and
    ‖x_ref‖², both in float64.

    Block by block, each checkpoint's slice is converted to float64 (exact) and the reference subtracted
    (exact for float32/bf16/fp16 inputs), laid out as S small matrices [N, _GEMM_COLS] so that one
    stacked matmul (a BLAS gemm per matrix, operands in L2) forms the S Gram blocks. The last row of each
    matrix is zero: the product A·Bᵀ with A = rows :N−1 and B = all rows is then a plain gemm, several times
    faster than the syrk numpy would pick for A·Aᵀ with these shapes.
    """
    n, m = len(xs), xs[0].size
    others = [j for j in range(n) if j != ref]
    bg = min(_GEMM_COLS, max(64, 1 << max(m - 1, 0).bit_length()))
    s_max = max(1, _BLOCK_BYTES // (8 * n * bg))
    F3 = scratch.get("gram_F", (s_max * n * bg,), np.float64)
    R3 = scratch.get("gram_R", (s_max * bg,), np.float64)
    Gs = scratch.get("gram_G", (s_max * (n - 1) * n,), np.float64)
    G = np.zeros((n - 1, n))
    r2 = 0.0
    for s in range(0, m, s_max * bg):
        e = min(s + s_max * bg, m)
        full, rest = divmod(e - s, bg)
        S = full + (rest > 0)
        F = F3[: S * n * bg].reshape(S, n, bg)
        R = R3[: S * bg].reshape(S, bg)

        def put(dst, x, s=s, e=e, full=full, rest=rest):  # x[s:e] into dst [S, bg], zero-padded
            if full:
                np.copyto(dst[:full], x[s : s + full * bg].reshape(full, bg))
            if rest:
                np.copyto(dst[full, :rest], x[s + full * bg : e])
                dst[full, rest:] = 0.0

        put(R, xs[ref])
        for row, j in enumerate(others):
            put(F[:, row, :], xs[j])
        F[:, n - 1, :] = 0.0
        np.subtract(F[:, : n - 1, :], R[:, None, :], out=F[:, : n - 1, :])
        out = Gs[: S * (n - 1) * n].reshape(S, n - 1, n)
        np.matmul(F[:, : n - 1, :], F.transpose(0, 2, 1), out=out)
        G += out.sum(axis=0)
        r = R.reshape(-1)
        r2 += float(r @ r)
    return G, r2


def _embed(G: np.ndarray, ref: int) -> np.ndarray:
    """The N × N Gram from the (N−1) × N block of ``_segment_gram`` (reference row and column zero),
    symmetrised."""
    n = G.shape[1]
    others = [j for j in range(n) if j != ref]
    full = np.zeros((n, n))
    full[np.ix_(others, others)] = G[:, : n - 1]
    return (full + full.T) / 2


def _tensor_gram(tensors, ref: int) -> tuple[np.ndarray, float]:
    """Gram of differences from tensor ``ref`` (N × N, float64) and ‖θ_ref‖² of whole in-memory tensors
    (numpy arrays or torch tensors)."""
    flat = [to_numpy(t).reshape(-1) for t in tensors]
    with np.errstate(over="ignore", invalid="ignore"):
        G, r2 = _segment_gram(flat, ref, units.Scratch())
    return _embed(G, ref), r2


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
                    G, r2 = _segment_gram(xs, ref, scratch)
                if not (np.all(np.isfinite(G)) and math.isfinite(r2)):
                    raise _nonfinite(ckpts, name, xs)
                out.append((names_idx[name], G, r2))
            return out, sum(x.nbytes for row in arrays for x in row)
        finally:
            if spans:
                units.advise_spans(spans, "drop")

    names_idx = {k: t for t, k in enumerate(names)}
    total = sum(i.nbytes for i in floats.values()) * n
    if workers >= 2 and len(plan) >= 2 and can_fork():
        grams, norms = _gram_forked(run, plan, workers, len(names), n, total, progress, background)
        return _gram_data(ckpts, infos, names, skipped, grams, norms, ref)
    grams = np.zeros((len(names), n - 1, n))
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


def _gram_forked(run, plan, workers, n_names, n, total, progress, background):
    """The pass on ``workers`` forked processes. Workers claim units from a pipe of unit numbers (so a
    worker slowed down by other work takes fewer) and store each segment's Gram block in shared memory;
    the blocks are then added in unit order, exactly as the inline pass adds them: the result is
    bit-for-bit the same whoever computed what."""
    first = np.cumsum([0] + [len(u) for u in plan])  # index of each unit's first segment
    width = (n - 1) * n + 2  # Gram block, ‖θ_ref‖², tensor index
    shm = np.frombuffer(mmap.mmap(-1, 8 * (int(first[-1]) * width + workers)), dtype=np.float64)
    blocks = shm[: int(first[-1]) * width].reshape(-1, width)
    done = shm[int(first[-1]) * width :]  # bytes read per worker (progress)
    feed = _UnitFeed(len(plan))

    def job(k: int) -> None:
        for u in feed.claim():
            parts, nbytes = run(plan[u])
            for i, (t, G, r2) in enumerate(parts):
                row = blocks[first[u] + i]
                row[:-2] = G.reshape(-1)
                row[-2], row[-1] = r2, t
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
    grams = np.zeros((n_names, n - 1, n))
    norms = np.zeros(n_names)
    for row in blocks:  # unit order, segment order: the inline pass's order of additions
        t = int(row[-1])
        grams[t] += row[:-2].reshape(n - 1, n)
        norms[t] += row[-2]
    return grams, norms


class _UnitFeed:
    """Unit numbers 0..n-1 in a pipe: each forked worker reads 4 bytes at a time (atomic for a pipe) until
    the pipe is empty and closed. The parent writes what fits before forking and tops up while waiting."""

    def __init__(self, n: int):
        self.r, self.w = os.pipe()
        with contextlib.suppress(OSError, AttributeError):  # Linux: room for up to 256K units at once
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, min(2**20, max(2**16, 4 * n)))
        os.set_blocking(self.w, False)
        self.pending = memoryview(b"".join(u.to_bytes(4, "little") for u in range(n)))
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
