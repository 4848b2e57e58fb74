"""rivervalley.testing.check_expected_gain / check_extrapolation_limits: simulation against the closed forms
(THEORY.md §d, §d'), and they fail, with a z-score, when the prediction is wrong."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rivervalley import theory
from rivervalley import weights as W
from rivervalley.testing import BendingRiver, RiverValley, check_expected_gain, check_extrapolation_limits
from rivervalley.testing.strategies import merges, river_valleys

SIM = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LINEAR = RiverValley(slope=0.3, lr=0.5, interval=2, curvatures=(1.0, 0.2, 1.8))
CURVED = RiverValley(
    slope=1.0, lr=0.5, interval=2, curvatures=(1.0, 0.2), noise=0.3, river_curvature=0.05, river_noise=0.3,
    e0=-10.0,
)  # fmt: skip


class Misstated(RiverValley):
    """A river valley whose stated theory is off by ``shift`` (the simulation is the true one)."""

    def delta_loss(self, weights, *, start=0):
        return super().delta_loss(weights, start=start) + 0.05


@SIM
@given(params=river_valleys(curved=None), merge=merges(max_n=12), seed=st.integers(0, 1000))
def test_simulated_gain_matches_theory_for_any_merge_and_valley(params, merge, seed):
    result = check_expected_gain(merge.weights, params, seeds=2000, seed=seed, z=4.5)
    assert result.predicted == pytest.approx(float(params.delta_loss(merge.weights)))
    assert abs(result.z) <= 4.5


def test_gain_of_a_merge_function_uses_the_function_itself():
    def ema(x, beta=0.8):
        m = x[0]
        for theta in x[1:]:
            m = beta * m + (1 - beta) * theta
        return m

    result = check_expected_gain(ema, LINEAR, n=8, seeds=1500)
    np.testing.assert_allclose(result.weights, W.ema(8, 0.8), atol=1e-9)
    assert result.predicted == pytest.approx(float(LINEAR.delta_loss(W.ema(8, 0.8))))
    with pytest.raises(ValueError, match="needs n"):
        check_expected_gain(ema, LINEAR)


def test_a_wrong_prediction_fails_with_its_z_score():
    wrong = Misstated(**{f.name: getattr(LINEAR, f.name) for f in dataclasses.fields(RiverValley)})
    with pytest.raises(AssertionError, match=r"closed form predicts .*: z = [+-]\d+\.\d\d, beyond ±4"):
        check_expected_gain(W.extra(8, 4, 2, 0.5), wrong)


def test_non_affine_weights_are_refused():
    with pytest.raises(AssertionError, match=r"sum to 1\.25, not 1"):
        check_expected_gain(np.array([0.0, 0.25, 0.5, 0.5]), LINEAR)


def test_curved_river_weights_formula_equals_the_extra_merge_closed_form():
    kw = dict(river_curvature=0.05, lr=0.5, interval=2, curvatures=[1.0, 0.2], noise=0.3, river_noise=0.3)
    for K, d, alpha in [(8, 4, 0.5), (4, 2, -0.3), (1, 3, 2.0), (3, 0, 0.0)]:
        k = 20
        got = theory.curved_weights_delta_loss(W.extra(k + 1, K, d, alpha), e0=10.0, **kw)
        full = theory.curved_expected_loss(alpha, slope=1.0, window=K, offset=d, k=k, e0=10.0, **kw)
        newest = theory.curved_expected_loss(0.0, slope=1.0, window=1, offset=0, k=k, e0=10.0, **kw)
        assert got == pytest.approx(full - newest, rel=1e-12, abs=1e-14)


def test_curved_river_gain_matches_simulation():
    check_expected_gain(W.extra(12, 4, 4, 2.0), CURVED, seeds=3000)
    check_expected_gain(W.trend(12, 6, ahead=3.0), CURVED, seeds=3000, start=5)


# ------------------------------------------------------------------------------ extrapolation limits


def test_limits_on_the_curved_river_match_theory():
    result = check_extrapolation_limits(lambda a: W.extra(12, 4, 4, a), CURVED)
    assert result.best_alpha == pytest.approx(result.best_alpha_predicted, abs=5 * result.best_alpha_se)
    assert result.best_alpha_predicted == pytest.approx(
        theory.curved_optimal_alpha(
            slope=1.0, river_curvature=0.05, lr=0.5, interval=2, window=4, offset=4, curvatures=[1.0, 0.2],
            e0=-10.0, k=11, noise=0.3, river_noise=0.3,
        ),
        rel=1e-9,
    )  # fmt: skip
    assert result.break_even_alpha > result.best_alpha > 0
    assert result.best_distance_predicted == pytest.approx(4 * result.best_alpha_predicted - 1.5)
    assert "break-even α" in str(result)


def test_noise_free_curved_river_extrapolates_exactly_onto_the_optimum():
    """THEORY invariant 6: without noise the best α is 1/(r^−d − 1), and it lands on u*."""
    quiet = dataclasses.replace(CURVED, noise=0.0, river_noise=0.0)
    result = check_extrapolation_limits(lambda a: W.extra(10, 3, 2, a), quiet, seeds=2)
    r = (1 - quiet.lr * quiet.river_curvature) ** quiet.interval
    assert result.best_alpha == pytest.approx(1 / (r**-2 - 1), rel=1e-6)
    assert result.best_gain == pytest.approx(result.best_gain_predicted, rel=1e-6)


@SIM
@given(params=river_valleys(curved=True), K=st.integers(1, 5), d=st.integers(1, 5), seed=st.integers(0, 99))
def test_limits_match_theory_on_random_curved_rivers(params, K, d, seed):
    result = check_extrapolation_limits(
        lambda a: W.extra(K + d + 2, K, d, a), params, seeds=3000, seed=seed, z=4.5
    )
    assert math.isfinite(result.best_alpha_predicted)


def test_limits_fail_when_theory_is_misstated():
    class Shifted(RiverValley):
        def delta_loss(self, weights, *, start=0):  # a linear term in α: moves the predicted best α
            return super().delta_loss(weights, start=start) - 0.05 * float(weights[-1])

    wrong = Shifted(**{f.name: getattr(CURVED, f.name) for f in dataclasses.fields(RiverValley)})
    with pytest.raises(AssertionError, match=r"extrapolation limit: measured best α = .* z = "):
        check_extrapolation_limits(lambda a: W.extra(12, 4, 4, a), wrong)


def test_family_must_be_affine_in_alpha():
    with pytest.raises(ValueError, match="affine in α"):
        check_extrapolation_limits(lambda a: W.extra(8, 2, 2, a * a), CURVED)


# ----------------------------------------------------------------------------------- bending rivers


@pytest.mark.parametrize(
    "river",
    [
        BendingRiver(),
        BendingRiver(amplitude=2.0, length=1.0, start=1.0, lr=0.005),
        BendingRiver(shape="hyperbola", valley_curvature=2.0, lr=0.02, interval=5, start=-2.0),
    ],
    ids=["sine", "tight-sine", "hyperbola"],
)
def test_limits_on_bending_rivers_match_the_estimate(river):
    result = check_extrapolation_limits(lambda a: W.extra(12, 4, 4, a), river, seeds=2000)
    assert result.best_alpha == pytest.approx(result.best_alpha_predicted, rel=0.02)
    assert result.break_even_alpha == pytest.approx(result.break_even_alpha_predicted, rel=0.02)
    assert result.break_even_alpha > result.best_alpha > 0
    assert "estimate (noise-free path" in result.theory


def test_straight_floor_has_no_bending_limit_but_noise():
    """amplitude 0: a straight floor, so only the valley noise (the §d' quadratic) limits extrapolation."""
    flat = BendingRiver(amplitude=0.0, noise=2.0, lr=0.05, interval=2)
    result = check_extrapolation_limits(lambda a: W.extra(10, 3, 3, a), flat, seeds=2000)
    exact = RiverValley(slope=1.0, lr=0.05, interval=2, curvatures=(10.0,), noise=2.0)
    closed = check_extrapolation_limits(lambda a: W.extra(10, 3, 3, a), exact, seeds=2000)
    assert result.best_alpha_predicted == pytest.approx(closed.best_alpha_predicted, rel=0.02)


def test_chosen_alpha_must_still_gain():
    family = lambda a: W.extra(12, 4, 4, a)  # noqa: E731
    check_extrapolation_limits(family, CURVED, alpha=2.0)
    with pytest.raises(AssertionError, match=r"extrapolating by α = 7 .* does not gain"):
        check_extrapolation_limits(family, CURVED, alpha=7.0)
    with pytest.raises(AssertionError, match=r"extrapolating by α = 3 .* does not gain"):
        check_extrapolation_limits(family, BendingRiver(), alpha=3.0, seeds=1000)
    check_extrapolation_limits(family, BendingRiver(), alpha=1.5, seeds=1000)


def test_unstable_bending_river_is_a_clear_error():
    with pytest.raises(ValueError, match="unstable by checkpoint 12"):
        check_extrapolation_limits(
            lambda a: W.extra(12, 4, 4, a), BendingRiver(shape="hyperbola", valley_curvature=5.0), seeds=100
        )
    with pytest.raises(ValueError, match="shape must be one of"):
        BendingRiver(shape="spiral")
