"""The Gram pass's block kernels against the definition: Σ (x_i − x_ref)(x_j − x_ref) in float64 over explicit
differences, and ‖x_ref‖², for lengths that fill no block, one block and several with a remainder; the
compiled kernel (rivervalley/_native/gram.c) against the numpy path, and the pass with the kernel against
the pass without it."""

import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch

from extramerge.engine.units import Scratch
from extramerge.trajectory import gram as G
from rivervalley.common import native

BF16 = ml_dtypes.bfloat16
LIB = G._kernel()
needs_kernel = pytest.mark.skipif(LIB is None, reason=f"no gram kernel: {native.gram_kernel_status()}")
PATHS = [pytest.param(None, id="numpy"), pytest.param(LIB, id="kernel", marks=needs_kernel)]


def _explicit(xs, ref):
    others = [j for j in range(len(xs)) if j != ref]
    X = np.stack([x.astype(np.float64) for x in xs])
    D = X[others] - X[ref]
    return D @ D.T, float(X[ref] @ X[ref])


def _trajectory(m, n, dtype, seed):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(m)
    return [(base + 1e-3 * k * rng.standard_normal(m)).astype(dtype) for k in range(n)]


@pytest.mark.parametrize("lib", PATHS)
@pytest.mark.parametrize("m", [1, 63, 64, 8192 + 5, 3 * G._GEMM_COLS * 9 + 17])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16])
@pytest.mark.parametrize("n,ref", [(2, 1), (5, 0), (8, 7), (16, 3)])
def test_segment_gram_is_the_gram_of_the_differences(m, dtype, n, ref, lib):
    xs = _trajectory(m, n, dtype, m + n)
    want, want_r2 = _explicit(xs, ref)
    got, r2 = G._segment_gram(xs, ref, Scratch(), lib)
    assert got.shape == (n - 1, n - 1)
    assert np.allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    assert r2 == pytest.approx(want_r2, rel=1e-12)
    full = G._embed(got, ref)
    assert np.array_equal(full, full.T) and not full[ref].any() and not full[:, ref].any()


@needs_kernel
@pytest.mark.parametrize("m", [1, 3, 17, 255, 257, 4099, 100_003])
@pytest.mark.parametrize("dtype", [np.float32, BF16, np.float16, np.float64])
@pytest.mark.parametrize("n", [2, 3, 8, 16])
def test_kernel_agrees_with_numpy(m, dtype, n):
    xs = _trajectory(m, n, dtype, 7 * m + n)
    for ref in sorted({0, n // 2, n - 1}):
        a, ra = G._segment_gram(xs, ref, Scratch(), LIB)
        b, rb = G._segment_gram(xs, ref, Scratch(), None)
        assert np.allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max())
        assert ra == pytest.approx(rb, rel=1e-12)


@needs_kernel
def test_kernel_widens_every_float16_and_bfloat16_value_exactly():
    """All 65536 bit patterns but NaN (subnormals, ±0, the extremes, ±Inf on their own): one checkpoint
    holds the pattern, the other zero, so the blocks are exact sums of squares."""
    bits = np.arange(2**16, dtype=np.uint16)
    for dtype, subnormals in ((np.float16, 0x0400), (BF16, 0x0080)):
        x = bits.view(dtype)
        with np.errstate(invalid="ignore"):
            x = x[np.isfinite(x.astype(np.float64))]
        for v in (x, bits[: subnormals + 1].view(dtype)):  # all, then the subnormals and the first normal
            want = float(np.sum(v.astype(np.float64) ** 2))  # every square fits float64's range
            got, r2 = G._segment_gram([v, np.zeros_like(v)], 1, Scratch(), LIB)
            assert got[0, 0] == pytest.approx(want, rel=1e-14) and r2 == 0.0
        for v in (x[:7], x[-9:]):  # each value on its own
            for e in v:
                g, _ = G._segment_gram([np.asarray([e]), np.zeros(1, dtype)], 1, Scratch(), LIB)
                assert g[0, 0] == float(e) ** 2
        for special in (np.inf, -np.inf, np.nan):
            g, _ = G._segment_gram([np.asarray([special], dtype), np.zeros(1, dtype)], 1, Scratch(), LIB)
            assert not np.isfinite(g[0, 0])


@needs_kernel
def test_kernel_takes_mixed_dtypes_and_leaves_odd_arrays_to_numpy():
    xs = _trajectory(1001, 4, np.float32, 1)
    mixed = [xs[0], xs[1].astype(BF16), xs[2].astype(np.float16), xs[3].astype(np.float64)]
    a, ra = G._segment_gram(mixed, 3, Scratch(), LIB)
    b, rb = _explicit(mixed, 3)
    assert np.allclose(a, b, rtol=1e-12) and ra == pytest.approx(rb, rel=1e-12)
    raw = np.zeros(4 * 1001 + 1, np.uint8)
    misaligned = raw[1:].view(np.float32)
    misaligned[:] = xs[0]
    assert native.gram_of_differences(LIB, [misaligned, xs[1]], 1) is None
    assert native.gram_of_differences(LIB, [xs[0][::2], xs[1][::2]], 1) is None
    assert native.gram_of_differences(LIB, [xs[0].astype(np.int32), xs[1].astype(np.int32)], 1) is None
    got, _ = G._segment_gram([misaligned, xs[1]], 1, Scratch(), LIB)  # numpy then
    assert np.allclose(got, _explicit([misaligned, xs[1]], 1)[0], rtol=1e-12)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gram_pass_with_and_without_the_kernel(tmp_path, monkeypatch, dtype):
    """The whole pass: the kernel's and numpy's blocks agree to 1e-12; with the kernel, forked workers and
    the inline pass are bit-identical (the blocks are added in unit order either way)."""
    from _ckpt_factory import make_safetensors_files

    from extramerge.io import load_checkpoints

    ckpts = load_checkpoints(make_safetensors_files(tmp_path, n=6, dtype=dtype, noise=0.3))
    monkeypatch.setattr(G, "_UNIT_BYTES", 256)
    monkeypatch.setattr(G, "can_fork", lambda: True)
    forked = G.gram_pass(ckpts, progress=False, workers=2)
    inline = G.gram_pass(ckpts, progress=False, workers=0)
    monkeypatch.setattr(G, "_kernel", lambda: None)
    plain = G.gram_pass(ckpts, progress=False, workers=2)
    for field in ("gram", "per_tensor", "ref_norm2"):
        assert np.array_equal(getattr(forked, field), getattr(inline, field)), field
        a, b = getattr(forked, field), getattr(plain, field)
        assert np.allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max()), field


@needs_kernel
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_kernel_path_names_the_tensor_and_file_of_a_nan_or_inf(tmp_path, monkeypatch, bad):
    from _ckpt_factory import load_state, make_safetensors_files
    from safetensors.torch import save_file

    from extramerge.io import CheckpointError, load_checkpoints

    paths = make_safetensors_files(tmp_path, n=3)
    state = load_state(paths[2])  # the reference: its value reaches every difference
    state["transformer.h.0.mlp.c_fc.weight"][1, 5] = bad
    save_file(state, str(paths[2]))
    msg = "'transformer.h.0.mlp.c_fc.weight' in step_000300.* NaN or Inf"
    for workers in (0, 2):
        with pytest.raises(CheckpointError, match=msg):
            G.gram_pass(load_checkpoints(paths), progress=False, workers=workers)


def test_analyze_falls_back_to_numpy_when_the_kernel_is_disabled(tmp_path):
    """RIVERVALLEY_NATIVE=0: no kernel, the numpy path, the same Gram matrix (to 1e-12) as this process's
    pass (with the kernel where it builds)."""
    from _ckpt_factory import make_safetensors_files

    from extramerge.io import load_checkpoints

    paths = make_safetensors_files(tmp_path / "ck", n=4, noise=0.3)
    want = G.gram_pass(load_checkpoints(paths), progress=False, workers=0).gram
    code = (
        "import sys, numpy as np\n"
        "from extramerge.io import load_checkpoints\n"
        "from extramerge.trajectory import gram as G\n"
        "from rivervalley.common import native\n"
        "assert G._kernel() is None and 'RIVERVALLEY_NATIVE=0' in native.gram_kernel_status()['detail']\n"
        "g = G.gram_pass(load_checkpoints(sys.argv[2:]), progress=False, workers=2).gram\n"
        "np.save(sys.argv[1], g)\n"
    )
    env = {**os.environ, "RIVERVALLEY_NATIVE": "0", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = tmp_path / "g.npy"
    p = subprocess.run(
        [sys.executable, "-c", code, str(out), *map(str, paths)], env=env, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    got = np.load(out)
    assert np.allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


@needs_kernel
def test_every_flag_set_builds_a_kernel_that_agrees(tmp_path, monkeypatch):
    """The loader falls back to plainer flags (no -march=native; -O2) where a set fails: each one gives the
    same blocks (to 1e-12) as numpy."""
    import dataclasses

    from rivervalley import _native as rn

    monkeypatch.setenv("RIVERVALLEY_CACHE", str(tmp_path / "cache"))
    xs = _trajectory(4099, 8, np.float32, 3)
    want, want_r2 = _explicit(xs, 2)
    for flags in rn.GRAM.flag_sets:
        lib, detail = rn._load(dataclasses.replace(rn.GRAM, flag_sets=(flags,)))
        assert lib is not None, detail
        got, r2 = native.gram_of_differences(lib, xs, 2)
        assert np.allclose(got, want, rtol=1e-12) and r2 == pytest.approx(want_r2, rel=1e-12)
