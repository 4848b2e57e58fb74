"""Every rule for α in Extra-Merge E(α) = M_N + α (M_N − M_{N−d}) (THEORY.md §d), in one place.

Three answers, each optimising something different. Be clear which one you use:

``alpha_match(K, d) = (K−1)/(2d)``
    Zero lag: on a straight river the merge's expected position equals the newest checkpoint's
    (THEORY.md §d, invariant 2). Needs no data. Ignores noise entirely.

``alpha_geometric(estimate, K, d)``
    Noise-aware, *parameter space*: minimises E‖E(α) − T‖² where T = a + b·N is the river-line point at the
    newest checkpoint, under the model θ_j = a + b·j + v_j with stationary AR(1) valley noise
    (Cov(v_j, v_l) = V ρ^{|j−l|}, V summed over all valley directions). For any weight vector w,

        E‖wᵀθ − T‖² = ‖b‖² lag(w)² + V wᵀΓw,       Γ_jl = ρ^{|j−l|},

    quadratic in α, minimised in closed form. With V = 0 it returns α_match. It asks "where is the
    de-noised river now?", which is a proxy, not the loss. ``estimate`` (drift ‖b‖, V, ρ) comes from the
    trajectory's N×N Gram matrix alone (``estimate_river``; extramerge computes that matrix in one
    streaming pass over the checkpoints).

α* = (P − 2W)/(4W) (``loss_optimal_alpha``; from a landscape model: ``optimal_alpha``)
    The loss-optimal α on a linear river. P = c²ηs·d and W = Σ_i ω_i (G_i − C_{d,i}) need the river slope
    c and the valley curvatures λ_i, which checkpoints alone do not reveal: parameter geometry cannot tell
    a flat noisy direction from a steep one. The loss rewards moving *further* along a descending river
    (P enters linearly), so α* is not α_geometric in general. Where the loss has no minimum in α it is ±inf
    (the direction in which the loss keeps falling) or NaN (α does not matter): see ``loss_optimal_alpha``.
    ``curved_optimal_alpha`` is the same on a curved river. Without a landscape model, measure held-out loss
    over an α grid (``extramerge study``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from rivervalley import analysis as _analysis
from rivervalley import weights as _weights
from rivervalley.checks import as_real, to_output
from rivervalley.theory.extrapolation import curved_terms, linear_river_terms

__all__ = [
    "alpha_match",
    "RiverEstimate",
    "estimate_river",
    "alpha_geometric",
    "loss_optimal_alpha",
    "optimal_alpha",
    "curved_optimal_alpha",
]


def alpha_match(window: int, offset: int) -> float:
    """α_match = (K−1)/(2d): puts the expected merge exactly at the newest checkpoint on a straight river."""
    if offset < 1:
        raise ValueError("alpha_match needs offset >= 1 (with d = 0 extrapolation does nothing)")
    return (window - 1) / (2.0 * offset)


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


def alpha_geometric(estimate: RiverEstimate, window: int, offset: int) -> float:
    """Noise-aware α: argmin_α E‖E(α) − T‖² (see the module docstring). Closed form of a quadratic.

    With w(α) = m + α δ (m the SMA vector, δ = m − m_shifted): f(α) = D²(lag(m) − α·δlag)² + V (m+αδ)ᵀΓ(m+αδ),
    so α = (D² lag(m) δlag − V δᵀΓm) / (D² δlag² + V δᵀΓδ); 0 where f does not depend on α.
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


def loss_optimal_alpha(P, W):
    """α* = (P − 2W)/(4W), the minimiser of ΔL(α) = R − B − Pα + 2Wα(1+α) on a linear river (THEORY.md §d).

    For W ≤ 0 ΔL has no minimum (linear in α for W = 0, concave for W < 0; on the river valley W ≥ 0, and
    W = 0 means no valley noise, d = 0 or only flat valleys): α* is then +inf where ΔL keeps falling as α
    grows (P − 2W > 0), −inf where it keeps falling as α shrinks (P − 2W < 0), and NaN where P = 2W (for
    W = 0 every α gives the same loss). This is the one edge rule of α*: every caller gets it from here.
    Broadcasts over P and W; a Python float for scalar input.
    """
    P, W = np.broadcast_arrays(as_real("P", P), as_real("W", W))
    falling = P - 2 * W  # −dΔL/dα at α = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = falling / (4 * W)
    unbounded = np.where(falling > 0, np.inf, np.where(falling < 0, -np.inf, np.nan))
    return to_output(np.where(W > 0, alpha, unbounded))


def optimal_alpha(*, slope, lr, interval, window, offset, curvatures, noise=1.0):
    """α* of :func:`rivervalley.theory.extrapolation_delta_loss` from the landscape (THEORY.md §d).

    P = c²ηs·d and W = Σ_i ω_i(G_i − C_{d,i}) as there; α* = (P − 2W)/(4W) with the edge rule of
    :func:`loss_optimal_alpha` (W = 0: +inf if P > 0, NaN if P = 0).
    """
    _, P, _, W = linear_river_terms(slope, lr, interval, window, offset, curvatures, noise)
    return loss_optimal_alpha(P, W)


def curved_optimal_alpha(
    *, slope, river_curvature, lr, interval, window, offset, curvatures, e0, k, noise=1.0, river_noise=0.0
):
    """Minimiser of :func:`rivervalley.theory.curved_expected_loss`: α* = (μ m_k² δ − 2Ŵ)/(μ m_k² δ² + 4Ŵ)
    (THEORY.md §d).

    Noise-free (Ŵ = 0) it is α* = 1/δ = 1/(r^{−d} − 1), which lands exactly on u*. The loss is a convex
    quadratic in α (Ŵ ≥ 0), so the edge rule of :func:`loss_optimal_alpha` leaves only its NaN: where the
    loss does not depend on α (Ŵ = 0 and m_k δ = 0).
    """
    mu, m_now, dm, _, w_hat = curved_terms(
        slope, river_curvature, lr, interval, window, offset, curvatures, e0, k, noise, river_noise
    )
    denominator = mu * dm**2 + 4 * w_hat
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = (mu * m_now * dm - 2 * w_hat) / denominator
    return to_output(np.where(denominator > 0, alpha, np.nan))
