"""§a–§c of THEORY.md: stationary valley variance, merging as a low-pass filter (SMA/EMA gains, cross terms,
frequency responses) and the lag of a merge along the river.
"""

from __future__ import annotations

import numpy as np

from rivervalley.checks import (
    as_decay,
    as_integer,
    as_nonnegative,
    as_positive,
    as_real,
    as_rho,
    check_step_product,
    to_output,
)
from rivervalley.theory.kernels import window_cross, window_gain

__all__ = [
    "stationary_variance",
    "sma_gain",
    "sma_cross",
    "ema_gain",
    "sma_response",
    "ema_response",
    "sma_lag",
    "ema_lag",
]


def stationary_variance(lr, curvature, noise=1.0):
    """Stationary valley variance V = η σ² / (λ (2 − ηλ))  (THEORY.md §a); needs 0 < ηλ < 2."""
    lr = as_positive("lr", lr)
    curvature = as_real("curvature", curvature)
    noise = as_nonnegative("noise", noise)
    check_step_product("lr*curvature", lr * curvature, allow_zero=False)
    return to_output(lr * noise**2 / (curvature * (2.0 - lr * curvature)))


def sma_gain(window, rho):
    """Valley variance gain of a K-checkpoint uniform average (SMA), THEORY.md §b.

    G_K(ρ) = (1/K²) Σ_{j,l<K} ρ^{|j−l|} = (1+ρ)/(K(1−ρ)) − 2ρ(1−ρ^K)/(K²(1−ρ)²),
    with G_1 = 1, G_K(0) = 1/K and the limit G_K(1) = 1 (evaluated without cancellation near ρ = 1).
    """
    window = as_integer("window", window, 1)
    return to_output(window_gain(window, as_rho(rho)))


def sma_cross(window, offset, rho):
    """C_d = S_d/K²: correlation (in units of V) of two K-windows whose ends are d checkpoints apart (§b).

    0 ≤ d ≤ K:  S_d = (K−d)(1+ρ)/(1−ρ) + [ρ^{K−d+1}(1−ρ^d)² − 2ρ^{d+1}(1−ρ^{K−d})]/(1−ρ)²
    d ≥ K−1:    S_d = ρ^{d−K+1}(1−ρ^K)²/(1−ρ)²;      C_0 = G_K, and C_d(1) = 1.
    """
    window = as_integer("window", window, 1)
    offset = as_integer("offset", offset, 0)
    return to_output(window_cross(window, offset, as_rho(rho)))


def ema_gain(decay, rho):
    """Valley variance gain of a stationary EMA m_k = β m_{k−1} + (1−β) θ^(k)  (THEORY.md §b).

    G_EMA = (1−β)(1+βρ) / ((1+β)(1−βρ)).
    """
    beta, rho = as_decay(decay), as_rho(rho)
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = (1 - beta) * (1 + beta * rho) / ((1 + beta) * (1 - beta * rho))
    return to_output(gain)


def sma_response(window, omega):
    """|H_SMA(ω)| = |sin(Kω/2) / (K sin(ω/2))|, ω in radians per checkpoint (§b); 1 where sin(ω/2) = 0."""
    window = as_integer("window", window, 1)
    omega = as_real("omega", omega)
    half = np.sin(omega / 2.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.abs(np.sin(window * omega / 2.0) / (window * half))
    return to_output(np.where(half == 0.0, 1.0, ratio))


def ema_response(decay, omega):
    """|H_EMA(ω)| = (1−β) / √(1 − 2β cos ω + β²)  (THEORY.md §b).

    The denominator is evaluated as (1−β)² + 4β sin²(ω/2), the same quantity without the cancellation of
    1 − 2β cos ω + β² at β → 1, ω → 0 (which let |H| exceed 1 by ~1e-11).
    """
    beta, omega = as_decay(decay), as_real("omega", omega)
    return to_output((1 - beta) / np.sqrt((1 - beta) ** 2 + 4 * beta * np.sin(omega / 2.0) ** 2))


# ---------------------------------------------------------------------------------------------------------
# §c: lag along the river


def sma_lag(window, drift):
    """Distance an SMA of K checkpoints trails the newest one along the river: D(K−1)/2  (§c)."""
    return to_output(as_real("drift", drift) * (as_integer("window", window, 1) - 1) / 2.0)


def ema_lag(decay, drift):
    """Distance a stationary EMA with decay β trails the newest checkpoint: D β/(1−β)  (§c)."""
    beta = as_decay(decay)
    return to_output(as_real("drift", drift) * beta / (1 - beta))
