"""The sympy derivations pass, and they are able to fail when a closed form is wrong."""

from __future__ import annotations

import pytest
import sympy as sp

from rivervalley import symbolic


@pytest.mark.parametrize(
    "check",
    [
        lambda: symbolic.check_sma_gain(K_max=5),
        symbolic.check_sma_gain_general_k,
        lambda: symbolic.check_sma_cross(K_max=4, d_max=6),
        lambda: symbolic.check_window_sum_series(K_max=5, d_max=7),
        symbolic.check_ema_gain,
        symbolic.check_lags,
        symbolic.derive_delta_loss_quadratic,
        lambda: symbolic.check_extra_weights_identity(K_max=3, d_max=2),
        symbolic.check_optimal_weights,
        lambda: symbolic.check_curved_river(K_max=3, d_max=2),
        symbolic.check_decay_average,
    ],
)
def test_identity_holds(check):
    assert check() is True


def test_wrong_gain_is_caught(monkeypatch):
    r = symbolic.rho
    wrong = lambda K, r=r: (1 + r) / (K * (1 - r)) - r * (1 - r**K) / (K**2 * (1 - r) ** 2)  # factor 2 lost
    monkeypatch.setattr(symbolic, "gain_closed_form", wrong)
    with pytest.raises(AssertionError, match="G_K closed form, K=1"):
        symbolic.check_sma_gain(K_max=3)


def test_wrong_cross_branch_is_caught(monkeypatch):
    original = symbolic.cross_closed_form

    def shifted(K, d, r=symbolic.rho, branch="auto"):
        wrong = branch == "overlap" and d > 0
        return original(K, d, r, branch) + (sp.Rational(1, 10) if wrong else 0)

    monkeypatch.setattr(symbolic, "cross_closed_form", shifted)
    with pytest.raises(AssertionError, match="C_d overlap"):
        symbolic.check_sma_cross(K_max=3, d_max=3)


def test_main_reports_pass_and_failure(monkeypatch, capsys):
    def failing():
        raise AssertionError("deliberately wrong")

    monkeypatch.setattr(symbolic, "_CHECKS", (("lags", symbolic.check_lags), ("broken", failing)))
    assert symbolic.main() == 1
    out = capsys.readouterr().out
    assert "FAILED: deliberately wrong" in out and "1/2 identities verified" in out
