"""rivervalley.theory against independent brute force: explicit sums, quadrature, exact recursions and a
small vectorised SGD simulation. None of these re-use the closed forms under test."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
from scipy import integrate

from rivervalley import theory

# ---------------------------------------------------------------------------------------------- brute force


def brute_cross(K: int, d: int, rho: float) -> float:
    """(1/K²) Σ_{j,l<K} ρ^{|d+l−j|}: correlation of two K-windows whose ends are d apart."""
    j = np.arange(K)
    lags = np.abs(d + j[None, :] - j[:, None]).astype(float)
    return float(np.sum(rho**lags) / K**2)


def brute_gain(K: int, rho: float) -> float:
    return brute_cross(K, 0, rho)


def extra_weights(K: int, d: int, alpha: float) -> np.ndarray:
    """(1+α)·SMA_K ending at N − α·SMA_K ending at N−d, over N = K + d checkpoints (built inline)."""
    n = K + d
    now, before = np.zeros(n), np.zeros(n)
    now[n - K :] = 1.0 / K
    before[n - d - K : n - d] = 1.0 / K
    return (1 + alpha) * now - alpha * before


def gamma(rho: float, n: int) -> np.ndarray:
    idx = np.arange(n)
    return rho ** np.abs(idx[:, None] - idx[None, :]).astype(float)


LINEAR = dict(slope=0.4, lr=0.05, interval=4, curvatures=np.array([0.3, 2.0, 8.0, 25.0]), noise=1.3)

# ---------------------------------------------------------------------------------------------- §a, §b


@pytest.mark.parametrize("lr,lam,noise", [(0.1, 1.0, 1.0), (0.5, 3.5, 0.3), (1.0, 1.9, 2.0)])
def test_stationary_variance_is_fixed_point_of_sgd_recursion(lr, lam, noise):
    V = theory.stationary_variance(lr, lam, noise)
    assert V == pytest.approx((1 - lr * lam) ** 2 * V + lr**2 * noise**2, rel=1e-12)


def test_stationary_variance_broadcasts():
    out = theory.stationary_variance(np.array([0.1, 0.2]), np.array([[1.0], [2.0]]))
    assert out.shape == (2, 2)
    assert out[1, 0] == pytest.approx(0.1 / (2.0 * (2 - 0.2)))


@pytest.mark.parametrize("rho", [-0.97, -0.5, 0.0, 0.2, 0.7, 0.95, 0.999])
@pytest.mark.parametrize("K", [1, 2, 3, 7, 16])
def test_sma_gain_equals_double_sum(K, rho):
    assert theory.sma_gain(K, rho) == pytest.approx(brute_gain(K, rho), rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("rho", [-0.9, -0.3, 0.0, 0.4, 0.9, 0.99])
@pytest.mark.parametrize("K", [1, 2, 5, 8])
@pytest.mark.parametrize("d", [0, 1, 3, 4, 5, 7, 8, 12])
def test_sma_cross_equals_double_sum(K, d, rho):
    assert theory.sma_cross(K, d, rho) == pytest.approx(brute_cross(K, d, rho), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("eps", [1e-3, 1e-5, 1e-8, 1e-12, 0.0])
@pytest.mark.parametrize("K,d", [(2, 0), (5, 0), (5, 2), (6, 4), (40, 7), (40, 39), (3, 9)])
def test_no_cancellation_near_rho_one(K, d, eps):
    """Close to ρ = 1 the closed forms cancel catastrophically; the brute-force sum does not."""
    rho = 1.0 - eps
    assert theory.sma_cross(K, d, rho) == pytest.approx(brute_cross(K, d, rho), rel=1e-12)
    assert theory.sma_gain(K, rho) == pytest.approx(brute_gain(K, rho), rel=1e-12)
    G, C = theory.sma_gain(K, rho), theory.sma_cross(K, d, rho)
    assert G - C == pytest.approx(brute_gain(K, rho) - brute_cross(K, d, rho), abs=1e-13)


def _mp_window_sum(K: int, d: int, rho) -> mpmath.mpf:
    return mpmath.fsum(rho ** abs(d + l - j) for j in range(K) for l in range(K))


@pytest.mark.parametrize("K,d", [(5, 3), (2, 1), (8, 8), (3, 10)])
def test_valley_terms_keep_relative_accuracy_near_rho_one(K, d):
    """1 − G and G − C_d are ≈ (K+d)(1−ρ): compare B and W (through ΔL(0) and α*) with 40-digit sums."""
    mpmath.mp.dps = 40
    lr, lam, c = 1e-4, np.array([1e-3, 1e-2, 3e-2]), 0.7
    B = W = mpmath.mpf(0)
    for x in lam:
        rho = (1 - mpmath.mpf(lr) * mpmath.mpf(x)) ** 1
        omega = mpmath.mpf(lr) / (2 * (2 - mpmath.mpf(lr) * mpmath.mpf(x)))
        G, C = _mp_window_sum(K, 0, rho) / K**2, _mp_window_sum(K, d, rho) / K**2
        B += omega * (1 - G)
        W += omega * (G - C)
    kw = dict(lr=lr, interval=1, window=K, offset=d, curvatures=lam)
    assert theory.extrapolation_delta_loss(0.0, slope=0.0, **kw) == pytest.approx(float(-B), rel=1e-11)
    P = mpmath.mpf(c) ** 2 * mpmath.mpf(lr) * d
    assert theory.optimal_alpha(slope=c, **kw) == pytest.approx(float((P - 2 * W) / (4 * W)), rel=1e-10)


def test_rank1_fraction_two_rows_is_exactly_one():
    """Two centred rows always lie on a line; tiny curvatures (ρ → 1) must not spoil that."""
    for lam in ([1e-3], [1e-6, 0.5]):
        approx, _ = theory.rank1_fraction(slope=0.0, lr=0.06, interval=1, window=3, curvatures=lam, n=2)
        assert approx == pytest.approx(1.0, abs=1e-14)


def test_special_values():
    assert theory.sma_gain(1, 0.37) == 1.0
    assert theory.sma_gain(9, 1.0) == 1.0
    assert theory.sma_cross(9, 4, 1.0) == 1.0
    assert theory.sma_gain(6, 0.0) == pytest.approx(1 / 6)
    assert theory.sma_cross(6, 2, 0.0) == pytest.approx(4 / 36)  # (K−d)/K² at ρ = 0
    assert theory.sma_cross(6, 9, 0.0) == 0.0
    assert theory.sma_cross(4, 0, 0.6) == pytest.approx(theory.sma_gain(4, 0.6))
    assert theory.sma_gain(2, -0.9) == pytest.approx(0.05)
    assert theory.sma_gain(3, -0.9) == pytest.approx(1.02 / 9)


def test_sma_gain_vectorised():
    K = np.array([[1], [3], [10]])
    rho = np.array([-0.5, 0.0, 0.5, 1.0])
    out = theory.sma_gain(K, rho)
    assert out.shape == (3, 4)
    expected = [[brute_gain(int(k), float(r)) for r in rho] for k in K[:, 0]]
    np.testing.assert_allclose(out, expected, rtol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.9])
@pytest.mark.parametrize("rho", [-0.8, 0.0, 0.5, 0.97])
def test_ema_gain_equals_truncated_series(beta, rho):
    # m = (1−β) Σ_j β^j x_{k−j}; Var/V = (1−β)² Σ_{j,l} β^{j+l} ρ^{|j−l|}, truncated where β^j < 1e-18
    n = 1 if beta == 0 else int(math.log(1e-18) / math.log(beta)) + 1
    b = (1 - beta) * beta ** np.arange(n)
    assert theory.ema_gain(beta, rho) == pytest.approx(b @ gamma(rho, n) @ b, rel=1e-10)


@pytest.mark.parametrize("K,rho", [(1, 0.5), (4, 0.6), (8, -0.7), (5, 0.0), (12, 0.9)])
def test_variance_from_frequency_response(K, rho):
    """(1/2π)∫|H(ω)|² S_x(ω) dω = G·V with S_x = V(1−ρ²)/(1−2ρcos ω+ρ²) (here V = 1)."""
    spectrum = lambda w: (1 - rho**2) / (1 - 2 * rho * math.cos(w) + rho**2)
    sma = integrate.quad(lambda w: theory.sma_response(K, w) ** 2 * spectrum(w), -np.pi, np.pi, limit=200)
    assert sma[0] / (2 * np.pi) == pytest.approx(brute_gain(K, rho), rel=1e-7)
    beta = 0.7
    ema = integrate.quad(lambda w: theory.ema_response(beta, w) ** 2 * spectrum(w), -np.pi, np.pi, limit=200)
    assert ema[0] / (2 * np.pi) == pytest.approx(theory.ema_gain(beta, rho), rel=1e-7)


def test_responses_against_transfer_functions():
    omega = np.linspace(-3, 3, 41)
    for K in (1, 3, 8):
        direct = np.abs(np.exp(-1j * np.outer(omega, np.arange(K))).sum(axis=1)) / K
        np.testing.assert_allclose(theory.sma_response(K, omega), direct, atol=1e-12)
    beta = 0.6
    direct = np.abs((1 - beta) / (1 - beta * np.exp(-1j * omega)))
    np.testing.assert_allclose(theory.ema_response(beta, omega), direct, atol=1e-12)
    assert theory.sma_response(7, 0.0) == 1.0
    assert theory.ema_response(0.9, 0.0) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- §c, §d


def test_lags_against_expected_positions():
    D = 0.3
    for K in (1, 2, 9):
        positions = D * np.arange(K)  # checkpoints behind the newest one
        assert theory.sma_lag(K, D) == pytest.approx(positions.mean())
    beta = 0.8
    j = np.arange(400)
    assert theory.ema_lag(beta, D) == pytest.approx(np.sum((1 - beta) * beta**j * D * j), rel=1e-12)


@pytest.mark.parametrize("K,d", [(1, 1), (3, 1), (4, 4), (5, 9)])
@pytest.mark.parametrize("alpha", [-1.5, -0.5, 0.0, 0.7, 3.0])
def test_extrapolation_matches_weight_vector(K, d, alpha):
    a = theory.extrapolation_delta_loss(alpha, window=K, offset=d, **LINEAR)
    b = theory.weights_delta_loss(extra_weights(K, d, alpha), **LINEAR)
    assert a == pytest.approx(b, rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 3.0])
def test_extrapolation_matches_weight_vector_near_rho_one(alpha):
    """Flat valleys (ρ = 1 − 1e-7..3e-6): both scores must keep full relative accuracy and agree."""
    kw = dict(slope=0.7, lr=1e-4, interval=1, curvatures=np.array([1e-3, 1e-2, 3e-2]), noise=1.0)
    a = theory.extrapolation_delta_loss(alpha, window=5, offset=3, **kw)
    assert a == pytest.approx(theory.weights_delta_loss(extra_weights(5, 3, alpha), **kw), rel=1e-11)


def test_weights_delta_loss_against_explicit_expectation():
    """ΔL(w) = −c(E u(w) − E u_N) + Σ λ_i/2 (Var v_i(w) − V_i) with step-level covariances V(1−ηλ)^{|Δt|}."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=6)
    w += (1 - w.sum()) / 6
    c, lr, s, lam, noise = LINEAR["slope"], LINEAR["lr"], LINEAR["interval"], LINEAR["curvatures"], 1.3
    steps = s * np.arange(1, 7)
    river = -c * (w @ (lr * c * steps) - lr * c * steps[-1])
    valley = 0.0
    for lam_i in lam:
        V = lr * noise**2 / (lam_i * (2 - lr * lam_i))
        cov = V * (1 - lr * lam_i) ** np.abs(steps[:, None] - steps[None, :]).astype(float)
        valley += lam_i / 2 * (w @ cov @ w - V)
    assert theory.weights_delta_loss(w, **LINEAR) == pytest.approx(river + valley, rel=1e-10)


def test_weights_delta_loss_batch():
    batch = np.stack([extra_weights(3, 2, a) for a in (0.0, 0.5, 1.0)])
    out = theory.weights_delta_loss(batch, **LINEAR)
    assert out.shape == (3,)
    for row, value in zip(batch, out, strict=True):
        assert theory.weights_delta_loss(row, **LINEAR) == pytest.approx(value)


def test_extrapolation_delta_loss_broadcasts():
    out = theory.extrapolation_delta_loss(
        np.array([0.0, 1.0]), window=np.array([[2], [6]]), offset=3, **LINEAR
    )
    assert out.shape == (2, 2)
    assert out[1, 1] == pytest.approx(theory.weights_delta_loss(extra_weights(6, 3, 1.0), **LINEAR))


def test_delta_loss_matches_sgd_simulation():
    """Monte Carlo with plain SGD at step level (Gaussian noise, burn-in from zero): ΔL within 5 s.e."""
    rng = np.random.default_rng(0)
    c, lr, s, noise = 0.5, 0.1, 3, 1.0
    lam = np.array([0.7, 4.0, 12.0])
    K, d, alpha, runs, burn = 4, 3, 0.8, 20000, 400
    n = K + d
    v = np.zeros((runs, lam.size))
    for _ in range(burn):
        v = (1 - lr * lam) * v + lr * noise * rng.standard_normal(v.shape)
    checkpoints = []
    for _ in range(n):
        for _ in range(s):
            v = (1 - lr * lam) * v + lr * noise * rng.standard_normal(v.shape)
        checkpoints.append(v)
    traj = np.stack(checkpoints, axis=1)  # (runs, n, m)
    w = extra_weights(K, d, alpha)
    merged, last = np.einsum("j,rjm->rm", w, traj), traj[:, -1]
    u = lr * c * s * np.arange(1, n + 1)  # the linear river drifts deterministically
    per_run = -c * (w @ u - u[-1]) + 0.5 * ((merged**2 - last**2) @ lam)
    predicted = theory.extrapolation_delta_loss(
        alpha, slope=c, lr=lr, interval=s, window=K, offset=d, curvatures=lam, noise=noise
    )
    assert abs(per_run.mean() - predicted) < 5 * per_run.std() / math.sqrt(runs)


def test_optimal_alpha_minimises_quadratic():
    kw = dict(window=5, offset=3, **LINEAR)
    a_star = theory.optimal_alpha(**kw)
    grid = np.linspace(a_star - 3, a_star + 3, 6001)
    losses = theory.extrapolation_delta_loss(grid, **kw)
    assert grid[np.argmin(losses)] == pytest.approx(a_star, abs=2e-3)
    assert theory.extrapolation_delta_loss(a_star, **kw) <= losses.min() + 1e-15


def test_optimal_alpha_without_valley_term():
    kw = dict(slope=0.3, lr=0.1, interval=2, window=3, curvatures=[0.0], noise=1.0)
    assert theory.optimal_alpha(offset=2, **kw) == np.inf  # loss linear and decreasing in α
    assert math.isnan(theory.optimal_alpha(offset=0, **kw))  # d = 0: α has no effect


def test_optimal_weights_minimise_delta_loss():
    kw = dict(LINEAR)
    n = 8
    w = theory.optimal_weights(n=n, **kw)
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    best = theory.weights_delta_loss(w, **kw)
    rng = np.random.default_rng(1)
    for scale in (1e-4, 1e-2, 1.0):
        step = rng.normal(size=(200, n)) * scale
        step -= step.mean(axis=1, keepdims=True)  # stay affine
        assert np.all(theory.weights_delta_loss(w + step, **kw) > best)
    # and it is at least as good as every Extra-Merge that fits in n checkpoints
    for K in range(1, n):
        d = n - K
        a = theory.optimal_alpha(window=K, offset=d, **kw)
        assert best <= theory.weights_delta_loss(extra_weights(K, d, a), **kw) + 1e-14


def test_optimal_weights_zero_drift_is_minimum_variance():
    """With c = 0 the optimum minimises wᵀQw: compare with the explicit Q⁻¹1 / 1ᵀQ⁻¹1."""
    kw = dict(LINEAR, slope=0.0)
    w = theory.optimal_weights(n=5, **kw)
    lam, lr, s, noise = kw["curvatures"], kw["lr"], kw["interval"], kw["noise"]
    Q = sum(lr * noise**2 / (2 * (2 - lr * x)) * gamma((1 - lr * x) ** s, 5) for x in lam)
    q = np.linalg.solve(Q, np.ones(5))
    np.testing.assert_allclose(w, q / q.sum(), rtol=1e-9)


# ---------------------------------------------------------------------------------------------- §e


def fve1(rows: np.ndarray) -> float:
    centred = rows - rows.mean(axis=0)
    sv = np.linalg.svd(centred, compute_uv=False)
    return float(sv[0] ** 2 / np.sum(sv**2))


def test_rank1_fraction_small_rho_formula():
    """ρ ≈ 0 (ηλs large enough), n ≤ K: Σ N = ΣV (n²−1)/(3K²) and the bound is S/(S + ΣN)."""
    lr, s, c, K, n = 0.5, 40, 0.2, 6, 5
    lam = np.array([2.0])  # ηλ = 1 → ρ = 0 exactly
    V = theory.stationary_variance(lr, lam[0])
    S = (lr * c * s) ** 2 * n * (n**2 - 1) / 12
    N = V * (n**2 - 1) / (3 * K**2)
    approx, lower = theory.rank1_fraction(slope=c, lr=lr, interval=s, window=K, curvatures=lam, n=n)
    assert lower == pytest.approx(S / (S + N), rel=1e-12)
    assert lower <= approx <= 1.0


def mean_fve1(c, lr, s, K, n, lam, reps, seed=2):
    """Monte Carlo E FVE_1: rows = drift + Gaussian valley noise with covariance V·C_{|j−l|} (brute C)."""
    rng = np.random.default_rng(seed)
    drift = lr * c * s * np.arange(n)
    chols = []
    for x in lam:
        V, rho = theory.stationary_variance(lr, x), (1 - lr * x) ** s
        cov = np.array([[V * brute_cross(K, abs(j - l), rho) for l in range(n)] for j in range(n)])
        chols.append(np.linalg.cholesky(cov + 1e-13 * np.eye(n)))
    samples = [
        fve1(np.column_stack([drift, *(L @ rng.standard_normal(n) for L in chols)])) for _ in range(reps)
    ]
    return float(np.mean(samples))


@pytest.mark.parametrize("K,tol", [(1, 0.07), (10, 0.015)])
def test_rank1_fraction_against_monte_carlo(K, tol):
    """Many valley directions: approx tracks E FVE_1 (runs low at small K, §e) and the bound holds."""
    c, lr, s, n = 0.2, 0.1, 2, 8
    lam = np.linspace(0.5, 5.0, 30)
    approx, lower = theory.rank1_fraction(slope=c, lr=lr, interval=s, window=K, curvatures=lam, n=n)
    measured = mean_fve1(c, lr, s, K, n, lam, reps=400)
    assert lower <= measured
    assert approx <= measured + 0.01
    assert approx == pytest.approx(measured, abs=tol)


def test_rank1_lower_bound_with_few_valleys():
    """With few valley directions PC1 can follow one noisy axis: approx runs well below E FVE_1 then,
    but the rigorous bound S/(S + ΣN) still holds."""
    c, lr, s, K, n = 0.05, 0.1, 2, 3, 6
    lam = np.array([1.0, 3.0])
    approx, lower = theory.rank1_fraction(slope=c, lr=lr, interval=s, window=K, curvatures=lam, n=n)
    measured = mean_fve1(c, lr, s, K, n, lam, reps=1000)
    assert lower <= measured
    assert approx < measured


def test_rank1_fraction_without_noise_is_one():
    out = theory.rank1_fraction(slope=0.1, lr=0.1, interval=3, window=4, curvatures=[1.0], n=5, noise=0.0)
    assert out == (1.0, 1.0)


# ---------------------------------------------------------------------------------------------- curved river


CURVED = dict(
    slope=2.0,
    river_curvature=0.4,
    lr=0.1,
    interval=3,
    window=3,
    offset=2,
    curvatures=np.array([1.5, 6.0]),
    e0=1.7,
    k=9,
    noise=0.6,
    river_noise=0.8,
)


def curved_brute(alpha, p):
    """E L(E_k) − L* from the weight vector over checkpoints 0..k, checkpoint means e0 r^j and brute-force
    covariances V ρ^{|i−j|} for the river and each valley."""
    K, d, k, lr, s, mu = p["window"], p["offset"], p["k"], p["lr"], p["interval"], p["river_curvature"]
    w = np.zeros(k + 1)
    w[k - K + 1 :] += (1 + alpha) / K
    w[k - d - K + 1 : k - d + 1] -= alpha / K
    r = (1 - lr * mu) ** s
    mean = w @ (p["e0"] * r ** np.arange(k + 1))
    Vu = lr * p["river_noise"] ** 2 / (mu * (2 - lr * mu))
    loss = mu / 2 * (mean**2 + Vu * w @ gamma(r, k + 1) @ w)
    for lam in p["curvatures"]:
        V = lr * p["noise"] ** 2 / (lam * (2 - lr * lam))
        loss += lam / 2 * V * w @ gamma((1 - lr * lam) ** s, k + 1) @ w
    return loss


@pytest.mark.parametrize("alpha", [-0.7, 0.0, 0.4, 2.5])
@pytest.mark.parametrize("changes", [{}, {"k": 4}, {"window": 1, "offset": 1}, {"lr": 0.3, "interval": 2}])
def test_curved_expected_loss_against_weight_vector(alpha, changes):
    p = {**CURVED, **changes}
    assert theory.curved_expected_loss(alpha, **p) == pytest.approx(curved_brute(alpha, p), rel=1e-10)


def test_curved_loss_at_r_zero_is_finite():
    p = {**CURVED, "lr": 0.25, "river_curvature": 4.0}  # ημ = 1 → r = 0, r^{−d} infinite
    assert theory.curved_expected_loss(0.3, **p) == pytest.approx(curved_brute(0.3, p), rel=1e-10)


def test_curved_optimal_alpha_minimises():
    a = theory.curved_optimal_alpha(**CURVED)
    grid = np.linspace(a - 2, a + 2, 4001)
    losses = theory.curved_expected_loss(grid, **CURVED)
    assert grid[np.argmin(losses)] == pytest.approx(a, abs=2e-3)


# ---------------------------------------------------------------------------------------------- §f


@pytest.mark.parametrize("x", [0.05, 0.7, 3.0, 20.0])
def test_decay_gain_matches_discrete_variance_recursion(x):
    """V_{t+1} = (1 − η_tλ)² V_t + η_t²σ², η_t = η(1 − t/T), from stationarity; ηλ = x/T small."""
    T, lam, noise = 20000, 1.0, 1.0
    eta = x / (lam * T)
    V0 = theory.stationary_variance(eta, lam, noise)
    V = V0
    for t in range(T):
        e = eta * (1 - t / T)
        V = (1 - e * lam) ** 2 * V + e**2 * noise**2
    assert theory.decay_gain(x) == pytest.approx(V / V0, rel=2e-3)


@pytest.mark.parametrize("x", [0.0, 1e-9, 1e-4, 0.09, 0.11, 1.0, 50.0])
def test_average_and_decay_gain_against_quadrature(x):
    # ∫∫_{[0,1]²} e^{−x|t1−t2|} = 2∫_0^1 (1 − h) e^{−xh} dh (smooth integrand, no kink on the diagonal)
    avg = 2 * integrate.quad(lambda h: (1 - h) * math.exp(-x * h), 0, 1, epsabs=1e-14)[0]
    assert theory.average_gain(x) == pytest.approx(avg, rel=1e-8)
    dec = math.exp(-x) + 2 * x * integrate.quad(lambda u: u**2 * math.exp(-x * u**2), 0, 1)[0]
    assert theory.decay_gain(x) == pytest.approx(dec, rel=1e-10)


def test_decay_average_advance_is_sum_of_decayed_steps():
    lr, c, T = 0.02, 1.5, 37
    assert theory.decay_average_advance(lr, c, T) == pytest.approx(
        sum(lr * c * (1 - t / T) for t in range(T))
    )


# ---------------------------------------------------------------------------------------------- bad input


BAD_INPUT = [
    (lambda: theory.stationary_variance(0.5, 5.0), r"lr\*curvature must lie in \(0, 2\).*got 2.5"),
    (lambda: theory.stationary_variance(0.1, 0.0), r"lr\*curvature must lie in \(0, 2\)"),
    (lambda: theory.stationary_variance(-0.1, 1.0), r"lr must be > 0"),
    (lambda: theory.stationary_variance(0.1, float("nan")), r"curvature must not be NaN"),
    (lambda: theory.sma_gain(0, 0.5), r"window must be an integer >= 1, got 0"),
    (lambda: theory.sma_gain(2.5, 0.5), r"window must be an integer >= 1, got 2.5"),
    (lambda: theory.sma_gain(3, 1.2), r"rho must lie in \[-1, 1\]"),
    (lambda: theory.sma_gain(3, float("nan")), r"rho must not be NaN"),
    (lambda: theory.sma_cross(3, -1, 0.5), r"offset must be an integer >= 0"),
    (lambda: theory.ema_gain(1.0, 0.5), r"decay must lie in \[0, 1\)"),
    (lambda: theory.ema_response(-0.1, 0.5), r"decay must lie in \[0, 1\)"),
    (lambda: theory.valley_factor(float("inf"), 2, 1, 0.5), r"alpha must be finite"),
    (
        lambda: theory.extrapolation_delta_loss(
            0.5, window=3, offset=1, **{**LINEAR, "curvatures": [1.0, -2.0]}
        ),
        r"curvatures must be >= 0 \(negative curvature",
    ),
    (
        lambda: theory.extrapolation_delta_loss(0.5, window=3, offset=1, **{**LINEAR, "lr": 1.0}),
        r"lr\*curvatures must lie in \[0, 2\)",
    ),
    (
        lambda: theory.extrapolation_delta_loss(float("nan"), window=3, offset=1, **LINEAR),
        r"alpha must not be NaN",
    ),
    (lambda: theory.optimal_alpha(window=3, offset=1, **{**LINEAR, "interval": 0}), r"interval must be"),
    (lambda: theory.weights_delta_loss([0.5, 0.6], **LINEAR), r"weights must sum to 1"),
    (lambda: theory.weights_delta_loss([0.5, float("nan")], **LINEAR), r"weights must not be NaN"),
    (lambda: theory.optimal_weights(n=4, **{**LINEAR, "noise": 0.0}), r"optimal_weights needs noise > 0"),
    (
        lambda: theory.optimal_weights(n=4, **{**LINEAR, "curvatures": [1e-30, 0.0]}),
        r"singular to working precision",
    ),
    (
        lambda: theory.rank1_fraction(slope=1, lr=0.1, interval=1, window=2, curvatures=[0.0], n=4),
        r"lr\*curvatures must lie in \(0, 2\)",
    ),
    (
        lambda: theory.rank1_fraction(slope=1, lr=0.1, interval=1, window=2, curvatures=[1.0], n=1),
        r"n must be an integer >= 2",
    ),
    (lambda: theory.curved_expected_loss(0.0, **{**CURVED, "k": 3}), r"k must be >= window - 1 \+ offset"),
    (lambda: theory.curved_expected_loss(0.0, **{**CURVED, "river_curvature": 0.0}), r"river_curvature"),
    (
        lambda: theory.curved_expected_loss(0.0, **{**CURVED, "river_noise": -1.0}),
        r"river_noise must be >= 0",
    ),
    (lambda: theory.decay_gain(-1.0), r"x must be >= 0"),
    (lambda: theory.decay_average_advance(0.1, 1.0, 0), r"steps must be an integer >= 1"),
]


@pytest.mark.parametrize("call,message", BAD_INPUT)
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_weights_delta_loss_per_curvature_noise_is_a_superposition():
    """noise may give one σ_i per curvature: ΔL is the sum of one-direction ΔLs (river counted once)."""
    from rivervalley import weights

    w = weights.extra(10, 4, 3, 0.7)
    kw = dict(lr=0.5, interval=2)
    both = theory.weights_delta_loss(w, slope=0.2, curvatures=[1.0, 0.1], noise=[0.3, 1.5], **kw)
    one = theory.weights_delta_loss(w, slope=0.2, curvatures=[1.0], noise=0.3, **kw)
    two = theory.weights_delta_loss(w, slope=0.0, curvatures=[0.1], noise=1.5, **kw)
    assert both == pytest.approx(one + two, rel=1e-12)
    w_opt = theory.optimal_weights(n=10, slope=0.2, curvatures=[1.0, 0.1], noise=[0.3, 1.5], **kw)
    assert theory.weights_delta_loss(w_opt, slope=0.2, curvatures=[1.0, 0.1], noise=[0.3, 1.5], **kw) <= both
    with pytest.raises(ValueError, match="noise"):
        theory.weights_delta_loss(w, slope=0.2, curvatures=[1.0, 0.1], noise=[0.3, 1.5, 2], **kw)
