"""§e of THEORY.md: the predicted share of variance on PC1 of consecutive (merged) checkpoints."""

from __future__ import annotations

import numpy as np

from rivervalley.checks import (
    as_curvatures,
    as_integer,
    as_nonnegative,
    as_positive,
    as_real,
    as_scalar,
    check_step_product,
)
from rivervalley.theory.kernels import gain_gap, lag_matrix

__all__ = ["rank1_fraction"]


def rank1_fraction(*, slope, lr, interval, window, curvatures, n, noise=1.0):
    """Predicted share of variance on PC1 of n consecutive SMA-merged checkpoints (THEORY.md §e).

    S = D² n(n²−1)/12 (D = ηcs), N_i = V_i tr(HΓ̃_i), N∥_i = V_i τᵀΓ̃_iτ/|τ|², Γ̃_i[j,l] = C_{|j−l|}(K, ρ_i),
    H = I − 11ᵀ/n, τ_j = j − (n+1)/2. Returns (approx, lower_bound) with
    approx = (S + ΣN∥)/(S + ΣN) and the rigorous lower bound E FVE_1 ≥ S/(S + ΣN). window = 1 means raw
    checkpoints. NaN when S + ΣN = 0 (no drift and no noise).
    """
    n = int(as_scalar("n", as_integer("n", n, 2)))
    window = int(as_scalar("window", as_integer("window", window, 1)))
    slope = as_scalar("slope", as_real("slope", slope))
    lr = as_scalar("lr", as_positive("lr", lr))
    interval = as_scalar("interval", as_integer("interval", interval, 1))
    noise = as_scalar("noise", as_nonnegative("noise", noise))
    curvatures = as_curvatures(curvatures)
    check_step_product("lr*curvatures", lr * curvatures, allow_zero=False)
    rho = (1.0 - lr * curvatures) ** interval
    variance = lr * noise**2 / (curvatures * (2.0 - lr * curvatures))
    lags = lag_matrix(n)
    # H1 = 0 and τᵀ1 = 0, so Γ̃ may be replaced by Γ̃ − G·11ᵀ = −Δ, Δ[j,l] = G − C_{|j−l|}: this keeps full
    # relative accuracy where ρ → 1 makes every entry of Γ̃ ≈ 1.
    gap = gain_gap(window, lags[None, :, :], rho[:, None, None])  # Δ, shape (m, n, n)
    tau = np.arange(1, n + 1) - (n + 1) / 2.0
    centred_trace = gap.sum(axis=(1, 2)) / n  # tr(HΓ̃) = −tr(Δ) + 1ᵀΔ1/n and diag Δ = 0
    aligned = -np.einsum("j,ijl,l->i", tau, gap, tau) / (tau @ tau)
    signal = (lr * slope * interval) ** 2 * n * (n**2 - 1) / 12.0
    noise_total = float(np.sum(variance * centred_trace))
    aligned_total = float(np.sum(variance * aligned))
    with np.errstate(divide="ignore", invalid="ignore"):
        denominator = np.float64(signal + noise_total)
        return float((signal + aligned_total) / denominator), float(signal / denominator)
