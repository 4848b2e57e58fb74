"""Closed forms of the river-valley theory (THEORY.md §a–§f), in numpy.

Model (THEORY.md, "The toy model"): L(u, v) = g(u) + ½ Σ_i λ_i v_i², SGD with constant learning rate η and
additive Gaussian gradient noise σ, checkpoints every s steps. Per valley coordinate the checkpoint-level
AR(1) coefficient is ρ = (1 − ηλ)^s, the river drift per checkpoint D = η c s and the expected valley loss of
the last iterate ω = λV/2 = ησ² / (2(2 − ηλ)).

Every function validates its input (ValueError naming the parameter and its allowed range), broadcasts
over array arguments where that makes sense, and returns a Python float for scalar input. The identities
are re-derived in :mod:`rivervalley.symbolic` and checked against brute-force sums in the tests.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import linalg, special

from rivervalley import weights as _weights

__all__ = [
    "stationary_variance",
    "sma_gain",
    "sma_cross",
    "ema_gain",
    "sma_response",
    "ema_response",
    "sma_lag",
    "ema_lag",
    "valley_factor",
    "extrapolation_delta_loss",
    "optimal_alpha",
    "weights_delta_loss",
    "optimal_weights",
    "rank1_fraction",
    "curved_expected_loss",
    "curved_optimal_alpha",
    "curved_weights_delta_loss",
    "decay_gain",
    "average_gain",
    "decay_average_advance",
]

# Near ρ = 1 the closed forms for S_d (and 1 − G, G − C_d) cancel catastrophically; below this value of
# (K + d)(1 − ρ) their exact expansion in ε = 1 − ρ is used instead (terms shrink like ((K+d)ε)^m/m!, so
# _SERIES_TERMS terms leave a truncation error far below rounding).
_SERIES_BELOW = 0.05
_SERIES_TERMS = 10


# ---------------------------------------------------------------------------------------------------------
# validation helpers


def _fmt(value) -> str:
    return f"{float(value):g}"


def _real(name: str, value) -> np.ndarray:
    """Float array of ``value``; NaN or ±inf raise a ValueError naming ``name``."""
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a real number or array of real numbers, got {value!r}") from exc
    if np.isnan(arr).any():
        raise ValueError(f"{name} must not be NaN")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, got {_fmt(arr[~np.isfinite(arr)].flat[0])}")
    return arr


def _require(name: str, arr: np.ndarray, ok, rule: str) -> np.ndarray:
    ok = np.broadcast_to(ok, arr.shape)
    if not ok.all():
        raise ValueError(f"{name} must {rule}, got {_fmt(arr[~ok].flat[0])}")
    return arr


def _positive(name: str, value) -> np.ndarray:
    arr = _real(name, value)
    return _require(name, arr, arr > 0, "be > 0")


def _nonnegative(name: str, value) -> np.ndarray:
    arr = _real(name, value)
    return _require(name, arr, arr >= 0, "be >= 0")


def _integer(name: str, value, minimum: int) -> np.ndarray:
    arr = _real(name, value)
    return _require(name, arr, (arr == np.round(arr)) & (arr >= minimum), f"be an integer >= {minimum}")


def _rho(value) -> np.ndarray:
    arr = _real("rho", value)
    return _require("rho", arr, np.abs(arr) <= 1, "lie in [-1, 1]")


def _decay(value) -> np.ndarray:
    arr = _real("decay", value)
    return _require("decay", arr, (arr >= 0) & (arr < 1), "lie in [0, 1)")


def _curvatures(value) -> np.ndarray:
    arr = np.atleast_1d(_real("curvatures", value))
    if arr.ndim != 1:
        raise ValueError(f"curvatures must be a scalar or a 1-D array, got shape {arr.shape}")
    return _require(
        "curvatures",
        arr,
        arr >= 0,
        "be >= 0 (negative curvature has no stationary valley; model it as the river instead)",
    )


def _step_product(name: str, product: np.ndarray, allow_zero: bool) -> None:
    """ηλ must keep SGD stable: (0, 2) for a stationary result, [0, 2) where λ = 0 only drops out."""
    low_ok = product >= 0 if allow_zero else product > 0
    interval = "[0, 2)" if allow_zero else "(0, 2)"
    _require(name, product, low_ok & (product < 2), f"lie in {interval} for a stationary result")


def _scalar(name: str, arr: np.ndarray) -> float:
    if arr.ndim != 0:
        raise ValueError(f"{name} must be a scalar here, got shape {arr.shape}")
    return float(arr)


def _out(arr):
    arr = np.asarray(arr, dtype=float)
    return float(arr) if arr.ndim == 0 else arr


# ---------------------------------------------------------------------------------------------------------
# numerically careful kernels (inputs already validated and broadcast)


def _geometric(n, rho):
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
        disjoint = rho ** (d - K + 1) * _geometric(K, rho) ** 2
        overlap = ((K - d) * (1 + rho) - 2 * rho ** (d + 1) * _geometric(K - d, rho)) / eps + rho ** (
            K - d + 1
        ) * _geometric(d, rho) ** 2
        series = K**2 + _series(K, d, eps)
    closed = np.where(d >= K - 1, disjoint, overlap)
    return np.where(_near_one(K, d, eps), series, closed)


def _near_one(K, d, eps):
    return (K + d) * eps < _SERIES_BELOW


def _gain(window, rho):
    """G_K(ρ) = S_0/K²."""
    return _window_sum(window, 0.0, rho) / np.asarray(window, float) ** 2


def _cross(window, offset, rho):
    """C_d(K, ρ) = S_d/K²."""
    return _window_sum(window, offset, rho) / np.asarray(window, float) ** 2


def _gain_deficit(window, rho):
    """1 − G_K(ρ), accurate also where G_K ≈ 1 (ρ → 1)."""
    K, rho = np.broadcast_arrays(np.asarray(window, float), np.asarray(rho, float))
    eps = 1.0 - rho
    with np.errstate(all="ignore"):
        series = -_series(K, np.zeros_like(K), eps) / K**2
    return np.where(_near_one(K, 0.0, eps), series, 1.0 - _gain(K, rho))


def _gain_gap(window, offset, rho):
    """G_K − C_d ≥ 0 (for ρ ≥ 0), accurate also where both are ≈ 1 (ρ → 1)."""
    K, d, rho = np.broadcast_arrays(*(np.asarray(a, float) for a in (window, offset, rho)))
    eps = 1.0 - rho
    with np.errstate(all="ignore"):
        series = _series(K, d, eps, d_ref=np.zeros_like(d)) / K**2
    return np.where(_near_one(K, d, eps), series, _gain(K, rho) - _cross(K, d, rho))


def _valley_terms(lr, interval, window, offset, curvatures, noise):
    """B = Σ ω_i (1 − G_i) and W = Σ ω_i (G_i − C_{d,i}) of THEORY.md §d (also Σ ω_i G_i), broadcast.

    ω_i = λ_i V_i / 2 = ησ²/(2(2 − ηλ_i)) stays finite at λ_i = 0, where ρ_i = 1 makes both terms vanish.
    """
    lr, interval, window, offset, noise = (a[..., None] for a in (lr, interval, window, offset, noise))
    _step_product("lr*curvatures", lr * curvatures, allow_zero=True)
    rho = (1.0 - lr * curvatures) ** interval
    omega = lr * noise**2 / (2.0 * (2.0 - lr * curvatures))
    return (
        np.sum(omega * _gain_deficit(window, rho), axis=-1),
        np.sum(omega * _gain_gap(window, offset, rho), axis=-1),
        np.sum(omega * _gain(window, rho), axis=-1),
    )


def _linear_river_terms(slope, lr, interval, window, offset, curvatures, noise):
    """R, P, B, W of THEORY.md §d, validated and broadcast over all scalar arguments."""
    slope = _real("slope", slope)
    lr = _positive("lr", lr)
    interval = _integer("interval", interval, 1)
    window = _integer("window", window, 1)
    offset = _integer("offset", offset, 0)
    noise = _nonnegative("noise", noise)
    curvatures = _curvatures(curvatures)
    slope, lr, interval, window, offset, noise = np.broadcast_arrays(
        slope, lr, interval, window, offset, noise
    )
    push = slope**2 * lr * interval  # c·D = c²ηs
    B, W, _ = _valley_terms(lr, interval, window, offset, curvatures, noise)
    return push * (window - 1) / 2.0, push * offset, B, W


# ---------------------------------------------------------------------------------------------------------
# §a, §b: stationary noise and merging as a low-pass filter


def stationary_variance(lr, curvature, noise=1.0):
    """Stationary valley variance V = η σ² / (λ (2 − ηλ))  (THEORY.md §a); needs 0 < ηλ < 2."""
    lr = _positive("lr", lr)
    curvature = _real("curvature", curvature)
    noise = _nonnegative("noise", noise)
    _step_product("lr*curvature", lr * curvature, allow_zero=False)
    return _out(lr * noise**2 / (curvature * (2.0 - lr * curvature)))


def sma_gain(window, rho):
    """Valley variance gain of a K-checkpoint uniform average (SMA), THEORY.md §b.

    G_K(ρ) = (1/K²) Σ_{j,l<K} ρ^{|j−l|} = (1+ρ)/(K(1−ρ)) − 2ρ(1−ρ^K)/(K²(1−ρ)²),
    with G_1 = 1, G_K(0) = 1/K and the limit G_K(1) = 1 (evaluated without cancellation near ρ = 1).
    """
    window = _integer("window", window, 1)
    return _out(_gain(window, _rho(rho)))


def sma_cross(window, offset, rho):
    """C_d = S_d/K²: correlation (in units of V) of two K-windows whose ends are d checkpoints apart (§b).

    0 ≤ d ≤ K:  S_d = (K−d)(1+ρ)/(1−ρ) + [ρ^{K−d+1}(1−ρ^d)² − 2ρ^{d+1}(1−ρ^{K−d})]/(1−ρ)²
    d ≥ K−1:    S_d = ρ^{d−K+1}(1−ρ^K)²/(1−ρ)²;      C_0 = G_K, and C_d(1) = 1.
    """
    window = _integer("window", window, 1)
    offset = _integer("offset", offset, 0)
    return _out(_cross(window, offset, _rho(rho)))


def ema_gain(decay, rho):
    """Valley variance gain of a stationary EMA m_k = β m_{k−1} + (1−β) θ^(k)  (THEORY.md §b).

    G_EMA = (1−β)(1+βρ) / ((1+β)(1−βρ)).
    """
    beta, rho = _decay(decay), _rho(rho)
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = (1 - beta) * (1 + beta * rho) / ((1 + beta) * (1 - beta * rho))
    return _out(gain)


def sma_response(window, omega):
    """|H_SMA(ω)| = |sin(Kω/2) / (K sin(ω/2))|, ω in radians per checkpoint (§b); 1 where sin(ω/2) = 0."""
    window = _integer("window", window, 1)
    omega = _real("omega", omega)
    half = np.sin(omega / 2.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.abs(np.sin(window * omega / 2.0) / (window * half))
    return _out(np.where(half == 0.0, 1.0, ratio))


def ema_response(decay, omega):
    """|H_EMA(ω)| = (1−β) / √(1 − 2β cos ω + β²)  (THEORY.md §b).

    The denominator is evaluated as (1−β)² + 4β sin²(ω/2), the same quantity without the cancellation of
    1 − 2β cos ω + β² at β → 1, ω → 0 (which let |H| exceed 1 by ~1e-11).
    """
    beta, omega = _decay(decay), _real("omega", omega)
    return _out((1 - beta) / np.sqrt((1 - beta) ** 2 + 4 * beta * np.sin(omega / 2.0) ** 2))


# ---------------------------------------------------------------------------------------------------------
# §c, §d: lag along the river and Extra-Merge


def sma_lag(window, drift):
    """Distance an SMA of K checkpoints trails the newest one along the river: D(K−1)/2  (§c)."""
    return _out(_real("drift", drift) * (_integer("window", window, 1) - 1) / 2.0)


def ema_lag(decay, drift):
    """Distance a stationary EMA with decay β trails the newest checkpoint: D β/(1−β)  (§c)."""
    beta = _decay(decay)
    return _out(_real("drift", drift) * beta / (1 - beta))


def valley_factor(alpha, window, offset, rho):
    """Var[(1+α) v̄_k − α v̄_{k−d}] / V = G + 2(G − C_d) α(1+α)  (THEORY.md §d).

    Symmetric under α ↔ −1 − α and smallest at α = −½.
    """
    alpha = _real("alpha", alpha)
    window, offset = _integer("window", window, 1), _integer("offset", offset, 0)
    rho = _rho(rho)
    return _out(_gain(window, rho) + 2 * _gain_gap(window, offset, rho) * alpha * (1 + alpha))


def extrapolation_delta_loss(alpha, *, slope, lr, interval, window, offset, curvatures, noise=1.0):
    """Linear river: E L(E_k(α)) − E L(θ_last) for Extra-Merge E_k = M_k + α(M_k − M_{k−d})  (§d).

    ΔL(α) = R − Pα − B + 2Wα(1+α), with R = c²ηs(K−1)/2, P = c²ηs·d, B = Σ_i ω_i(1 − G_i),
    W = Σ_i ω_i(G_i − C_{d,i}), ρ_i = (1 − ηλ_i)^s and ω_i = λ_i V_i/2. Broadcasts over every argument
    except ``curvatures``, the 1-D array of valley curvatures λ_i that is summed over.
    """
    alpha = _real("alpha", alpha)
    R, P, B, W = _linear_river_terms(slope, lr, interval, window, offset, curvatures, noise)
    return _out(R - P * alpha - B + 2 * W * alpha * (1 + alpha))


def optimal_alpha(*, slope, lr, interval, window, offset, curvatures, noise=1.0):
    """Minimiser of the §d quadratic: α* = (P − 2W)/(4W)  (THEORY.md §d).

    Where W = 0 (no valley noise, d = 0 or only flat valleys) ΔL is linear in α: returns +inf if P > 0
    and NaN if P = 0 (every α gives the same loss).
    """
    _, P, _, W = _linear_river_terms(slope, lr, interval, window, offset, curvatures, noise)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = (P - 2 * W) / (4 * W)
    return _out(np.where(W > 0, alpha, np.where(P > 0, np.inf, np.nan)))


# ---------------------------------------------------------------------------------------------------------
# §d': every merge is a weight vector


def _weights_setup(slope, lr, interval, curvatures, noise):
    slope = _scalar("slope", _real("slope", slope))
    lr = _scalar("lr", _positive("lr", lr))
    interval = _scalar("interval", _integer("interval", interval, 1))
    curvatures = _curvatures(curvatures)
    noise = _nonnegative("noise", noise)  # one σ for all directions, or one per curvature
    if noise.ndim > 1 or (noise.ndim == 1 and noise.shape != curvatures.shape):
        raise ValueError(
            f"noise must be a scalar or one value per curvature ({curvatures.size}), got shape {noise.shape}"
        )
    _step_product("lr*curvatures", lr * curvatures, allow_zero=True)
    rho = (1.0 - lr * curvatures) ** interval
    omega = lr * noise**2 / (2.0 * (2.0 - lr * curvatures))
    return slope**2 * lr * interval, rho, omega


def _lags(n: int) -> np.ndarray:
    return np.abs(np.subtract.outer(np.arange(n), np.arange(n))).astype(float)


def _decorrelation_matrices(rho, n: int) -> np.ndarray:
    """11ᵀ − Γ_i, i.e. 1 − ρ_i^{|j−l|}, computed with expm1 so that it stays accurate as ρ_i → 1."""
    rho, lags = rho[:, None, None], _lags(n)[None]
    near_one = rho > 0.5
    with np.errstate(all="ignore"):
        stable = -np.expm1(lags * np.log(np.where(near_one, rho, 1.0)))
    return np.where(near_one, stable, 1.0 - rho**lags)


def _affine_weights(weights) -> np.ndarray:
    """Weight vectors [..., N] (N >= 1), each summing to 1 (an affine merge), as a float array."""
    w = _real("weights", weights)
    if w.ndim == 0 or w.shape[-1] == 0:
        raise ValueError(f"weights must have shape (..., N) with N >= 1, got shape {w.shape}")
    total = w.sum(axis=-1)
    bad = np.abs(total - 1.0) > 1e-8 * np.maximum(1.0, np.abs(w).sum(axis=-1))
    if bad.any():
        raise ValueError(f"weights must sum to 1 (an affine merge), got sum {_fmt(total[bad].flat[0])}")
    return w


def weights_delta_loss(weights, *, slope, lr, interval, curvatures, noise=1.0):
    """Linear-river loss of any affine merge Σ_j w_j θ^(j), relative to the newest checkpoint (§d').

    ΔL(w) = c²ηs · lag(w) − Σ_i ω_i (1 − wᵀΓ_i w),  lag(w) = N − tᵀw,  t = (1..N),  Γ_i[j,l] = ρ_i^{|j−l|}.
    ``weights`` is a vector over checkpoints 1..N (last entry = newest) or a batch of shape (..., N); each
    must sum to 1. ``slope``, ``lr`` and ``interval`` are scalars here; ``noise`` is a scalar or one σ_i per
    curvature (a valley whose directions see different gradient noise).
    """
    w = _affine_weights(weights)
    push, rho, omega = _weights_setup(slope, lr, interval, curvatures, noise)
    n = w.shape[-1]
    lag = n - w @ np.arange(1, n + 1, dtype=float)
    # 1 − wᵀΓ_i w = wᵀ(11ᵀ − Γ_i)w for affine w; the right side does not cancel when Γ_i ≈ 11ᵀ (ρ_i → 1).
    deficit = np.einsum("...j,ijl,...l->...i", w, _decorrelation_matrices(rho, n), w)
    return _out(push * lag - np.sum(omega * deficit, axis=-1))


def optimal_weights(*, n, slope, lr, interval, curvatures, noise=1.0):
    """Theory-optimal affine merge of N checkpoints for the linear river (THEORY.md §d').

    Minimises ΔL(w) = c²ηs(N − tᵀw) − Σω_i + wᵀQw, Q = Σ_i ω_i Γ_i, subject to 1ᵀw = 1. The Lagrange
    condition −c²ηs·t + 2Qw − ν1 = 0 gives w = Q⁻¹(c²ηs·t + ν1)/2 with
    ν = (2 − c²ηs·1ᵀQ⁻¹t) / (1ᵀQ⁻¹1). Needs Q positive definite (noise > 0 and some |ρ_i| < 1);
    a ValueError says so when Q is singular or ill-conditioned to working precision.
    """
    n = int(_scalar("n", _integer("n", n, 1)))
    push, rho, omega = _weights_setup(slope, lr, interval, curvatures, noise)
    Q = np.einsum("i,ijl->jl", omega, _weights.correlation_matrix(rho, n))
    rhs = np.stack([np.arange(1, n + 1, dtype=float), np.ones(n)], axis=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", linalg.LinAlgWarning)
            solved = linalg.solve(Q, rhs, assume_a="pos")
    except (linalg.LinAlgError, linalg.LinAlgWarning, ValueError) as exc:
        raise ValueError(
            "optimal_weights needs noise > 0 and at least one curvature with (1 - lr*curvature)**interval "
            "clearly inside (-1, 1); otherwise Q = Σ ω_i Γ_i is singular to working precision and the loss "
            "has no finite minimiser"
        ) from exc
    q_t, q_1 = solved[:, 0], solved[:, 1]
    nu = (2.0 - push * q_t.sum()) / q_1.sum()
    return (push * q_t + nu * q_1) / 2.0


# ---------------------------------------------------------------------------------------------------------
# §e: rank-1 structure of merged checkpoints


def rank1_fraction(*, slope, lr, interval, window, curvatures, n, noise=1.0):
    """Predicted share of variance on PC1 of n consecutive SMA-merged checkpoints (THEORY.md §e).

    S = D² n(n²−1)/12 (D = ηcs), N_i = V_i tr(HΓ̃_i), N∥_i = V_i τᵀΓ̃_iτ/|τ|², Γ̃_i[j,l] = C_{|j−l|}(K, ρ_i),
    H = I − 11ᵀ/n, τ_j = j − (n+1)/2. Returns (approx, lower_bound) with
    approx = (S + ΣN∥)/(S + ΣN) and the rigorous lower bound E FVE_1 ≥ S/(S + ΣN). window = 1 means raw
    checkpoints. NaN when S + ΣN = 0 (no drift and no noise).
    """
    n = int(_scalar("n", _integer("n", n, 2)))
    window = int(_scalar("window", _integer("window", window, 1)))
    slope = _scalar("slope", _real("slope", slope))
    lr = _scalar("lr", _positive("lr", lr))
    interval = _scalar("interval", _integer("interval", interval, 1))
    noise = _scalar("noise", _nonnegative("noise", noise))
    curvatures = _curvatures(curvatures)
    _step_product("lr*curvatures", lr * curvatures, allow_zero=False)
    rho = (1.0 - lr * curvatures) ** interval
    variance = lr * noise**2 / (curvatures * (2.0 - lr * curvatures))
    lags = _lags(n)
    # H1 = 0 and τᵀ1 = 0, so Γ̃ may be replaced by Γ̃ − G·11ᵀ = −Δ, Δ[j,l] = G − C_{|j−l|}: this keeps full
    # relative accuracy where ρ → 1 makes every entry of Γ̃ ≈ 1.
    gap = _gain_gap(window, lags[None, :, :], rho[:, None, None])  # Δ, shape (m, n, n)
    tau = np.arange(1, n + 1) - (n + 1) / 2.0
    centred_trace = gap.sum(axis=(1, 2)) / n  # tr(HΓ̃) = −tr(Δ) + 1ᵀΔ1/n and diag Δ = 0
    aligned = -np.einsum("j,ijl,l->i", tau, gap, tau) / (tau @ tau)
    signal = (lr * slope * interval) ** 2 * n * (n**2 - 1) / 12.0
    noise_total = float(np.sum(variance * centred_trace))
    aligned_total = float(np.sum(variance * aligned))
    with np.errstate(divide="ignore", invalid="ignore"):
        denominator = np.float64(signal + noise_total)
        return float((signal + aligned_total) / denominator), float(signal / denominator)


# ---------------------------------------------------------------------------------------------------------
# §d, curved river


def _curved_terms(
    slope, river_curvature, lr, interval, window, offset, curvatures, e0, k, noise, river_noise
):
    """Returns (μ, m_k, Δm = m_{k−d} − m_k, river+valley variance at α = 0, Ŵ), broadcast."""
    _real("slope", slope)  # only sets u* = c/μ; the loss above L* does not depend on it
    mu = _positive("river_curvature", river_curvature)
    lr = _positive("lr", lr)
    interval = _integer("interval", interval, 1)
    window = _integer("window", window, 1)
    offset = _integer("offset", offset, 0)
    e0 = _real("e0", e0)
    k = _integer("k", k, 0)
    noise = _nonnegative("noise", noise)
    river_noise = _nonnegative("river_noise", river_noise)
    curvatures = _curvatures(curvatures)
    mu, lr, interval, window, offset, e0, k, noise, river_noise = np.broadcast_arrays(
        mu, lr, interval, window, offset, e0, k, noise, river_noise
    )
    _require("k", k, k >= window - 1 + offset, "be >= window - 1 + offset (both windows inside 0..k)")
    _step_product("lr*river_curvature", lr * mu, allow_zero=False)
    _, W, valley_gain = _valley_terms(lr, interval, window, offset, curvatures, noise)
    r = (1.0 - lr * mu) ** interval
    # m_j = e0 (1/K) Σ_{i<K} r^{j−i} = e0 r^{j−K+1} Σ_{i<K} r^i / K: equal to e0 r^j A_K but finite at r = 0.
    mean_window = e0 * _geometric(window, r) / window
    m_now = mean_window * r ** (k - window + 1)
    m_before = mean_window * r ** (k - offset - window + 1)
    river_var = lr * river_noise**2 / (mu * (2.0 - lr * mu))
    base = mu / 2 * river_var * _gain(window, r) + valley_gain
    w_hat = W + mu / 2 * river_var * _gain_gap(window, offset, r)
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
    alpha = _real("alpha", alpha)
    mu, m_now, dm, base, w_hat = _curved_terms(
        slope, river_curvature, lr, interval, window, offset, curvatures, e0, k, noise, river_noise
    )
    return _out(mu / 2 * (m_now - alpha * dm) ** 2 + base + 2 * w_hat * alpha * (1 + alpha))


def curved_optimal_alpha(
    *, slope, river_curvature, lr, interval, window, offset, curvatures, e0, k, noise=1.0, river_noise=0.0
):
    """Minimiser of :func:`curved_expected_loss`: α* = (μ m_k² δ − 2Ŵ)/(μ m_k² δ² + 4Ŵ)  (THEORY.md §d).

    Noise-free (Ŵ = 0) it is α* = 1/δ = 1/(r^{−d} − 1), which lands exactly on u*. NaN where the loss does
    not depend on α (Ŵ = 0 and m_k δ = 0).
    """
    mu, m_now, dm, _, w_hat = _curved_terms(
        slope, river_curvature, lr, interval, window, offset, curvatures, e0, k, noise, river_noise
    )
    denominator = mu * dm**2 + 4 * w_hat
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = (mu * m_now * dm - 2 * w_hat) / denominator
    return _out(np.where(denominator > 0, alpha, np.nan))


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
    mu = _scalar("river_curvature", _positive("river_curvature", river_curvature))
    e0 = _scalar("e0", _real("e0", e0))
    start = int(_scalar("start", _integer("start", start, 0)))
    river_noise = _scalar("river_noise", _nonnegative("river_noise", river_noise))
    _, rho, omega = _weights_setup(0.0, lr, interval, curvatures, noise)
    lr, interval = float(lr), int(interval)
    _step_product("lr*river_curvature", np.asarray(lr * mu), allow_zero=False)
    n = w.shape[-1]
    r = (1.0 - lr * mu) ** interval
    path = e0 * r ** np.arange(start, start + n, dtype=float)  # E[u^(j)] − u*
    river_var = lr * river_noise**2 / (mu * (2.0 - lr * mu))
    gammas = _decorrelation_matrices(np.append(rho, r), n)  # 11ᵀ − Γ, accurate as ρ → 1
    deficit = np.einsum("...j,ijl,...l->...i", w, gammas, w)
    scale = np.append(omega, mu / 2 * river_var)
    mean_term = mu / 2 * ((w @ path) ** 2 - path[-1] ** 2)
    return _out(mean_term - np.sum(scale * deficit, axis=-1))


# ---------------------------------------------------------------------------------------------------------
# §f: averaging versus learning-rate decay


def decay_gain(x):
    """Valley variance left by a linear LR decay to zero over T_d steps, x = ληT_d  (THEORY.md §f).

    G_dec(x) = ½ √(π/x) erf(√x) = Σ_n (−x)^n / (n!(2n+1)) ≈ 0.886/√x; G_dec(0) = 1.
    """
    x = _nonnegative("x", x)
    small = x < 1e-3
    with np.errstate(all="ignore"):
        closed = 0.5 * np.sqrt(np.pi / x) * special.erf(np.sqrt(x))
    series = sum((-x) ** j / (math.factorial(j) * (2 * j + 1)) for j in range(6))
    return _out(np.where(small, series, closed))


def average_gain(x):
    """Valley variance gain of a dense uniform average over T steps, x = ληT  (THEORY.md §f).

    G_avg(x) = 2(x − 1 + e^{−x})/x² = 2 Σ_{m≥0} (−x)^m/(m+2)! ≈ 2/x; G_avg(0) = 1.
    """
    x = _nonnegative("x", x)
    small = x < 0.1
    with np.errstate(all="ignore"):
        closed = 2.0 * (x + np.expm1(-x)) / x**2
    series = 2.0 * sum((-x) ** m / math.factorial(m + 2) for m in range(12))
    return _out(np.where(small, series, closed))


def decay_average_advance(lr, slope, steps):
    """River progress of a linear decay over T steps, equal to the lag of a T-step average: ηc(T+1)/2 (§f)."""
    lr, slope = _positive("lr", lr), _real("slope", slope)
    return _out(lr * slope * (_integer("steps", steps, 1) + 1) / 2.0)
