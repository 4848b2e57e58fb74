"""Gram-matrix geometry: invariant 7 (FVE_1 bounds and invariances) and the PC1 extrapolation."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from rivervalley import analysis as A
from rivervalley import weights as W


def _random_orthogonal(p, rng):
    q, r = np.linalg.qr(rng.normal(size=(p, p)))
    return q * np.sign(np.diag(r))


@settings(max_examples=50, deadline=None)
@given(n=st.integers(2, 10), p=st.integers(1, 8), seed=st.integers(0, 10**6))
def test_fve1_bounds_and_invariances(n, p, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p)) * rng.uniform(0.1, 3, size=p)
    f = A.fve1(A.gram(X))
    assert 1.0 / min(p, n - 1) - 1e-9 <= f <= 1 + 1e-12
    Q = _random_orthogonal(p, rng)
    shift = rng.normal(size=p) * 10
    np.testing.assert_allclose(A.fve1(A.gram(X @ Q + shift)), f, atol=1e-8)
    Xc = X - X.mean(0)
    axis_share = (Xc**2).sum(0) / (Xc**2).sum()
    assert f >= axis_share.max() - 1e-9


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 12), K=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_exact_line_is_rank_one_raw_and_merged(n, K, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=6), rng.normal(size=6)
    X = a + b * np.arange(n)[:, None]
    G = A.gram(X)
    assert abs(A.fve1(G) - 1) < 1e-9
    if n - K + 1 >= 2:
        assert abs(A.fve1(A.merged_gram(G, W.merge_matrix(n, K))) - 1) < 1e-9


def test_merged_gram_equals_gram_of_merged_rows():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(9, 20))
    Wm = W.merge_matrix(9, 4)
    np.testing.assert_allclose(A.merged_gram(A.gram(X), Wm), A.gram(Wm @ X), atol=1e-10)


def test_spectrum_matches_numpy_pca_and_batches():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(3, 8, 30))
    G = A.gram(X)
    vals = A.pca_spectrum(G)
    for s in range(3):
        Xc = X[s] - X[s].mean(0)
        sv = np.linalg.svd(Xc, compute_uv=False) ** 2
        np.testing.assert_allclose(vals[s][: len(sv)], sv[: vals.shape[-1]], atol=1e-9)
    assert A.fve1(G).shape == (3,)


def test_pc_scores_reproduce_centred_distances():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(6, 3))
    scores, _ = A.pc_scores(A.gram(X), k=3)
    Xc = X - X.mean(0)
    np.testing.assert_allclose(scores @ scores.T, Xc @ Xc.T, atol=1e-9)


def test_displacement_cosines():
    X = np.array([[0.0, 0], [1, 0], [2, 0], [2, 1]])
    np.testing.assert_allclose(A.displacement_cosines(A.gram(X)), [1.0, 0.0], atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(3, 10), K=st.integers(1, 3), ahead=st.floats(-2, 4), seed=st.integers(0, 10**6))
def test_pc1_trend_is_affine_and_exact_on_lines(n, K, ahead, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=5), rng.normal(size=5)
    X = a + b * np.arange(1, n + 1)[:, None]
    w = A.pc1_trend_weights(A.gram(X), window=K, ahead=ahead)
    assert abs(w.sum() - 1) < 1e-9
    np.testing.assert_allclose(w @ X, a + b * (n + ahead), atol=1e-7)


def test_pc1_trend_removes_lag_but_keeps_merge_noise_off_the_river():
    rng = np.random.default_rng(4)
    n, p = 12, 50
    X = np.outer(np.arange(n), np.eye(p)[0]) * 5.0 + rng.normal(size=(n, p)) * 0.1
    w = A.pc1_trend_weights(A.gram(X), window=4)
    river = (w @ X)[0]
    assert abs(river - 5.0 * (n - 1)) < 0.5  # SMA would sit 1.5 checkpoints (7.5) behind


def test_pc1_scores_point_along_the_direction_of_travel():
    rng = np.random.default_rng(5)
    X = np.arange(8)[:, None] * -rng.normal(size=(1, 6)) + rng.normal(size=(8, 6)) * 0.01
    scores, _ = A.pc_scores(A.gram(np.stack([X, X[::-1]])), k=2)
    assert np.all(np.diff(scores[..., 0], axis=-1) > 0)
