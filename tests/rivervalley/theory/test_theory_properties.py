"""Property tests (hypothesis) for rivervalley.theory: THEORY.md invariants 4–6, the §d'/§d agreement, the
optimality of α* and the strict-improvement condition. Brute force never re-uses the closed forms."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rivervalley import theory

FAST = settings(max_examples=50, deadline=None)

rhos = st.floats(-0.99, 0.99, allow_nan=False)
windows = st.integers(1, 12)
offsets = st.integers(0, 15)
alphas = st.floats(-4.0, 4.0, allow_nan=False)


def brute_cross(K: int, d: int, rho: float) -> float:
    j = np.arange(K)
    return float(np.sum(rho ** np.abs(d + j[None, :] - j[:, None]).astype(float)) / K**2)


def extra_weights(K: int, d: int, alpha: float) -> np.ndarray:
    n = K + d
    now, before = np.zeros(n), np.zeros(n)
    now[n - K :] = 1.0 / K
    before[n - d - K : n - d] = 1.0 / K
    return (1 + alpha) * now - alpha * before


@st.composite
def linear_setups(draw):
    """A stable linear-river setup: η, s, c, σ and 1–4 curvatures with 0 ≤ ηλ < 2."""
    lr = draw(st.floats(0.01, 0.5))
    products = draw(st.lists(st.floats(0.0, 1.95), min_size=1, max_size=4))
    return dict(
        slope=draw(st.floats(0.0, 2.0)),
        lr=lr,
        interval=draw(st.integers(1, 8)),
        curvatures=np.array(products) / lr,
        noise=draw(st.floats(0.1, 2.0)),
    )


# ------------------------------------------------------------------------------------------- invariant 4


@FAST
@given(K=windows, d=offsets, rho=rhos)
def test_closed_forms_equal_brute_force(K, d, rho):
    assert theory.sma_gain(K, rho) == pytest.approx(brute_cross(K, 0, rho), rel=1e-9, abs=1e-12)
    assert theory.sma_cross(K, d, rho) == pytest.approx(brute_cross(K, d, rho), rel=1e-8, abs=1e-12)


@FAST
@given(K=windows, d=offsets, rho=rhos)
def test_gain_bounds(K, d, rho):
    G = theory.sma_gain(K, rho)
    assert 0 < G <= 1 + 1e-12
    assert abs(theory.sma_cross(K, d, rho)) <= G + 1e-12


@FAST
@given(K=windows, rho=st.floats(0.0, 1.0))
def test_gain_non_increasing_in_window_for_nonnegative_rho(K, rho):
    assert theory.sma_gain(K + 1, rho) <= theory.sma_gain(K, rho) + 1e-12


def test_gain_can_increase_with_window_for_negative_rho():
    assert theory.sma_gain(2, -0.9) == pytest.approx(0.05)
    assert theory.sma_gain(3, -0.9) == pytest.approx(0.1133, abs=5e-5)
    assert theory.sma_gain(2, -0.9) < theory.sma_gain(3, -0.9)


@FAST
@given(K=windows, beta=st.floats(0.0, 0.999), omega=st.floats(-np.pi, np.pi))
def test_responses_are_low_pass(K, beta, omega):
    assert theory.sma_response(K, 0.0) == pytest.approx(1.0)
    assert theory.ema_response(beta, 0.0) == pytest.approx(1.0)
    assert theory.sma_response(K, omega) <= 1 + 1e-12
    assert theory.ema_response(beta, omega) <= 1 + 1e-12


@FAST
@given(beta=st.floats(0.0, 0.99), rho=rhos)
def test_ema_gain_bounds(beta, rho):
    assert 0 < theory.ema_gain(beta, rho) <= 1 + 1e-12


# ------------------------------------------------------------------------------------------- invariant 5


@FAST
@given(alpha=alphas, K=windows, d=offsets, rho=rhos)
def test_valley_factor_symmetric_and_smallest_at_minus_half(alpha, K, d, rho):
    f = theory.valley_factor(alpha, K, d, rho)
    assert f == pytest.approx(theory.valley_factor(-1 - alpha, K, d, rho), rel=1e-9, abs=1e-12)
    assert theory.valley_factor(-0.5, K, d, rho) <= f + 1e-12


@FAST
@given(alpha=alphas, K=st.integers(1, 6), d=st.integers(1, 6), rho=rhos)
def test_valley_factor_is_variance_of_extra_weights(alpha, K, d, rho):
    w = extra_weights(K, d, alpha)
    idx = np.arange(K + d)
    gamma = rho ** np.abs(idx[:, None] - idx[None, :]).astype(float)
    assert theory.valley_factor(alpha, K, d, rho) == pytest.approx(w @ gamma @ w, rel=1e-8, abs=1e-12)


# ------------------------------------------------------------------------------------------- invariant 6


@FAST
@given(
    mu_lr=st.floats(0.02, 1.9),
    lr=st.floats(0.01, 0.5),
    s=st.integers(1, 4),
    K=st.integers(1, 5),
    d=st.integers(1, 4),
    e0=st.floats(-5.0, 5.0).filter(lambda e: abs(e) > 1e-3),
    extra_k=st.integers(0, 5),
)
def test_noise_free_curved_river_lands_on_optimum(mu_lr, lr, s, K, d, e0, extra_k):
    r = (1 - mu_lr) ** s
    if abs(r) < 1e-3 or abs(r**-d - 1) < 1e-3:  # δ → 0 or ∞: α = 1/δ is degenerate
        return
    alpha = 1.0 / (r**-d - 1.0)
    kw = dict(
        slope=1.0,
        river_curvature=mu_lr / lr,
        lr=lr,
        interval=s,
        window=K,
        offset=d,
        curvatures=[1.0],
        e0=e0,
        k=K - 1 + d + extra_k,
        noise=0.0,
        river_noise=0.0,
    )
    # brute force: mean river error of E_k from the checkpoint means e0 r^j
    k = kw["k"]
    w = np.zeros(k + 1)
    w[k - K + 1 :] += (1 + alpha) / K
    w[k - d - K + 1 : k - d + 1] -= alpha / K
    scale = np.max(np.abs(w)) * abs(e0)
    assert w @ (e0 * r ** np.arange(k + 1)) == pytest.approx(0.0, abs=1e-9 * scale)
    assert theory.curved_expected_loss(alpha, **kw) == pytest.approx(
        0.0, abs=1e-12 * scale**2 * kw["river_curvature"]
    )
    assert theory.curved_optimal_alpha(**kw) == pytest.approx(alpha, rel=1e-7)


# ------------------------------------------------------------------------------------------- §d and §d'


@FAST
@given(setup=linear_setups(), K=st.integers(1, 8), d=st.integers(0, 8), alpha=alphas)
def test_extrapolation_equals_weight_vector_score(setup, K, d, alpha):
    a = theory.extrapolation_delta_loss(alpha, window=K, offset=d, **setup)
    b = theory.weights_delta_loss(extra_weights(K, d, alpha), **setup)
    assert a == pytest.approx(b, rel=1e-8, abs=1e-10 * (1 + alpha**2) * setup["lr"] * setup["noise"] ** 2)


@FAST
@given(setup=linear_setups(), K=st.integers(1, 8), d=st.integers(1, 8), h=st.floats(0.01, 3.0))
def test_optimal_alpha_minimises(setup, K, d, h):
    kw = dict(window=K, offset=d, **setup)
    a = theory.optimal_alpha(**kw)
    if not np.isfinite(a):  # all valleys flat: ΔL linear in α
        return
    best = theory.extrapolation_delta_loss(a, **kw)
    tol = 1e-12 * (1 + abs(best))
    assert best <= theory.extrapolation_delta_loss(a + h, **kw) + tol
    assert best <= theory.extrapolation_delta_loss(a - h, **kw) + tol


@FAST
@given(setup=linear_setups(), K=st.integers(1, 8), d=st.integers(1, 8))
def test_strict_improvement_condition(setup, K, d):
    """α > 0 beats both M_k (α = 0) and θ_last (ΔL = 0) iff P > 2W and (P − 2W)² > 8W(R − B)."""
    c, lr, s = setup["slope"], setup["lr"], setup["interval"]
    rho = (1 - lr * setup["curvatures"]) ** s
    omega = lr * setup["noise"] ** 2 / (2 * (2 - lr * setup["curvatures"]))
    G = np.array([brute_cross(K, 0, r) for r in rho])
    C = np.array([brute_cross(K, d, r) for r in rho])
    R, P = c**2 * lr * s * (K - 1) / 2, c**2 * lr * s * d
    B, W = float(omega @ (1 - G)), float(omega @ (G - C))
    if W <= 1e-12:
        return
    margin = min(abs(P - 2 * W), abs((P - 2 * W) ** 2 - 8 * W * (R - B)))
    if margin < 1e-9 * (1 + P + W + abs(R - B)) ** 2:  # too close to the boundary to decide numerically
        return
    predicted = P > 2 * W and (P - 2 * W) ** 2 > 8 * W * (R - B)
    grid = np.linspace(1e-6, 60.0, 120001)
    losses = theory.extrapolation_delta_loss(grid, window=K, offset=d, **setup)
    plain = theory.extrapolation_delta_loss(0.0, window=K, offset=d, **setup)
    observed = bool(np.any((losses < plain) & (losses < 0.0)))
    a_star = (P - 2 * W) / (4 * W)
    if predicted and a_star > 60:  # minimiser beyond the grid: check it directly
        observed = theory.extrapolation_delta_loss(a_star, window=K, offset=d, **setup) < min(plain, 0.0)
    assert predicted == observed


@FAST
@given(setup=linear_setups(), n=st.integers(2, 7), data=st.data())
def test_optimal_weights_beat_random_affine_perturbations(setup, n, data):
    rho = (1 - setup["lr"] * setup["curvatures"]) ** setup["interval"]
    assume(np.min(np.abs(rho)) < 0.999)  # otherwise Q is (nearly) singular and optimal_weights refuses
    w = theory.optimal_weights(n=n, **setup)
    assert w.sum() == pytest.approx(1.0, abs=1e-9)
    step = np.array(data.draw(st.lists(st.floats(-1.0, 1.0), min_size=n, max_size=n)))
    step -= step.mean()
    scale = data.draw(st.sampled_from([1e-3, 0.1, 1.0]))
    best = theory.weights_delta_loss(w, **setup)
    assert best <= theory.weights_delta_loss(w + scale * step, **setup) + 1e-9 * (1 + abs(best))


# ------------------------------------------------------------------------------------------- §e, §f


@FAST
@given(setup=linear_setups(), K=st.integers(1, 8), n=st.integers(2, 8))
def test_rank1_fraction_bounds(setup, K, n):
    setup["curvatures"] = np.maximum(setup["curvatures"], 1e-3)
    approx, lower = theory.rank1_fraction(window=K, n=n, **setup)
    assert 0.0 <= lower <= approx + 1e-12
    assert approx <= 1.0 + 1e-12


@FAST
@given(x=st.floats(0.0, 200.0))
def test_decay_and_average_gains_in_unit_interval(x):
    for gain in (theory.decay_gain(x), theory.average_gain(x)):
        assert 0.0 < gain <= 1.0 + 1e-15
    if x < 1e-2:  # they agree to first order in x
        assert theory.decay_gain(x) == pytest.approx(theory.average_gain(x), abs=x**2)
