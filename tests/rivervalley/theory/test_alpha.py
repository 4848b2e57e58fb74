"""rivervalley.theory.alpha: every rule for Extra-Merge's α, on known geometry and against brute force."""

import math

import numpy as np
import pytest

from rivervalley import analysis as A
from rivervalley import theory
from rivervalley import weights as W
from rivervalley.theory import alpha


def _line(n, p, rng, slope=1.0):
    a, b = rng.normal(size=p), rng.normal(size=p) * slope
    return a + b * np.arange(n)[:, None]


def _ar1_noise(n, p, V, rho, rng):
    """Stationary AR(1) valley noise: Σ_i Var v_ij = V, lag-1 correlation ρ."""
    sd = math.sqrt(V / p)
    v = np.empty((n, p))
    v[0] = sd * rng.normal(size=p)
    for j in range(1, n):
        v[j] = rho * v[j - 1] + math.sqrt(1 - rho**2) * sd * rng.normal(size=p)
    return v


def _ar1_trajectory(n, p, drift, V, rho, rng):
    """θ_j = a + b j + v_j with ‖b‖ = drift."""
    b = rng.normal(size=p)
    b *= drift / np.linalg.norm(b)
    return rng.normal(size=p) + np.arange(1, n + 1)[:, None] * b + _ar1_noise(n, p, V, rho, rng)


def test_estimate_river_recovers_drift_noise_and_rho():
    rng = np.random.default_rng(6)
    est = alpha.estimate_river(A.gram(_ar1_trajectory(40, 3000, drift=2.0, V=9.0, rho=0.5, rng=rng)))
    assert est.drift == pytest.approx(2.0, rel=0.05)
    assert est.noise_var == pytest.approx(9.0, rel=0.1)
    assert est.rho == pytest.approx(0.5, abs=0.08)
    exact = alpha.estimate_river(A.gram(_line(5, 4, rng)))
    assert exact.noise_var < 1e-12 and exact.drift == pytest.approx(exact.drift_pc1)


def _expected_sq_error(w, estimate) -> float:
    """E‖wᵀθ − T‖² = ‖b‖² lag(w)² + V wᵀΓ(ρ)w: what alpha_geometric minimises (alpha's docstring)."""
    w = np.asarray(w, dtype=float)
    gamma = W.correlation_matrix(estimate.rho, w.size)
    return float(estimate.drift**2 * W.lag(w) ** 2 + estimate.noise_var * w @ gamma @ w)


def test_alpha_geometric_reduces_to_match_without_noise_and_minimises_error():
    est = alpha.RiverEstimate(drift=1.0, drift_pc1=1.0, noise_var=0.0, noise_std=0.0, rho=0.0, n=8)
    for K, d in [(4, 4), (5, 3), (1, 2)]:
        assert alpha.alpha_geometric(est, K, d) == pytest.approx(alpha.alpha_match(K, d))
    noisy = alpha.RiverEstimate(1.0, 1.0, 4.0, 2.0, 0.3, 8)
    a = alpha.alpha_geometric(noisy, 4, 4)
    assert 0 <= a < alpha.alpha_match(4, 4)  # noise pulls the estimate towards less extrapolation
    grid = np.linspace(-1, 2, 3001)
    errs = [_expected_sq_error(W.extra(8, 4, 4, x), noisy) for x in grid]
    assert a == pytest.approx(grid[int(np.argmin(errs))], abs=2e-3)


def test_the_expected_error_alpha_geometric_minimises_matches_monte_carlo():
    rng = np.random.default_rng(7)
    n, p, reps = 6, 20, 500
    est = alpha.RiverEstimate(0.5, 0.5, 2.0, math.sqrt(2.0), 0.4, n)
    w = W.extra(n, 3, 3, 0.5)
    a, b = rng.normal(size=p), np.full(p, 0.5 / math.sqrt(p))
    line = a + np.arange(1, n + 1)[:, None] * b
    sq = [np.sum((w @ (line + _ar1_noise(n, p, 2.0, 0.4, rng)) - line[-1]) ** 2) for _ in range(reps)]
    assert np.mean(sq) == pytest.approx(_expected_sq_error(w, est), rel=0.1)


def test_numbers_are_those_extramerge_reported_before_the_move():
    # values of extramerge.select (deleted) on the same inputs: analyze and merge report the same α
    noisy = alpha.RiverEstimate(1.0, 1.0, 4.0, 2.0, 0.3, 8)
    assert alpha.alpha_geometric(noisy, 4, 4) == 0.2444505208445707
    assert alpha.alpha_geometric(noisy, 5, 3) == 0.5110827519025897
    X = np.random.default_rng(11).normal(size=(9, 40)).cumsum(0)
    river = alpha.estimate_river(A.gram(X - X[-1]))
    assert (river.drift, river.noise_var, river.rho) == (
        2.2935654799605,
        62.61324246939245,
        0.7150000000000001,
    )
    assert alpha.alpha_geometric(river, 4, 5) == 0.05012940467765555


def test_alpha_match():
    assert alpha.alpha_match(8, 4) == 0.875 and alpha.alpha_match(1, 3) == 0.0
    with pytest.raises(ValueError, match="offset >= 1"):
        alpha.alpha_match(4, 0)


def test_loss_optimal_alpha_minimises_the_quadratic_and_has_one_edge_rule():
    R_minus_B, P, W_ = 0.3, 2.0, 0.4
    grid = np.linspace(-5, 5, 100_001)
    losses = R_minus_B - P * grid + 2 * W_ * grid * (1 + grid)
    assert alpha.loss_optimal_alpha(P, W_) == pytest.approx((P - 2 * W_) / (4 * W_), rel=1e-15)
    assert alpha.loss_optimal_alpha(P, W_) == pytest.approx(grid[np.argmin(losses)], abs=1e-4)
    # no minimum: ±inf where the loss keeps falling, NaN where α does not matter
    assert alpha.loss_optimal_alpha(1.0, 0.0) == math.inf  # linear, decreasing in α
    assert math.isnan(alpha.loss_optimal_alpha(0.0, 0.0))  # flat
    assert alpha.loss_optimal_alpha(0.0, -1.0) == math.inf  # concave, P − 2W > 0
    assert alpha.loss_optimal_alpha(-5.0, -1.0) == -math.inf  # concave, P − 2W < 0
    assert math.isnan(alpha.loss_optimal_alpha(-2.0, -1.0))  # concave and symmetric about 0
    out = alpha.loss_optimal_alpha(np.array([2.0, 1.0, 0.0]), np.array([0.4, 0.0, 0.0]))
    assert out[0] == pytest.approx(0.75) and out[1] == math.inf and math.isnan(out[2])
    with pytest.raises(ValueError, match="W must not be NaN"):
        alpha.loss_optimal_alpha(1.0, float("nan"))


def test_the_landscape_alpha_star_is_the_rule_applied_to_its_terms():
    from rivervalley.theory.extrapolation import linear_river_terms

    kw = dict(slope=0.3, lr=0.5, interval=2, curvatures=[1.0, 0.2, 3.0])
    for K, d in [(8, 4), (3, 1), (5, 0)]:
        _, P, _, W_ = linear_river_terms(kw["slope"], kw["lr"], kw["interval"], K, d, kw["curvatures"], 1.0)
        a = theory.optimal_alpha(window=K, offset=d, **kw)
        b = alpha.loss_optimal_alpha(P, W_)
        assert a == b or (math.isnan(a) and math.isnan(b)), (K, d)
    assert theory.optimal_alpha(window=3, offset=2, noise=0.0, **kw) == math.inf  # W = 0, P > 0


def test_every_alpha_rule_has_one_home():
    for name in alpha.__all__:
        assert getattr(theory, name) is getattr(alpha, name), name
    # the validation grid's α_match rows use the rule (an override of it reaches them)
    from rivervalley.validate import grid

    rows = [r for st in grid.plan(fast=True, overrides={"alpha_match": lambda K, d: 0.123}) for r in st.rows]
    assert sum("α_match=0.123" in r.quantity for r in rows) == 2
    assert not any("α_match=" in r.quantity and "0.123" not in r.quantity for r in rows)
