"""Trajectory geometry from the Gram matrix: PCA spectra, rank-1 fraction, PC1 trend extrapolation.

Everything here works on the N×N Gram matrix G = X Xᵀ of a trajectory X = [θ_1; ...; θ_N], never on the
N×p trajectory itself, so simulated trajectories (rivervalley) and streamed real checkpoints (extramerge)
share one implementation. Merged trajectories need no second pass: rows M = W X have Gram W G Wᵀ.
All functions accept a leading batch axis (for example over simulation seeds).
"""

from __future__ import annotations

import numpy as np

from rivervalley import weights as _weights

__all__ = [
    "gram",
    "centered_gram",
    "merged_gram",
    "pca_spectrum",
    "explained_variance",
    "fve1",
    "pc_scores",
    "displacement_cosines",
    "pc1_trend_weights",
]


def gram(trajectory) -> np.ndarray:
    """G = X Xᵀ in float64 for X [..., N, p] (numpy or torch)."""
    try:
        import torch

        if isinstance(trajectory, torch.Tensor):
            x = trajectory.to(torch.float64)
            return (x @ x.transpose(-1, -2)).cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    x = np.asarray(trajectory, dtype=np.float64)
    return x @ np.swapaxes(x, -1, -2)


def centered_gram(G) -> np.ndarray:
    """H G H with H = I − 11ᵀ/N: the Gram matrix of the checkpoints minus their mean."""
    G = np.asarray(G, dtype=np.float64)
    row = G.mean(axis=-1, keepdims=True)
    col = G.mean(axis=-2, keepdims=True)
    tot = G.mean(axis=(-1, -2), keepdims=True)
    return G - row - col + tot


def merged_gram(G, W) -> np.ndarray:
    """Gram matrix of the merged rows W X: W G Wᵀ (W is [R, N], one weight vector per row)."""
    W = np.asarray(W, dtype=np.float64)
    return W @ np.asarray(G, dtype=np.float64) @ W.T


def _eigh_desc(C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vals, vecs = np.linalg.eigh(C)
    vals = np.clip(vals[..., ::-1], 0.0, None)
    return vals, vecs[..., ::-1]


def pca_spectrum(G) -> np.ndarray:
    """PCA variances (eigenvalues of the centred Gram matrix), descending, clipped at 0."""
    return _eigh_desc(centered_gram(G))[0]


def explained_variance(G) -> np.ndarray:
    """Explained-variance fractions FVE_1 ≥ FVE_2 ≥ ... (sum 1; all zero for a trajectory with no spread)."""
    vals = pca_spectrum(G)
    tot = vals.sum(axis=-1, keepdims=True)
    return np.divide(vals, tot, out=np.zeros_like(vals), where=tot > 0)


def fve1(G) -> np.ndarray:
    """Fraction of variance explained by the first principal component (the rank-1 fraction)."""
    return explained_variance(G)[..., 0]


def pc_scores(G, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of each checkpoint on the first k principal components, and those PCs' variances.

    From the centred Gram C = U Λ Uᵀ the scores are U √Λ. PC1 is oriented so that its scores grow with the
    checkpoint index (the direction of travel); the other components keep eigh's sign.
    Returns (scores [..., N, k], variances [..., k]).
    """
    vals, vecs = _eigh_desc(centered_gram(G))
    k = min(k, vals.shape[-1])
    U = vecs[..., :k].copy()
    n = U.shape[-2]
    if k:
        t = np.arange(n) - (n - 1) / 2
        U[..., :, 0] *= np.where(U[..., :, 0] @ t < 0, -1.0, 1.0)[..., None]
    return U * np.sqrt(vals[..., None, :k]), vals[..., :k]


def displacement_cosines(G) -> np.ndarray:
    """cos∠(θ_{j+1} − θ_j, θ_{j+2} − θ_{j+1}) for consecutive displacements, from the Gram matrix alone."""
    G = np.asarray(G, dtype=np.float64)
    n = G.shape[-1]
    if n < 3:
        return np.zeros(G.shape[:-2] + (0,))
    D = np.zeros((n - 1, n))
    D[np.arange(n - 1), np.arange(1, n)] = 1.0
    D[np.arange(n - 1), np.arange(n - 1)] = -1.0
    Gd = merged_gram(G, D)
    norms = np.sqrt(np.clip(np.diagonal(Gd, axis1=-2, axis2=-1), 0.0, None))
    inner = np.diagonal(Gd, offset=1, axis1=-2, axis2=-1)
    denom = norms[..., :-1] * norms[..., 1:]
    return np.divide(inner, denom, out=np.zeros_like(inner), where=denom > 0)


def pc1_trend_weights(G, window: int, ahead: float = 0.0, steps=None) -> np.ndarray:
    """Extrapolate along the first principal component's trend, as an affine weight vector.

    Base: M = SMA of the last K checkpoints. PC1 of the centred trajectory is e_1 = Σ_j (u_j/√λ_1) θ_j
    (u the top eigenvector of the centred Gram, orthogonal to 1, so these weights sum to 0). A least-squares
    line through the checkpoints' PC1 scores, evaluated ``ahead`` past the newest checkpoint, gives the
    target score ŝ; the result is M + (ŝ − s_M) e_1: M with its PC1 coordinate moved onto the trend.
    On an exact line this returns the point ``ahead`` past θ_N exactly.
    """
    G = np.asarray(G, dtype=np.float64)
    if G.ndim != 2:
        raise ValueError("pc1_trend_weights takes one N×N Gram matrix")
    n = G.shape[-1]
    base = _weights.sma(n, window)
    if n < 2:
        return base
    vals, vecs = _eigh_desc(centered_gram(G))
    if vals[0] <= 0:
        return base
    u = vecs[:, 0]
    scores = u * np.sqrt(vals[0])
    fit = _weights.trend(n, n, ahead=ahead, steps=steps)  # line through all N scores
    target = fit @ scores
    return base + (target - base @ scores) * u / np.sqrt(vals[0])
