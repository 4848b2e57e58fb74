"""Trajectory diagnostics of real checkpoints from ONE streaming pass: the N×N Gram matrix.

The pass (``gram_pass``) reads every floating-point tensor of every checkpoint once and accumulates, in
float64, the Gram matrix of the checkpoints' *differences from a reference checkpoint*:

    G_ij = ⟨θ_i − θ_ref, θ_j − θ_ref⟩          (overall, and per tensor: Σ_tensors G^t = G)

Why differences: late in training the checkpoints differ by ~1e-4 of the weights' size. The raw Gram
⟨θ_i, θ_j⟩ is then dominated by ‖θ‖², and centring it afterwards (HGH) subtracts numbers that agree in
their first 8 digits: catastrophic cancellation leaves noise where the spread should be. θ_i − θ_ref is
formed in float64 from the (exact) float32/bf16 values, so the spread is kept to full precision.
Centring is invariant to the reference (H(X − 1θ_refᵀ) = HX), so every PCA quantity, merged Gram
(W G Wᵀ for affine rows), displacement cosine and PC1 trend is unchanged by the choice of reference.

Everything else (PCA spectra, SMA-merged spectra, cosines, PC1 drift, the per-layer rank-1 map, α
estimates) is computed from these matrices; ``GramData.save`` keeps them (``gram.npz``) so later steps
(``--method pc1``, α selection) need no further pass.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rivervalley import analysis as _analysis
from rivervalley import weights as _weights

__all__ = ["GramData", "gram_pass", "load_gram", "summarize", "analyze", "project_scores", "DEFAULT_WINDOWS"]

DEFAULT_WINDOWS = (1, 2, 4, 8)


@dataclass
class GramData:
    """Gram matrices of differences from checkpoint ``reference`` (0-based), overall and per tensor."""

    gram: np.ndarray  # [N, N] float64
    names: list[str]  # tensors included (floating point), in pass order
    per_tensor: np.ndarray  # [T, N, N] float64, sums to ``gram``
    numel: np.ndarray  # [T] elements per tensor
    ref_norm2: np.ndarray  # [T] ‖θ_ref‖² per tensor
    reference: int
    paths: list[str] = field(default_factory=list)
    steps: list[int | None] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # non-float tensors, not part of the geometry

    @property
    def n(self) -> int:
        return int(self.gram.shape[0])

    @property
    def ref_norm(self) -> float:
        return math.sqrt(float(self.ref_norm2.sum()))

    def save(self, path) -> None:
        np.savez(
            path,
            gram=self.gram,
            names=np.array(self.names, dtype=str),
            per_tensor=self.per_tensor,
            numel=self.numel,
            ref_norm2=self.ref_norm2,
            reference=np.array(self.reference),
            paths=np.array(self.paths, dtype=str),
            steps=np.array([-1 if s is None else s for s in self.steps], dtype=np.int64),
            skipped=np.array(self.skipped, dtype=str),
        )


def load_gram(path) -> GramData:
    """Read a ``gram.npz`` written by ``GramData.save`` (for example by ``extramerge analyze``): a regular
    file, no pickles, every array present with consistent shapes and finite values, else one
    CheckpointError naming the file."""
    import zipfile

    from extramerge import safety
    from extramerge.checkpoints import CheckpointError

    fd = safety.open_regular(Path(path))  # np.load would block on a FIFO
    try:
        with os.fdopen(fd, "rb") as f, np.load(f, allow_pickle=False) as z:
            data = GramData(
                gram=np.asarray(z["gram"], dtype=np.float64),
                names=[str(s) for s in z["names"]],
                per_tensor=np.asarray(z["per_tensor"], dtype=np.float64),
                numel=z["numel"],
                ref_norm2=np.asarray(z["ref_norm2"], dtype=np.float64),
                reference=int(z["reference"]),
                paths=[str(s) for s in z["paths"]],
                steps=[None if s < 0 else int(s) for s in z["steps"]],
                skipped=[str(s) for s in z["skipped"]],
            )
    except (KeyError, ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile) as e:
        what = "a required array is missing" if isinstance(e, KeyError) else type(e).__name__
        raise CheckpointError(f"{path}: not a gram.npz written by extramerge analyze ({what})") from None
    n, t = data.gram.shape[0] if data.gram.ndim == 2 else -1, len(data.names)
    ok = data.gram.shape == (n, n) and data.per_tensor.shape == (t, n, n) and len(data.paths) == n
    ok = ok and len(data.numel) == t and len(data.ref_norm2) == t and 0 <= data.reference < n
    if not ok or not (np.isfinite(data.gram).all() and np.isfinite(data.per_tensor).all()):
        raise CheckpointError(f"{path}: corrupt gram.npz (inconsistent shapes or non-finite values)")
    return data


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
    from extramerge.checkpoints import to_numpy
    from extramerge.engine import _Scratch

    flat = [to_numpy(t).reshape(-1) for t in tensors]
    with np.errstate(over="ignore", invalid="ignore"):
        G, r2 = _segment_gram(flat, ref, _Scratch())
    return _embed(G, ref), r2


def _nonfinite(ckpts, name, pieces) -> Exception:
    from extramerge.checkpoints import CheckpointError
    from extramerge.engine import _all_finite

    for c, t in zip(ckpts, pieces, strict=True):
        if not _all_finite(t):
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
    thread; see engine.run_forked), else as threads; 0 runs inline. Workers only compute each segment's Gram
    block; this process adds the blocks up in unit order (segment order within a unit) on every path, so the
    result is bit-for-bit the same whatever the timing or which worker computed what. ``background`` (a
    callable) runs in this process while worker processes do the pass. Raises CheckpointError for NaN/Inf
    naming the tensor and file.
    """
    from extramerge.checkpoints import check_compatible
    from extramerge.engine import _advise_spans, _ordered_map, _Scratch, _unit_arrays, _unit_bytes, plan_units

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
    units = plan_units(floats, max(1, _UNIT_BYTES // itemsize))
    read_bytes = _unit_bytes(units, floats)
    everyone = list(range(n))
    scratch = _Scratch()

    def run(segs):
        arrays, spans = _unit_arrays(
            ckpts, floats, segs, lambda _: everyone, zero_copy=True, scratch=scratch, read_bytes=read_bytes
        )
        if spans:
            _advise_spans(spans, "populate")
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
                _advise_spans(spans, "drop")

    names_idx = {k: t for t, k in enumerate(names)}
    total = sum(i.nbytes for i in floats.values()) * n
    if workers >= 2 and len(units) >= 2:
        from extramerge.engine import can_fork

        if can_fork():
            grams, norms = _gram_forked(run, units, workers, len(names), n, total, progress, background)
            return _gram_data(ckpts, infos, names, skipped, grams, norms, ref)
    grams = np.zeros((len(names), n - 1, n))
    norms = np.zeros(len(names))
    bar = _progress(total, progress)
    try:
        for parts, nbytes in _ordered_map(run, units, workers=workers, depth=2 * max(workers, 1)):
            for t, G, r2 in parts:
                grams[t] += G
                norms[t] += r2
            bar.update(nbytes)
    finally:
        bar.close()
    if background is not None:
        background()
    return _gram_data(ckpts, infos, names, skipped, grams, norms, ref)


def _gram_forked(run, units, workers, n_names, n, total, progress, background):
    """The pass on ``workers`` forked processes. Workers claim units from a pipe of unit numbers (so a
    worker slowed down by other work takes fewer) and store each segment's Gram block in shared memory;
    the blocks are then added in unit order, exactly as the inline pass adds them: the result is
    bit-for-bit the same whoever computed what."""
    import mmap

    from extramerge.engine import run_forked

    first = np.cumsum([0] + [len(u) for u in units])  # index of each unit's first segment
    width = (n - 1) * n + 2  # Gram block, ‖θ_ref‖², tensor index
    shm = np.frombuffer(mmap.mmap(-1, 8 * (int(first[-1]) * width + workers)), dtype=np.float64)
    blocks = shm[: int(first[-1]) * width].reshape(-1, width)
    done = shm[int(first[-1]) * width :]  # bytes read per worker (progress)
    feed = _UnitFeed(len(units))

    def job(k: int) -> None:
        for u in feed.claim():
            parts, nbytes = run(units[u])
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
        import fcntl

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
    from extramerge.engine import _progress_bar

    bar = _progress_bar(total, progress)
    if progress:
        bar.set_description("gram pass")
    return bar


# --------------------------------------------------------------------------------------------- geometry


def project_scores(G, W, k: int = 2) -> np.ndarray:
    """Coordinates on the first k PCs of the trajectory with Gram G of affine combinations W [R, N].

    PC k is e_k = Xᵀ H u_k / √λ_k, so the centred point (w − 1/N)ᵀX has score (w − 1/N)ᵀ H G H u_k / √λ_k
    = wᵀ u_k √λ_k (u_k ⟂ 1): W times the checkpoints' own scores (rivervalley.analysis.pc_scores, PC1
    oriented along the direction of travel). Rows of the identity give the checkpoints' own scores.
    """
    scores, _ = _analysis.pc_scores(np.asarray(G, dtype=np.float64), k)
    return np.atleast_2d(np.asarray(W, dtype=float)) @ scores


def _line_fit(y: np.ndarray) -> tuple[float, float]:
    """Slope per index of the least-squares line through y, and the residual std (n − 2 dof)."""
    n = y.size
    t = np.arange(n, dtype=float) - (n - 1) / 2
    slope = float(t @ y / (t @ t)) if n >= 2 else 0.0
    resid = y - y.mean() - slope * t
    return slope, float(math.sqrt(resid @ resid / (n - 2))) if n > 2 else 0.0


def _geometry(G: np.ndarray, ref_norm: float) -> dict:
    """PCA spectrum, cosines and PC1 drift of one (raw or merged) trajectory Gram."""
    n = G.shape[0]
    var = _analysis.pca_spectrum(G)
    fve = _analysis.explained_variance(G)
    scores = project_scores(G, np.eye(n), k=1)[:, 0]
    slope, resid = _line_fit(scores)
    cos = _analysis.displacement_cosines(G)
    return {
        "n": n,
        "variances": var[: max(n - 1, 1)].tolist(),
        "fve": fve[: max(n - 1, 1)].tolist(),
        "fve1": float(fve[0]),
        "cosines": cos.tolist(),
        "mean_cosine": float(cos.mean()) if cos.size else None,
        "pc1_drift": slope,
        "pc1_drift_relative": slope / ref_norm if ref_norm > 0 else None,
        "pc1_residual_std": resid,
        "off_pc1_std": float(math.sqrt(max(var[1:].sum(), 0.0) / n)),
    }


def _usable_windows(n: int, windows: Sequence[int]) -> tuple[list[int], list[int]]:
    """Windows whose merged sequence has at least 2 points (K ≤ N − 1), and the rest."""
    ok, skipped = [], []
    for K in windows:
        K = int(K)
        if K < 1:
            raise ValueError(f"windows must be >= 1, got {K}")
        (ok if n - K + 1 >= 2 else skipped).append(K)
    return sorted(set(ok)), sorted(set(skipped))


def summarize(data: GramData, windows: Sequence[int] = DEFAULT_WINDOWS) -> dict:
    """The analysis report (a JSON-ready dict) from Gram matrices alone."""
    from extramerge import select as _select

    n = data.n
    usable, dropped = _usable_windows(n, windows)
    ref_norm = data.ref_norm
    report: dict = {
        "n_checkpoints": n,
        "checkpoints": [{"path": p, "step": s} for p, s in zip(data.paths, data.steps, strict=False)],
        "reference": {"index": data.reference, "norm": ref_norm},
        "parameters": int(data.numel.sum()),
        "tensors": len(data.names),
        "skipped_tensors": data.skipped,
        "windows": usable,
        "skipped_windows": dropped,
        "raw": _geometry(data.gram, ref_norm),
        "merged": {},
    }
    for K in usable:
        report["merged"][str(K)] = _geometry(
            _analysis.merged_gram(data.gram, _weights.merge_matrix(n, K)), ref_norm
        )
    river = _select.estimate_river(data.gram)
    report["river"] = river.to_dict()
    if n >= 3:
        K, d = n // 2 if n // 2 >= 1 else 1, n - n // 2
        report["extra_suggestion"] = {
            "window": K,
            "offset": d,
            "alpha_match": _select.alpha_match(K, d),
            "alpha_geometric": _select.alpha_geometric(river, K, d),
        }
    report["per_tensor"] = _per_tensor(data, usable)
    return report


def _per_tensor(data: GramData, windows: list[int]) -> dict:
    """Rank-1 map: FVE_1 per tensor, raw (window 1) and SMA-merged; null where a tensor does not move."""
    n = data.n
    spread = np.trace(_analysis.centered_gram(data.per_tensor), axis1=-2, axis2=-1)
    total = spread.sum()
    moves = spread > 0

    def fve1(Gs):
        return [float(f) if m else None for f, m in zip(_analysis.fve1(Gs), moves, strict=True)]

    out = {
        "names": data.names,
        "numel": data.numel.tolist(),
        "variance_share": (spread / total if total > 0 else np.zeros_like(spread)).tolist(),
        "fve1": {"raw": fve1(data.per_tensor)},
    }
    for K in windows:
        out["fve1"][str(K)] = fve1(_analysis.merged_gram(data.per_tensor, _weights.merge_matrix(n, K)))
    return out


# --------------------------------------------------------------------------------------------- outputs


def _check_output_dir(output: Path, inputs: Sequence, force: bool) -> None:
    """Refuse an output overlapping an input (by inode) or that is not a folder; replace a non-empty
    folder only with ``force`` and only if an earlier analysis wrote it (its marker file, see
    extramerge.outputs): force never replaces a folder this package did not write."""
    from extramerge.checkpoints import CheckpointError, check_output
    from extramerge.outputs import MARKER, marked
    from rivervalley.publish import claim_folder

    check_output(output, inputs, force=True)  # overlap with the inputs, special files
    try:
        claim_folder(
            output, force, "analyze", marked=lambda p: marked(p, "analysis"), owner="extramerge analyze",
            marker=MARKER,
        )  # fmt: skip
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _render(jobs: list) -> None:
    """Draw figures in parallel forked processes where that is safe (glyph rendering is most of their
    cost and holds the GIL), else one after another."""
    from extramerge.engine import can_fork, run_forked

    if can_fork() and (os.cpu_count() or 1) > 1:
        run_forked(jobs)
    else:
        for job in jobs:
            job()


def write_outputs(data: GramData, report: dict, output, *, inputs=(), force: bool = False) -> dict:
    """Write analysis.json, gram.npz and the PNG figures into ``output`` (temp folder, then rename)."""
    from extramerge import plots
    from extramerge.checkpoints import publish, staging_dir
    from extramerge.outputs import discard, mark

    output = Path(output)
    _check_output_dir(output, list(inputs), force)
    tmp = staging_dir(output)
    try:
        files = {
            "analysis": "analysis.json",
            "gram": "gram.npz",
            "spectrum": "spectrum.png",
            "trajectory": "trajectory_pc12.png",
            "per_layer": "per_layer_fve1.png",
        }
        report = dict(report, files={k: str(output / v) for k, v in files.items()})
        mark(tmp, "analysis")
        data.save(tmp / files["gram"])
        with open(tmp / files["analysis"], "w") as f:
            json.dump(report, f, indent=1)
        _render(
            [
                lambda: plots.per_layer(report, tmp / files["per_layer"]),
                lambda: (
                    plots.spectrum(report, tmp / files["spectrum"]),
                    plots.trajectory(data, report["windows"], tmp / files["trajectory"]),
                ),
            ]
        )
        publish(tmp, output, force=True)  # _check_output_dir has vetted an existing output
    except BaseException:
        discard(tmp)
        raise
    return report


def _import_plots() -> None:
    from extramerge import plots

    plots.warm_up()


def analyze(
    checkpoints,
    *,
    windows: Sequence[int] = DEFAULT_WINDOWS,
    output=None,
    progress: bool = True,
    force: bool = False,
    reference: int = -1,
) -> dict:
    """Trajectory diagnostics of checkpoints (paths, a folder of step_* checkpoints, or opened ones).

    One streaming pass builds the Gram matrices; returns the report dict (see ``summarize``). With
    ``output`` also writes analysis.json, gram.npz and three PNG figures there, atomically. An existing
    output folder is replaced only if an earlier analysis wrote it (its marker file); ``force`` is kept for
    compatibility and never replaces any other non-empty folder.
    """
    from extramerge.checkpoints import Checkpoint, load_checkpoints

    opened = isinstance(checkpoints, Sequence) and all(isinstance(c, Checkpoint) for c in checkpoints)
    if isinstance(checkpoints, str | os.PathLike):
        checkpoints = [checkpoints]
    ckpts = list(checkpoints) if opened else load_checkpoints([str(p) for p in checkpoints])
    inputs = ckpts
    if output is not None:
        _check_output_dir(Path(output), inputs, force)  # fail before the long pass, not after
    try:  # the figures' matplotlib import (~0.4 s) overlaps the pass where workers are processes
        background = _import_plots if output is not None else None
        data = gram_pass(ckpts, reference=reference, progress=progress, background=background)
    finally:
        if not opened:
            for c in ckpts:
                c.close()
    report = summarize(data, windows)
    if output is not None:
        report = write_outputs(data, report, output, inputs=inputs, force=force)
    return report
