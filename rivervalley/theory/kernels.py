"""Numerically careful kernels of the closed forms: window sums S_d, SMA gains G_K, cross terms C_d and their
differences near ρ = 1 (THEORY.md §b), and the valley terms of §d; inputs are already validated and broadcast.
"""

from __future__ import annotations

import math

import numpy as np

from rivervalley.checks import check_step_product

__all__ = [
    "geometric_sum",
    "window_gain",
    "window_cross",
    "gain_deficit",
    "gain_gap",
    "valley_terms",
    "lag_matrix",
]

# Near ρ = 1 the closed forms for S_d (and 1 − G, G − C_d) cancel catastrophically; below this value of
# (K + d)(1 − ρ) their exact expansion in ε = 1 − ρ is used instead (terms shrink like ((K+d)ε)^m/m!, so
# _SERIES_TERMS terms leave a truncation error far below rounding).
_SERIES_BELOW = 0.05
_SERIES_TERMS = 10


def geometric_sum(n, rho):
    """Σ_{j<n} ρ^j = (1 − ρ^n)/(1 − ρ); expm1/log keep full relative accuracy as ρ → 1, and it is n at 1."""
    n, rho = np.broadcast_arrays(np.asarray(n, float), np.asarray(rho, float))
    near_one = rho > 0.5
    with np.errstate(all="ignore"):
        direct = (1.0 - rho**n) / (1.0 - rho)
        stable = -np.expm1(n * np.log(np.where(near_one, rho, 1.0))) / (1.0 - rho)
    out = np.where(near_one, stable, direct)
    return np.where(rho == 1.0, n, out)


def _falling_binomial(x, k: int):
    """The polynomial C(x, k) = x(x−1)…(x−k+1)/k!, which is the binomial coefficient for integer x ≥ 0."""
    out = np.ones_like(x, dtype=float)
    for i in range(k):
        out = out * (x - i)
    return out / math.factorial(k)


def _moment(K, d, m: int):
    """M_m(K, d) = Σ_{j,l<K} C(|d+l−j|, m) for m ≥ 1, from Σ_{h<x}(x−h)C(h, m) = C(x+1, m+2):

    M_m = C(d+K+1, m+2) − 2C(d+1, m+2) + [d ≥ K] C(d−K+1, m+2) + [d ≤ K] C(K−d+1, m+2).
    """
    beyond = np.where(d >= K, _falling_binomial(d - K + 1, m + 2), 0.0)
    within = np.where(d <= K, _falling_binomial(K - d + 1, m + 2), 0.0)
    return _falling_binomial(d + K + 1, m + 2) - 2 * _falling_binomial(d + 1, m + 2) + beyond + within


def _series(K, d, eps, d_ref=None):
    """Σ_{m≥1} (−ε)^m M_m(K, d) = S_d − K² (or, with d_ref, S_{d_ref} − S_d), the exact expansion of
    S_d in ε = 1 − ρ obtained from ρ^h = Σ_m C(h, m)(−ε)^m; the moment differences are taken term by term
    so that nothing cancels."""
    total = np.zeros_like(eps)
    for m in range(1, _SERIES_TERMS + 1):
        moment = _moment(K, d, m) if d_ref is None else _moment(K, d_ref, m) - _moment(K, d, m)
        total = total + (-eps) ** m * moment
    return total


def _window_sum(K, d, rho):
    """S_d = Σ_{j,l=0}^{K−1} ρ^{|d+l−j|}, so that G_K = S_0/K² and C_d = S_d/K² (THEORY.md §b).

    d ≥ K−1: S_d = ρ^{d−K+1}(Σ_{j<K} ρ^j)²; otherwise the overlapping closed form of §b; for
    (K+d)(1−ρ) small, where that cancels, S_d = K² + Σ_{m≥1} (−ε)^m M_m(K, d).
    """
    K, d, rho = np.broadcast_arrays(*(np.asarray(a, float) for a in (K, d, rho)))
    eps = 1.0 - rho
    with np.errstate(all="ignore"):
        disjoint = rho ** (d - K + 1) * geometric_sum(K, rho) ** 2
        overlap = ((K - d) * (1 + rho) - 2 * rho ** (d + 1) * geometric_sum(K - d, rho)) / eps + rho ** (
            K - d + 1
        ) * geometric_sum(d, rho) ** 2
        series = K**2 + _series(K, d, eps)
    closed = np.where(d >= K - 1, disjoint, overlap)
    return np.where(_near_one(K, d, eps), series, closed)


def _near_one(K, d, eps):
    return (K + d) * eps < _SERIES_BELOW


def window_gain(window, rho):
    """G_K(ρ) = S_0/K²."""
    return _window_sum(window, 0.0, rho) / np.asarray(window, float) ** 2


def window_cross(window, offset, rho):
    """C_d(K, ρ) = S_d/K²."""
    return _window_sum(window, offset, rho) / np.asarray(window, float) ** 2


def gain_deficit(window, rho):
    """1 − G_K(ρ), accurate also where G_K ≈ 1 (ρ → 1)."""
    K, rho = np.broadcast_arrays(np.asarray(window, float), np.asarray(rho, float))
    eps = 1.0 - rho
    with np.errstate(all="ignore"):
        series = -_series(K, np.zeros_like(K), eps) / K**2
    return np.where(_near_one(K, 0.0, eps), series, 1.0 - window_gain(K, rho))


def gain_gap(window, offset, rho):
    """G_K − C_d ≥ 0 (for ρ ≥ 0), accurate also where both are ≈ 1 (ρ → 1)."""
    K, d, rho = np.broadcast_arrays(*(np.asarray(a, float) for a in (window, offset, rho)))
    eps = 1.0 - rho
    with np.errstate(all="ignore"):
        series = _series(K, d, eps, d_ref=np.zeros_like(d)) / K**2
    return np.where(_near_one(K, d, eps), series, window_gain(K, rho) - window_cross(K, d, rho))


def valley_terms(lr, interval, window, offset, curvatures, noise):
    """B = Σ ω_i (1 − G_i) and W = Σ ω_i (G_i − C_{d,i}) of THEORY.md §d (also Σ ω_i G_i), broadcast.

    ω_i = λ_i V_i / 2 = ησ²/(2(2 − ηλ_i)) stays finite at λ_i = 0, where ρ_i = 1 makes both terms vanish.
    """
    lr, interval, window, offset, noise = (a[..., None] for a in (lr, interval, window, offset, noise))
    check_step_product("lr*curvatures", lr * curvatures, allow_zero=True)
    rho = (1.0 - lr * curvatures) ** interval
    omega = lr * noise**2 / (2.0 * (2.0 - lr * curvatures))
    return (
        np.sum(omega * gain_deficit(window, rho), axis=-1),
        np.sum(omega * gain_gap(window, offset, rho), axis=-1),
        np.sum(omega * window_gain(window, rho), axis=-1),
    )


def lag_matrix(n: int) -> np.ndarray:
    """|j − l| for j, l < n, as floats."""
    return np.abs(np.subtract.outer(np.arange(n), np.arange(n))).astype(float)
