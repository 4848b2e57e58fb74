"""The Gram pass's block kernel against the definition: Σ (x_i − x_ref)(x_j − x_ref) in float64 over explicit
differences, and ‖x_ref‖², for lengths that fill no block, one block and several with a remainder."""

import numpy as np
import pytest

from extramerge.engine.units import Scratch
from extramerge.trajectory import gram as G


@pytest.mark.parametrize("m", [1, 63, 64, 8192 + 5, 3 * G._GEMM_COLS * 9 + 17])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("n,ref", [(2, 1), (5, 0), (8, 7)])
def test_segment_gram_is_the_gram_of_the_differences(m, dtype, n, ref):
    rng = np.random.default_rng(m + n)
    base = rng.standard_normal(m)
    xs = [(base + 1e-3 * k * rng.standard_normal(m)).astype(dtype) for k in range(n)]
    others = [j for j in range(n) if j != ref]
    X = np.stack([x.astype(np.float64) for x in xs])
    D = X[others] - X[ref]
    want, want_r2 = D @ D.T, float(X[ref] @ X[ref])
    got, r2 = G._segment_gram(xs, ref, Scratch())
    assert got.shape == (n - 1, n - 1)
    assert np.allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    assert r2 == pytest.approx(want_r2, rel=1e-12)
    full = G._embed(got, ref)
    assert np.array_equal(full, full.T) and not full[ref].any() and not full[:, ref].any()
