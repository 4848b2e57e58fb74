"""Choosing α for Extra-Merge E(α) = M_N + α (M_N − M_{N−d}) (THEORY.md §d).

Two estimates from the checkpoints, each optimising something different, and the loss-optimal α that
needs the landscape. Be clear which one you use:

``alpha_match(K, d) = (K−1)/(2d)``
    Zero lag: on a straight river the merge's expected position equals the newest checkpoint's
    (THEORY.md §d, invariant 2). Needs no data. Ignores noise entirely.

``alpha_geometric(estimate, K, d)``
    Noise-aware, *parameter space*: minimises E‖E(α) − T‖² where T = a + b·N is the river-line point at the
    newest checkpoint, under the model θ_j = a + b·j + v_j with stationary AR(1) valley noise
    (Cov(v_j, v_l) = V ρ^{|j−l|}, V summed over all valley directions). For any weight vector w,

        E‖wᵀθ − T‖² = ‖b‖² lag(w)² + V wᵀΓw,       Γ_jl = ρ^{|j−l|},

    quadratic in α, minimised in closed form. With V = 0 it returns α_match. It asks "where is the
    de-noised river now?", which is a proxy, not the loss.

α* = (P − 2W)/(4W) (``rivervalley.theory``)
    The loss-optimal α on a linear river (THEORY.md §d). P = c²ηs·d and W = Σ_i ω_i (G_i − C_{d,i}) need
    the river slope c and the valley curvatures λ_i, which checkpoints alone do not reveal: parameter
    geometry cannot tell a flat noisy direction from a steep one. The loss rewards moving *further* along a
    descending river (P enters linearly), so α* is not α_geometric in general. Supply P and W from a model
    of the landscape (``rivervalley.theory.optimal_alpha`` computes α* from slope, learning rate, checkpoint
    interval and curvatures), or measure held-out loss over an α grid (``extramerge study``).

All data-driven quantities come from the N×N Gram matrix (one streaming pass; see extramerge.trajectory):
no second read of the checkpoints is needed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from rivervalley import analysis as _analysis
from rivervalley import weights as _weights

__all__ = [
    "RiverEstimate",
    "estimate_river",
    "alpha_match",
    "alpha_geometric",
]


@dataclass(frozen=True)
class RiverEstimate:
    """River-valley parameters of a trajectory, in parameter units (Euclidean norm of the flat vector).

    drift:     ‖b‖, distance travelled per checkpoint along the least-squares line θ_j ≈ a + b·j.
    drift_pc1: slope of the least-squares line through the PC1 scores (the same, seen along PC1 only).
    noise_var: V, valley variance summed over directions: E‖v_j‖², corrected for the detrending.
    noise_std: √V.
    rho:       lag-1 autocorrelation of the residuals about the line (method of moments, detrend-corrected).
    n:         number of checkpoints.
    """

    drift: float
    drift_pc1: float
    noise_var: float
    noise_std: float
    rho: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def _line_projector(n: int) -> np.ndarray:
    """Orthogonal projector onto span{1, t}: fitted values of a least-squares line through n points."""
    t = np.arange(1, n + 1, dtype=float)
    A = np.stack([np.ones(n), t], axis=1)
    return A @ np.linalg.pinv(A)


def _lag1_ratio(R: np.ndarray) -> float:
    tr = np.trace(R)
    return float(np.trace(R, offset=1) / tr) if tr > 0 else 0.0


def estimate_river(G, *, rho_grid: int = 397) -> RiverEstimate:
    """Estimate drift, valley noise V and AR(1) coefficient ρ from a Gram matrix G (raw or of differences).

    Residuals about the least-squares line have Gram R = (I−P) G (I−P), P the line projector. Under the
    model, E R = V (I−P) Γ(ρ) (I−P); ρ is the value whose predicted lag-1 ratio tr₁(R)/tr(R) matches the
    observed one (grid search over (−0.99, 0.99)), then V = tr R / tr((I−P) Γ(ρ)). With N ≤ 3 the
    residuals carry no information (N = 3 has one degree of freedom): ρ is reported as 0.
    """
    G = np.asarray(G, dtype=np.float64)
    n = G.shape[-1]
    if G.shape != (n, n) or n < 2:
        raise ValueError("estimate_river needs one N×N Gram matrix with N >= 2")
    t = np.arange(1, n + 1, dtype=float)
    c = (t - t.mean()) / np.sum((t - t.mean()) ** 2)
    drift = math.sqrt(max(float(c @ G @ c), 0.0))
    scores, _ = _analysis.pc_scores(G, k=1)
    drift_pc1 = abs(float(c @ scores[:, 0]))
    if n <= 2:
        return RiverEstimate(drift, drift_pc1, 0.0, 0.0, 0.0, n)
    Q = np.eye(n) - _line_projector(n)
    R = Q @ G @ Q
    rho = 0.0
    if n > 3 and np.trace(R) > 0:
        observed = _lag1_ratio(R)
        grid = np.linspace(-0.99, 0.99, rho_grid)
        predicted = np.array([_lag1_ratio(Q @ _weights.correlation_matrix(r, n) @ Q) for r in grid])
        rho = float(grid[np.argmin(np.abs(predicted - observed))])
    V = max(float(np.trace(R)), 0.0) / float(np.trace(Q @ _weights.correlation_matrix(rho, n)))
    return RiverEstimate(drift, drift_pc1, V, math.sqrt(V), rho, n)


def alpha_match(window: int, offset: int) -> float:
    """α_match = (K−1)/(2d): puts the expected merge exactly at the newest checkpoint on a straight river."""
    if offset < 1:
        raise ValueError("alpha_match needs offset >= 1 (with d = 0 extrapolation does nothing)")
    return (window - 1) / (2.0 * offset)



def alpha_geometric(estimate: RiverEstimate, window: int, offset: int) -> float:
    """Noise-aware α: argmin_α E‖E(α) − T‖² (see the module docstring). Closed form of a quadratic.

    With w(α) = m + α δ (m the SMA vector, δ = m − m_shifted): f(α) = D²(lag(m) − α·δlag)² + V (m+αδ)ᵀΓ(m+αδ),
    so α = (D² lag(m) δlag − V δᵀΓm) / (D² δlag² + V δᵀΓδ).
    """
    n = window + offset
    m = _weights.extra(n, window, offset, 0.0)
    delta = _weights.extra(n, window, offset, 1.0) - m
    Gam = _weights.correlation_matrix(estimate.rho, n)
    D2, V = estimate.drift**2, estimate.noise_var
    # lag(w) = N − tᵀw is affine: lag(m + αδ) = lag(m) − α·tᵀδ (and tᵀδ = d).
    lag_m, dlag = _weights.lag(m), float(np.arange(1, n + 1) @ delta)
    denom = D2 * dlag**2 + V * float(delta @ Gam @ delta)
    if denom <= 0:
        return 0.0
    return float((D2 * lag_m * dlag - V * float(delta @ Gam @ m)) / denom)
