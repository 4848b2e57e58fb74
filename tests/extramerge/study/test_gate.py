"""The theory's gate and the menu's recipes, on losses made by the model itself (no LM: fast)."""

import numpy as np
import pytest

from extramerge.study import menu as M
from extramerge.study.core import StudyConfig
from extramerge.study.theory import Reach, Theory, fit_gate
from rivervalley import estimate as est
from rivervalley import weights as W


def _theory(beta, n=12, noise=1e-5, seed=0):
    """A fit to calibration losses that the §g model with parameters ``beta`` produces (plus noise)."""
    grid = est.Grid.constant(n)
    cal = est.calibration_weights(n)
    X = est.design(np.stack(list(cal.values())), grid, 0.5)
    y = X @ np.asarray(beta, float) + np.random.default_rng(seed).normal(0, noise, X.shape[0])
    args = (list(cal.values()), list(y), grid)
    return Theory(est.fit(*args), est.fit(*args, bend=True)), grid, cal


def test_gate_is_open_on_a_straight_valley_with_a_valley_loss():
    th, _, _ = _theory([3.0, -0.02, 0.0, 0.01, 0.02, 0.0])
    assert fit_gate(th, []) == []


def test_gate_closes_when_the_river_bends_away():
    th, _, _ = _theory([3.0, -0.02, -0.01, 0.01, 0.02, 0.0])
    assert th.curvature.value < 0
    assert any("bends away" in w for w in fit_gate(th, []))


def test_gate_closes_without_a_valley_loss_and_on_an_untrusted_fit():
    th, _, _ = _theory([3.0, -0.02, 0.0, 0.0, 0.0, 0.0], noise=1e-3)
    why = fit_gate(th, ["the fitted river does not descend"])
    assert any("valley loss is not identified" in w for w in why)
    assert any("not trusted" in w for w in why)


def test_reach_refuses_what_the_calibration_half_never_measured():
    n = 12
    grid = est.Grid.constant(n)
    measured = [np.eye(n)[-1], W.sma(n, 4), W.extra(n, 4, 2, 1.0)]
    r = Reach(grid, measured, [1.0])
    inside = M.extra(n, 4, 2, 0.5)
    assert r.outside(inside) == []
    far = M.extra(n, 4, 2, 2.0)
    why = r.outside(far)
    assert any("lag" in w for w in why) and any("α" in w for w in why)
    big = {"method": "custom", "weights": np.r_[np.zeros(n - 2), -1.0, 2.0]}
    assert any("‖w‖" in w for w in r.outside(big))


def test_menu_recipes_rebuild_the_same_merge_over_more_checkpoints():
    cfg = StudyConfig(checkpoints=[], out=None)
    menu, offsets = M.plain_menu(8, cfg)
    assert offsets == [2, 4]  # K = 4: d = 8 needs 12 checkpoints
    names = [c["name"] for c in menu]
    assert len(names) == len(set(names))
    for c in menu:
        assert c["kind"] == "plain" and sum(c["weights"]) == pytest.approx(1)
        again = M.rebuild(c["recipe"], 8)
        np.testing.assert_array_equal(again["weights"], c["weights"])
        assert again["name"] == c["name"]
    # a window of every checkpoint stays 'all'; a forecast keeps its size instead
    sma_all = next(c for c in menu if c["name"] == "SMA K=all")
    np.testing.assert_allclose(M.rebuild(sma_all["recipe"], 12)["weights"], W.sma(12, 12))
    kept = M.rebuild({**sma_all["recipe"], "window_all": False}, 12)
    np.testing.assert_allclose(kept["weights"], W.sma(12, 8))
    tr = next(c for c in menu if c["name"] == "trend K=4 ahead=1")
    np.testing.assert_allclose(tr["weights"], W.trend(8, 4, 1))
    custom = M.rebuild({"method": "custom", "vector": [0.25, 0.75], "name": "v"}, 5)
    np.testing.assert_allclose(custom["weights"], [0, 0, 0, 0.25, 0.75])
