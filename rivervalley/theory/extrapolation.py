"""§d of THEORY.md: Extra-Merge E_k(α) = M_k + α(M_k − M_{k−d}) on a linear and on a curved river: expected
loss and valley factor, and the terms of both losses (``linear_river_terms``, ``curved_terms``) from which
:mod:`rivervalley.theory.alpha` takes the optimal α.
"""

from __future__ import annotations

import numpy as np

from rivervalley.checks import (
    as_curvatures,
    as_integer,
    as_nonnegative,
    as_positive,
    as_real,
    as_rho,
    check_step_product,
    require,
    to_output,
)
from rivervalley.theory.kernels import gain_gap, geometric_sum, valley_terms, window_gain

__all__ = [
    "valley_factor",
    "extrapolation_delta_loss",
    "curved_expected_loss",
    "linear_river_terms",
    "curved_terms",
]


def linear_river_terms(slope, lr, interval, window, offset, curvatures, noise):
    """R, P, B, W of THEORY.md §d, validated and broadcast over all scalar arguments."""
    slope = as_real("slope", slope)
    lr = as_positive("lr", lr)
    interval = as_integer("interval", interval, 1)
    window = as_integer("window", window, 1)
    offset = as_integer("offset", offset, 0)
    noise = as_nonnegative("noise", noise)
    curvatures = as_curvatures(curvatures)
    slope, lr, interval, window, offset, noise = np.broadcast_arrays(
        slope, lr, interval, window, offset, noise
    )
    push = slope**2 * lr * interval  # c·D = c²ηs
    B, W, _ = valley_terms(lr, interval, window, offset, curvatures, noise)
    return push * (window - 1) / 2.0, push * offset, B, W


def valley_factor(alpha, window, offset, rho):
    """Var[(1+α) v̄_k − α v̄_{k−d}] / V = G + 2(G − C_d) α(1+α)  (THEORY.md §d).

    Symmetric under α ↔ −1 − α and smallest at α = −½.
    """
    alpha = as_real("alpha", alpha)
    window, offset = as_integer("window", window, 1), as_integer("offset", offset, 0)
    rho = as_rho(rho)
    return to_output(window_gain(window, rho) + 2 * gain_gap(window, offset, rho) * alpha * (1 + alpha))


def extrapolation_delta_loss(alpha, *, slope, lr, interval, window, offset, curvatures, noise=1.0):
    """Linear river: E L(E_k(α)) − E L(θ_last) for Extra-Merge E_k = M_k + α(M_k − M_{k−d})  (§d).

    ΔL(α) = R − Pα − B + 2Wα(1+α), with R = c²ηs(K−1)/2, P = c²ηs·d, B = Σ_i ω_i(1 − G_i),
    W = Σ_i ω_i(G_i − C_{d,i}), ρ_i = (1 − ηλ_i)^s and ω_i = λ_i V_i/2. Broadcasts over every argument
    except ``curvatures``, the 1-D array of valley curvatures λ_i that is summed over.
    """
    alpha = as_real("alpha", alpha)
    R, P, B, W = linear_river_terms(slope, lr, interval, window, offset, curvatures, noise)
    return to_output(R - P * alpha - B + 2 * W * alpha * (1 + alpha))


# §d, curved river


def curved_terms(slope, river_curvature, lr, interval, window, offset, curvatures, e0, k, noise, river_noise):
    """Returns (μ, m_k, Δm = m_{k−d} − m_k, river+valley variance at α = 0, Ŵ), broadcast."""
    as_real("slope", slope)  # only sets u* = c/μ; the loss above L* does not depend on it
    mu = as_positive("river_curvature", river_curvature)
    lr = as_positive("lr", lr)
    interval = as_integer("interval", interval, 1)
    window = as_integer("window", window, 1)
    offset = as_integer("offset", offset, 0)
    e0 = as_real("e0", e0)
    k = as_integer("k", k, 0)
    noise = as_nonnegative("noise", noise)
    river_noise = as_nonnegative("river_noise", river_noise)
    curvatures = as_curvatures(curvatures)
    mu, lr, interval, window, offset, e0, k, noise, river_noise = np.broadcast_arrays(
        mu, lr, interval, window, offset, e0, k, noise, river_noise
    )
    require("k", k, k >= window - 1 + offset, "be >= window - 1 + offset (both windows inside 0..k)")
    check_step_product("lr*river_curvature", lr * mu, allow_zero=False)
    _, W, valley_gain = valley_terms(lr, interval, window, offset, curvatures, noise)
    r = (1.0 - lr * mu) ** interval
    # m_j = e0 (1/K) Σ_{i<K} r^{j−i} = e0 r^{j−K+1} Σ_{i<K} r^i / K: equal to e0 r^j A_K but finite at r = 0.
    mean_window = e0 * geometric_sum(window, r) / window
    m_now = mean_window * r ** (k - window + 1)
    m_before = mean_window * r ** (k - offset - window + 1)
    river_var = lr * river_noise**2 / (mu * (2.0 - lr * mu))
    base = mu / 2 * river_var * window_gain(window, r) + valley_gain
    w_hat = W + mu / 2 * river_var * gain_gap(window, offset, r)
    return mu, m_now, m_before - m_now, base, w_hat


def curved_expected_loss(
    alpha,
    *,
    slope,
    river_curvature,
    lr,
    interval,
    window,
    offset,
    curvatures,
    e0,
    k,
    noise=1.0,
    river_noise=0.0,
):
    """Curved river g(u) = −cu + (μ/2)u²: E L(E_k(α)) − L* for Extra-Merge at checkpoint k (THEORY.md §d).

    (μ/2) m_k²(1 − αδ)² + (μ/2) V_u G_u + Σ_i ω_i G_i + 2Ŵα(1+α), where r = (1−ημ)^s, δ = r^{−d} − 1,
    m_k = e0 r^k A_K (A_K = (1/K)Σ_{j<K} r^{−j}), V_u = ησ_u²/(μ(2−ημ)), G_u = G_K(r), C_u = C_d(K, r),
    Ŵ = W + (μ/2)V_u(G_u − C_u). Checkpoint j is θ_{j·s}, u_0 = u* + e0 + stationary river noise; k is the
    newest checkpoint (k ≥ K−1+d). ``slope`` c only fixes u* = c/μ and does not enter the result.
    Implemented as (μ/2)(m_k − α(m_{k−d} − m_k))², identical to the above and finite at r = 0.
    """
    alpha = as_real("alpha", alpha)
    mu, m_now, dm, base, w_hat = curved_terms(
        slope, river_curvature, lr, interval, window, offset, curvatures, e0, k, noise, river_noise
    )
    return to_output(mu / 2 * (m_now - alpha * dm) ** 2 + base + 2 * w_hat * alpha * (1 + alpha))
