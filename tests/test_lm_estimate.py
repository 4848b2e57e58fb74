"""experiments.lm.estimate: the river-valley fit recovers known parameters and matches rivervalley.theory."""

import math

import numpy as np
import pytest

from experiments.lm import estimate
from rivervalley import theory, weights

_Z = tuple((0.0,) * 5 for _ in range(5))


def _synthetic(n, F0, F1, F2, omega, rho, noise=0.0, seed=0, fast=0.0):
    ws = list(estimate.calibration_weights(n).values())
    f = estimate.RiverFit(F0, F1, F2, fast, omega, rho, "true", 0.0, n, len(ws), _Z)
    last = np.eye(n)[-1]
    base = F0 + omega + fast  # loss of the newest checkpoint
    rng = np.random.default_rng(seed)
    y = [base + estimate.predict_delta(w, f) + noise * rng.standard_normal() for w in ws]
    return ws, np.array(y), f, last


@pytest.mark.parametrize("rho,fast", [(-0.3, 0.0), (0.3, 0.02), (0.5, 0.0), (0.85, 0.03)])
def test_fit_recovers_exact_parameters(rho, fast):
    ws, y, true, _ = _synthetic(12, 3.0, -0.02, 0.001, 0.05, rho, fast=fast)
    f = estimate.fit(ws, y)
    assert f.rho == pytest.approx(rho, abs=0.011)
    got = estimate.fit(ws, y, rho=rho)
    for k in ("F0", "F1", "F2", "omega_fast", "omega_slow"):
        assert getattr(got, k) == pytest.approx(getattr(true, k), rel=1e-9, abs=1e-12)
    assert got.rmse < 1e-10


def test_noisy_fit_stderr_covers_truth():
    """Over many noisy calibrations, the predicted ΔL of SMA(4) lies within 3 stderr of the truth ≥ 95%."""
    hits = 0
    w = weights.sma(12, 4)
    for seed in range(200):
        ws, y, true, _ = _synthetic(12, 3.0, -0.02, 0.0, 0.05, 0.4, noise=0.004, seed=seed)
        f = estimate.fit(ws, y, rho=0.4)
        err = abs(estimate.predict_delta(w, f) - estimate.predict_delta(w, true))
        hits += err <= 3 * estimate.predict_stderr(w, f)
    assert hits >= 190


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.7])
def test_prediction_is_theory_weights_delta_loss(rho):
    f = estimate.RiverFit(2.0, -0.01, 0.0, 0.02, 0.03, rho, "x", 0.0, 10, 0, _Z)
    params = f.theory_params()
    for w in (
        weights.sma(10, 4),
        weights.ema(10, 0.7),
        weights.extra(10, 4, 3, 0.8),
        weights.trend(10, 6, 1),
    ):
        assert estimate.predict_delta(w, f) == pytest.approx(
            float(theory.weights_delta_loss(w, **params)), rel=1e-9
        )
    # Extra-Merge: the closed-form α* of THEORY.md §d (one valley group: λ = 1 − ρ, σ² = 2ω(1 + ρ))
    one = estimate.RiverFit(2.0, -0.01, 0.0, 0.0, 0.03, rho, "x", 0.0, 10, 0, _Z)
    kw = dict(slope=0.1, lr=1.0, interval=1, curvatures=[1 - rho], noise=math.sqrt(0.06 * (1 + rho)))
    a_star = float(theory.optimal_alpha(window=4, offset=3, **kw))
    assert estimate.optimal_extra_alpha(one, 4, 3) == pytest.approx(a_star, rel=1e-6, abs=1e-9)


def test_theory_params_none_when_river_ascends():
    f = estimate.RiverFit(2.0, 0.01, 0.0, 0.0, 0.03, 0.2, "x", 0.0, 10, 0, _Z)
    assert f.theory_params() is None
    assert math.isfinite(estimate.optimal_extra_alpha(f, 4, 3))


def test_no_valley_loss_and_descending_river_has_no_finite_alpha():
    f = estimate.RiverFit(2.0, -0.01, 0.0, 0.0, 0.0, 0.2, "x", 0.0, 10, 0, _Z)
    assert estimate.optimal_extra_alpha(f, 4, 3) == math.inf


def test_retention_is_sma_gain():
    for rho in (-0.5, 0.0, 0.6):
        assert estimate.retention(weights.sma(9, 5), rho) == pytest.approx(
            float(theory.sma_gain(5, rho)), rel=1e-9
        )


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 6"):
        estimate.fit([np.ones(3) / 3] * 2, [1.0, 2.0])
    ws = list(estimate.calibration_weights(6).values())
    with pytest.raises(ValueError, match="not finite"):
        estimate.fit(ws, [float("nan")] * len(ws))
    with pytest.raises(ValueError, match="at least 3"):
        estimate.calibration_weights(2)


def test_theory_optimal_weights_minimise_the_prediction():
    f = estimate.RiverFit(2.0, -0.01, 0.0, 0.02, 0.03, 0.6, "x", 0.0, 10, 0, _Z)
    w_opt = weights.optimal(10, **f.theory_params())
    best = estimate.predict_delta(w_opt, f)
    rng = np.random.default_rng(1)
    for _ in range(50):  # any other affine vector predicts a higher loss
        v = rng.standard_normal(10) * 0.1
        v -= v.mean()
        assert estimate.predict_delta(w_opt + v, f) > best


def test_negative_valley_loss_is_dropped():
    ws, y, _, _ = _synthetic(10, 3.0, -0.02, 0.0, 0.05, 0.5)
    y = y - 0.2 * np.array([float(w @ w) for w in ws])  # a "negative fast valley" the model must not accept
    f = estimate.fit(ws, y, rho=0.5)
    assert f.omega_fast >= 0 and f.omega_slow >= 0
