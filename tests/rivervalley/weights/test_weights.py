"""Weight vectors: THEORY.md invariants 1-3 and the contract of each builder."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rivervalley import weights as W

windows = st.integers(1, 12)
offsets = st.integers(0, 8)
alphas = st.floats(-3, 5, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(K=windows, d=offsets, a=alphas, extra_n=st.integers(0, 5), beta=st.floats(0, 0.99))
def test_every_builder_is_affine(K, d, a, extra_n, beta):
    n = K + d + extra_n
    for w in (W.sma(n, K), W.wma(n, K), W.extra(n, K, d, a), W.ema(n, beta), W.trend(n, K, 0.0)):
        assert w.shape == (n,)
        assert abs(w.sum() - 1.0) < 1e-9


@settings(max_examples=60, deadline=None)
@given(K=windows, d=offsets, a=alphas)
def test_alpha_zero_or_offset_zero_is_sma_and_window_one_is_last(K, d, a):
    n = K + d
    np.testing.assert_allclose(W.extra(n, K, d, 0.0), W.sma(n, K), atol=1e-15)
    np.testing.assert_allclose(W.extra(K, K, 0, a), W.sma(K, K), atol=1e-12)
    last = np.zeros(n)
    last[-1] = 1
    np.testing.assert_allclose(W.sma(n, 1), last)


@settings(max_examples=60, deadline=None)
@given(K=windows, d=st.integers(1, 8), a=alphas, p=st.integers(1, 4), seed=st.integers(0, 10**6))
def test_exact_line_is_extrapolated_exactly(K, d, a, p, seed):
    rng = np.random.default_rng(seed)
    base, slope = rng.normal(size=p), rng.normal(size=p)
    n = K + d
    k = np.arange(1, n + 1)[:, None]
    X = base + slope * k
    M = W.apply(W.sma(n, K), X)
    np.testing.assert_allclose(M, base + slope * (n - (K - 1) / 2), atol=1e-9)
    E = W.apply(W.extra(n, K, d, a), X)
    np.testing.assert_allclose(E, base + slope * (n - (K - 1) / 2 + a * d), atol=1e-8)
    E_match = W.apply(W.extra(n, K, d, (K - 1) / (2 * d)), X)
    np.testing.assert_allclose(E_match, X[-1], atol=1e-9)
    if K >= 2:
        T = W.apply(W.trend(n, K, ahead=a), X)
        np.testing.assert_allclose(T, base + slope * (n + a), atol=1e-8)


@settings(max_examples=40, deadline=None)
@given(K=st.integers(2, 8), seed=st.integers(0, 10**6))
def test_sma_is_linear_and_permutation_invariant_inside_window(K, seed):
    rng = np.random.default_rng(seed)
    n = K + 3
    X, Y = rng.normal(size=(n, 5)), rng.normal(size=(n, 5))
    w = W.sma(n, K)
    np.testing.assert_allclose(W.apply(w, 2 * X - 3 * Y), 2 * W.apply(w, X) - 3 * W.apply(w, Y), atol=1e-12)
    perm = np.concatenate([np.arange(n - K), n - K + rng.permutation(K)])
    np.testing.assert_allclose(W.apply(w, X[perm]), W.apply(w, X), atol=1e-12)


def test_translation_equivariance_and_torch_apply():
    X = torch.randn(3, 7, 4, dtype=torch.float64)
    shift = torch.randn(4, dtype=torch.float64)
    w = W.extra(7, 3, 2, 1.5)
    np.testing.assert_allclose(W.apply(w, X + shift), W.apply(w, X) + shift, atol=1e-12)
    out = W.apply(w, X)
    assert out.shape == (3, 4) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), W.apply(w, X.numpy()), atol=1e-12)
    rows = W.apply(W.merge_matrix(7, 3), X)
    assert rows.shape == (3, 5, 4)


def test_ema_weights_match_the_recursion():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(9, 3))
    beta = 0.7
    m = X[0].copy()
    for x in X[1:]:
        m = beta * m + (1 - beta) * x
    np.testing.assert_allclose(W.apply(W.ema(9, beta), X), m, atol=1e-12)


def test_lag_of_sma_and_extra():
    assert W.lag(W.sma(10, 5)) == pytest.approx(2.0)
    assert W.lag(W.extra(10, 5, 4, 0.5)) == pytest.approx(2.0 - 0.5 * 4)


def test_trend_with_uneven_steps_fits_the_line():
    steps = np.array([0.0, 100.0, 250.0, 300.0, 700.0])
    X = 2.0 + 0.01 * steps
    assert W.apply(W.trend(5, 5, ahead=100.0, steps=steps), X[:, None])[0] == pytest.approx(2.0 + 0.01 * 800)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: W.sma(5, 0), "window"),
        (lambda: W.sma(3, 4), "at least 4"),
        (lambda: W.extra(6, 4, 3, 0.5), "at least 7"),
        (lambda: W.extra(8, 4, -1, 0.5), "offset"),
        (lambda: W.ema(5, 1.0), "decay"),
        (lambda: W.ema(5, float("nan")), "decay"),
        (lambda: W.extra(8, 4, 2, float("nan")), "alpha"),
        (lambda: W.trend(5, 1, ahead=1.0), "window"),
        (lambda: W.custom([0.5, float("inf")]), "finite"),
    ],
)
def test_bad_input_names_the_parameter(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_custom_reports_affinity():
    assert W.custom([0.25, 0.75])[1] is True
    assert W.custom([0.5, 0.75])[1] is False
