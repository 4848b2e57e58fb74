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

import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rivervalley import analysis as _analysis
from rivervalley import weights as _weights

__all__ = ["GramData", "gram_pass", "load_gram", "summarize", "analyze", "project_scores", "DEFAULT_WINDOWS"]

DEFAULT_WINDOWS = (1, 2, 4, 8)
_CHUNK_BYTES = 64 * 2**20  # float64 work buffer per chunk of a tensor: N × chunk × 8 bytes


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
    """Read a ``gram.npz`` written by ``GramData.save`` (for example by ``extramerge analyze``)."""
    with np.load(path, allow_pickle=False) as z:
        return GramData(
            gram=z["gram"],
            names=[str(s) for s in z["names"]],
            per_tensor=z["per_tensor"],
            numel=z["numel"],
            ref_norm2=z["ref_norm2"],
            reference=int(z["reference"]),
            paths=[str(s) for s in z["paths"]],
            steps=[None if s < 0 else int(s) for s in z["steps"]],
            skipped=[str(s) for s in z["skipped"]],
        )


_NUMPY_FLOATS = ("torch.float16", "torch.float32", "torch.float64")


def _chunk_gram(pieces, ref: int, buf: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Σ over one chunk of a tensor of (θ_i − θ_ref)(θ_j − θ_ref), in float64; and ‖θ_ref‖² over it.

    numpy does the float64 work (its X Xᵀ uses syrk, several times faster than torch's matmul here);
    ``buf`` is an optional reusable float64 scratch array of at least N × chunk elements.
    """
    import torch

    n, m = len(pieces), pieces[0].numel()
    X = (np.empty(n * m) if buf is None or buf.size < n * m else buf[: n * m]).reshape(n, m)
    for j, p in enumerate(pieces):
        p = p.reshape(-1)
        if str(p.dtype) in _NUMPY_FLOATS:
            X[j] = p.numpy()
        else:  # bfloat16, float8: numpy has no such dtype, let torch convert
            torch.from_numpy(X[j]).copy_(p)
    r = X[ref]
    r2 = float(r @ r)
    for j in range(n):  # row by row: no temporary copy of the reference row
        if j != ref:
            X[j] -= r  # exact: float32/bf16/fp16 differences are representable in float64
    r[:] = 0.0
    return X @ X.T, r2


def _tensor_gram(tensors, ref: int) -> tuple[np.ndarray, float]:
    """``_chunk_gram`` over whole in-memory tensors (chunked so the float64 copy stays small)."""
    n = len(tensors)
    flat = [t.reshape(-1) for t in tensors]
    chunk = max(1, _CHUNK_BYTES // (8 * n))
    G, r2 = np.zeros((n, n)), 0.0
    for s in range(0, flat[0].numel(), chunk):
        g, r = _chunk_gram([f[s : s + chunk] for f in flat], ref)
        G, r2 = G + g, r2 + r
    return G, r2


def _nonfinite(ckpts, name, pieces) -> Exception:
    import torch

    from extramerge.checkpoints import CheckpointError

    for c, t in zip(ckpts, pieces, strict=True):
        if not bool(torch.isfinite(t).all()):
            return CheckpointError(f"tensor '{name}' in {c.name} contains NaN or Inf values")
    return CheckpointError(f"tensor '{name}': its Gram matrix overflows float64 (values too large)")


def gram_pass(ckpts, *, reference: int = -1, progress: bool = True) -> GramData:
    """One streaming pass over opened checkpoints → Gram matrices of differences from ``reference``.

    ``reference`` indexes the checkpoints (default −1: the newest). Floating-point tensors only; integer
    buffers are listed in ``skipped``. Tensors are read in chunks (engine.iter_chunks), so memory does not
    grow with the model or the tensor size. Raises CheckpointError for NaN/Inf naming the tensor and file.
    """
    from tqdm.auto import tqdm

    from extramerge.checkpoints import check_compatible
    from extramerge.engine import iter_chunks

    n = len(ckpts)
    if n < 2:
        raise ValueError(f"trajectory analysis needs at least 2 checkpoints, got {n}")
    ref = range(n)[reference]
    infos = check_compatible(ckpts)
    names = [k for k, info in infos.items() if info.is_float]
    skipped = [k for k, info in infos.items() if not info.is_float]
    if not names:
        raise ValueError("no floating-point tensors to analyse")
    grams = {k: np.zeros((n, n)) for k in names}
    norms = dict.fromkeys(names, 0.0)
    total = sum(infos[k].nbytes for k in names) * n
    chunk_bytes = max(2**20, _CHUNK_BYTES // (2 * n))  # float64 work copy of a float32 chunk: ~_CHUNK_BYTES
    itemsize = min(infos[k].dtype.itemsize for k in names)
    buf = np.empty(n * (chunk_bytes // itemsize + 1))
    with tqdm(total=total, unit="B", unit_scale=True, desc="gram pass", disable=not progress) as bar:
        for name, _, _, pieces in iter_chunks(ckpts, names, chunk_bytes=chunk_bytes):
            G, r2 = _chunk_gram(pieces, ref, buf)
            if not np.all(np.isfinite(G)):
                raise _nonfinite(ckpts, name, pieces)
            grams[name] += G
            norms[name] += r2
            bar.update(sum(p.numel() * p.element_size() for p in pieces))
    per_tensor = np.stack([grams[k] for k in names])
    return GramData(
        gram=per_tensor.sum(axis=0),
        names=names,
        per_tensor=per_tensor,
        numel=np.asarray([infos[k].numel for k in names], dtype=np.int64),
        ref_norm2=np.asarray([norms[k] for k in names], dtype=np.float64),
        reference=ref,
        paths=[str(c.path) for c in ckpts],
        steps=[c.step for c in ckpts],
        skipped=skipped,
    )


# --------------------------------------------------------------------------------------------- geometry


def _oriented_pcs(G: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k eigenpairs (U [N, k], λ [k]) of the centred Gram, PC1 oriented so its scores grow in time."""
    vals, vecs = np.linalg.eigh(_analysis.centered_gram(G))
    vals, vecs = np.clip(vals[::-1], 0.0, None), vecs[:, ::-1]
    k = min(k, vals.size)
    U, lam = vecs[:, :k].copy(), vals[:k]
    t = np.arange(U.shape[0]) - (U.shape[0] - 1) / 2
    if U.shape[1] and t @ U[:, 0] < 0:
        U[:, 0] *= -1
    return U, lam


def project_scores(G, W, k: int = 2) -> np.ndarray:
    """Coordinates on the first k PCs of the trajectory with Gram G of affine combinations W [R, N].

    PC k is e_k = Xᵀ H u_k / √λ_k, so the centred point (w − 1/N)ᵀX has score (w − 1/N)ᵀ H G H u_k / √λ_k
    = wᵀ u_k √λ_k (u_k ⟂ 1). Rows of the identity give the checkpoints' own scores.
    """
    U, lam = _oriented_pcs(np.asarray(G, dtype=np.float64), k)
    return np.atleast_2d(np.asarray(W, dtype=float)) @ U * np.sqrt(lam)


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
    """Refuse an output overlapping an input; replace a non-empty folder only if it holds an earlier
    analysis (analysis.json) or ``force`` is set."""
    from extramerge.checkpoints import CheckpointError, check_output

    check_output(output, inputs, force=True)  # overlap with the inputs, existing non-folder
    if output.exists():
        if not output.is_dir():
            raise CheckpointError(f"output {output} exists and is not a folder")
        if any(output.iterdir()) and not (output / "analysis.json").exists() and not force:
            raise CheckpointError(f"output {output} exists and is not empty (use --force to replace it)")


def _publish(tmp: Path, output: Path) -> None:
    """Atomically replace ``output`` with the finished folder ``tmp`` (same filesystem)."""
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        os.rmdir(old)
        os.rename(output, old)
    os.rename(tmp, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_outputs(data: GramData, report: dict, output, *, inputs=(), force: bool = False) -> dict:
    """Write analysis.json, gram.npz and the PNG figures into ``output`` (temp folder, then rename)."""
    from extramerge import plots

    output = Path(output)
    _check_output_dir(output, list(inputs), force)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        files = {
            "analysis": "analysis.json",
            "gram": "gram.npz",
            "spectrum": "spectrum.png",
            "trajectory": "trajectory_pc12.png",
            "per_layer": "per_layer_fve1.png",
        }
        report = dict(report, files={k: str(output / v) for k, v in files.items()})
        data.save(tmp / files["gram"])
        plots.spectrum(report, tmp / files["spectrum"])
        plots.trajectory(data, report["windows"], tmp / files["trajectory"])
        plots.per_layer(report, tmp / files["per_layer"])
        with open(tmp / files["analysis"], "w") as f:
            json.dump(report, f, indent=1)
        _publish(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


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
    output folder is replaced only if it holds an earlier analysis or ``force`` is set.
    """
    from extramerge.checkpoints import Checkpoint, load_checkpoints

    opened = isinstance(checkpoints, Sequence) and all(isinstance(c, Checkpoint) for c in checkpoints)
    if isinstance(checkpoints, str | os.PathLike):
        checkpoints = [checkpoints]
    ckpts = list(checkpoints) if opened else load_checkpoints([str(p) for p in checkpoints])
    inputs = ckpts
    if output is not None:
        _check_output_dir(Path(output), inputs, force)  # fail before the long pass, not after
    try:
        data = gram_pass(ckpts, reference=reference, progress=progress)
    finally:
        if not opened:
            for c in ckpts:
                c.close()
    report = summarize(data, windows)
    if output is not None:
        report = write_outputs(data, report, output, inputs=inputs, force=force)
    return report
