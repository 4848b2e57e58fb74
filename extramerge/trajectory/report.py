"""The analysis report from Gram matrices alone: PCA spectra of the raw and SMA-merged trajectories,
displacement cosines, PC1 drift, the per-tensor rank-1 map and α suggestions (``summarize``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from extramerge.trajectory.data import GramData
from rivervalley import analysis as _analysis
from rivervalley import weights as _weights
from rivervalley.theory import alpha as _alpha

__all__ = ["DEFAULT_WINDOWS", "project_scores", "summarize"]

DEFAULT_WINDOWS = (1, 2, 4, 8)


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
    river = _alpha.estimate_river(data.gram)
    report["river"] = river.to_dict()
    if n >= 3:
        K, d = n // 2 if n // 2 >= 1 else 1, n - n // 2
        report["extra_suggestion"] = {
            "window": K,
            "offset": d,
            "alpha_match": _alpha.alpha_match(K, d),
            "alpha_geometric": _alpha.alpha_geometric(river, K, d),
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
