"""§d' of THEORY.md: every merge is an affine weight vector; its expected loss on a linear or curved river and
the theory-optimal weights.
"""

from __future__ import annotations

import numpy as np

from rivervalley import weights as _weights
from rivervalley.checks import (
    as_integer,
    as_nonnegative,
    as_positive,
    as_real,
    as_scalar,
    check_step_product,
    fmt_value,
    linear_river_setup,
    to_output,
)
from rivervalley.theory.kernels import lag_matrix

__all__ = ["weights_delta_loss", "optimal_weights", "curved_weights_delta_loss"]


def _decorrelation_matrices(rho, n: int) -> np.ndarray:
    """11ᵀ − Γ_i, i.e. 1 − ρ_i^{|j−l|}, computed with expm1 so that it stays accurate as ρ_i → 1."""
    rho, lags = rho[:, None, None], lag_matrix(n)[None]
    near_one = rho > 0.5
    with np.errstate(all="ignore"):
        stable = -np.expm1(lags * np.log(np.where(near_one, rho, 1.0)))
    return np.where(near_one, stable, 1.0 - rho**lags)


def _affine_weights(weights) -> np.ndarray:
    """Weight vectors [..., N] (N >= 1), each summing to 1 (an affine merge), as a float array."""
    w = as_real("weights", weights)
    if w.ndim == 0 or w.shape[-1] == 0:
        raise ValueError(f"weights must have shape (..., N) with N >= 1, got shape {w.shape}")
    total = w.sum(axis=-1)
    bad = np.abs(total - 1.0) > 1e-8 * np.maximum(1.0, np.abs(w).sum(axis=-1))
    if bad.any():
        raise ValueError(f"weights must sum to 1 (an affine merge), got sum {fmt_value(total[bad].flat[0])}")
    return w


def weights_delta_loss(weights, *, slope, lr, interval, curvatures, noise=1.0):
    """Linear-river loss of any affine merge Σ_j w_j θ^(j), relative to the newest checkpoint (§d').

    ΔL(w) = c²ηs · lag(w) − Σ_i ω_i (1 − wᵀΓ_i w),  lag(w) = N − tᵀw,  t = (1..N),  Γ_i[j,l] = ρ_i^{|j−l|}.
    ``weights`` is a vector over checkpoints 1..N (last entry = newest) or a batch of shape (..., N); each
    must sum to 1. ``slope``, ``lr`` and ``interval`` are scalars here; ``noise`` is a scalar or one σ_i per
    curvature (a valley whose directions see different gradient noise).
    """
    w = _affine_weights(weights)
    push, rho, omega = linear_river_setup(slope, lr, interval, curvatures, noise)
    n = w.shape[-1]
    lag = n - w @ np.arange(1, n + 1, dtype=float)
    # 1 − wᵀΓ_i w = wᵀ(11ᵀ − Γ_i)w for affine w; the right side does not cancel when Γ_i ≈ 11ᵀ (ρ_i → 1).
    deficit = np.einsum("...j,ijl,...l->...i", w, _decorrelation_matrices(rho, n), w)
    return to_output(push * lag - np.sum(omega * deficit, axis=-1))


def optimal_weights(*, n, slope, lr, interval, curvatures, noise=1.0):
    """Theory-optimal affine merge of N checkpoints for the linear river (THEORY.md §d').

    Minimises ΔL(w) = c²ηs(N − tᵀw) − Σω_i + wᵀQw, Q = Σ_i ω_i Γ_i, subject to 1ᵀw = 1. The Lagrange
    condition −c²ηs·t + 2Qw − ν1 = 0 gives w = Q⁻¹(c²ηs·t + ν1)/2 with
    ν = (2 − c²ηs·1ᵀQ⁻¹t) / (1ᵀQ⁻¹1). Needs Q positive definite (noise > 0 and some |ρ_i| < 1);
    a ValueError says so when Q is singular or ill-conditioned to working precision. The solve lives in
    :func:`rivervalley.weights.optimal`.
    """
    return _weights.optimal(n, slope=slope, lr=lr, interval=interval, curvatures=curvatures, noise=noise)


def curved_weights_delta_loss(
    weights, *, river_curvature, lr, interval, curvatures, e0, start=0, noise=1.0, river_noise=0.0
):
    """Curved river: E L(Σ_j w_j θ^(j)) − E L(θ^(N)) for any affine w over checkpoints j = 1..N (§d, §d').

    Checkpoint j is θ at step (start + j − 1)·s, from u_0 = u* + e0 plus stationary river noise, with
    stationary valleys. E[u^(j)] − u* = e0 r^{start+j−1} (r = (1−ημ)^s), Cov = V_u Γ(r), valley Cov_i =
    V_i Γ(ρ_i), so with m(w) = e0 Σ_j w_j r^{start+j−1}:

        ΔL(w) = (μ/2)(m(w)² − m(e_N)²) − (μ/2) V_u (1 − wᵀΓ(r)w) − Σ_i ω_i (1 − wᵀΓ_i w)

    For Extra-Merge weights this equals :func:`curved_expected_loss` minus the newest checkpoint's loss.
    The river slope only fixes u* and does not enter. ``weights``: [N] or a batch [..., N], each summing to 1.
    """
    w = _affine_weights(weights)
    mu = as_scalar("river_curvature", as_positive("river_curvature", river_curvature))
    e0 = as_scalar("e0", as_real("e0", e0))
    start = int(as_scalar("start", as_integer("start", start, 0)))
    river_noise = as_scalar("river_noise", as_nonnegative("river_noise", river_noise))
    _, rho, omega = linear_river_setup(0.0, lr, interval, curvatures, noise)
    lr, interval = float(lr), int(interval)
    check_step_product("lr*river_curvature", np.asarray(lr * mu), allow_zero=False)
    n = w.shape[-1]
    r = (1.0 - lr * mu) ** interval
    path = e0 * r ** np.arange(start, start + n, dtype=float)  # E[u^(j)] − u*
    river_var = lr * river_noise**2 / (mu * (2.0 - lr * mu))
    gammas = _decorrelation_matrices(np.append(rho, r), n)  # 11ᵀ − Γ, accurate as ρ → 1
    deficit = np.einsum("...j,ijl,...l->...i", w, gammas, w)
    scale = np.append(omega, mu / 2 * river_var)
    mean_term = mu / 2 * ((w @ path) ** 2 - path[-1] ** 2)
    return to_output(mean_term - np.sum(scale * deficit, axis=-1))
