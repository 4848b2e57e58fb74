"""The compiled noise kernel (rivervalley._native): Philox4x32-10 known answers, an independent numpy
reference of the whole generator (counter layout, Box-Muller), thread independence, the fused update, the
distribution, the build and its fallback, and the simulator's use of it."""

import math
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from rivervalley import _native
from rivervalley.landscapes import QuadraticRiverValley
from rivervalley.simulate import simulate

F64 = torch.float64

if shutil.which(os.environ.get("CC") or "cc") is None or os.environ.get("RIVERVALLEY_NATIVE") == "0":
    pytest.skip("no C compiler, or RIVERVALLEY_NATIVE=0: no native kernel", allow_module_level=True)


def test_kernel_builds_and_loads():
    st = _native.status()
    assert st["available"], st["detail"]


# --------------------------------------------------------------------------------------------------
# the generator, bit for bit and against an independent reference

# Random123 tests/kat_vectors, the three "philox4x32 10" lines: counter[4], key[2] -> result[4]
KAT = [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    (
        [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
        [0xA4093822, 0x299F31D0],
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
    ),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    assert _native.philox4x32_10(ctr, key) == expected


_U32 = np.uint64(0xFFFFFFFF)


def _philox_np(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on numpy uint64 arrays holding 32-bit words (Salmon et al. 2011)."""
    c = [np.asarray(x, dtype=np.uint64) for x in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & _U32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & _U32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & _U32, (k1 + np.uint64(0xBB67AE85)) & _U32
    return c


def _reference_normals(key: int, draw: int, rows: int, cols: int, row0: int = 0) -> np.ndarray:
    """The layout of noise.c in float64: column j of tile j // 64 is word (j % 64) // 16 of Philox block
    (j // 64)·16 + j % 16 with counter {block, row, draw_lo, draw_hi}; words (0, 1) and (2, 3) are
    Box-Muller pairs giving (r cos θ, r sin θ)."""
    j = np.arange(cols)
    word, lane = (j % 64) // 16, j % 16
    block = (j // 64) * 16 + lane
    rows_ = np.arange(row0, row0 + rows)[:, None]
    shape = (rows, cols)
    w = _philox_np(
        np.broadcast_to(block, shape),
        np.broadcast_to(rows_, shape),
        draw & 0xFFFFFFFF,
        draw >> 32,
        key & 0xFFFFFFFF,
        key >> 32,
    )
    w = [x.astype(np.float64) for x in w]
    first = word < 2
    u1 = (np.floor(np.where(first, w[0], w[2]) / 256) + 1) * 2.0**-24
    theta = 2 * np.pi * np.floor(np.where(first, w[1], w[3]) / 256) * 2.0**-24
    r = np.sqrt(-2 * np.log(u1))
    return np.where(word % 2 == 0, r * np.cos(theta), r * np.sin(theta))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cols", [1, 63, 64, 200])
def test_normals_match_an_independent_reference(dtype, cols):
    """Every draw equals the float64 reference to float32 accuracy: the counter layout (tiles, lanes,
    words, rows, 64-bit draw counter, 64-bit key) and the transform are what noise.c documents."""
    key = (0xBEEF << 40) + 12345
    src = _native.PhiloxNormals(key, threads=2)
    src.draws = (1 << 33) + 5  # the high word of the draw counter is used
    out = torch.empty(37, cols, dtype=dtype)
    src.fill(out)
    ref = _reference_normals(key, (1 << 33) + 5, 37, cols)
    err = np.abs(out.double().numpy() - ref) / (1 + np.abs(ref))
    assert err.max() < 1e-6
    # the next call uses the next draw counter
    src.fill(out)
    assert np.abs(out.double().numpy() - _reference_normals(key, (1 << 33) + 6, 37, cols)).max() < 1e-5


def test_numbers_do_not_depend_on_threads_or_on_which_rows_a_call_covers():
    a = torch.empty(300, 130, dtype=F64)
    outs = []
    for threads in (1, 2, 3, 7):
        _native.PhiloxNormals(99, threads=threads).fill(a)
        outs.append(a.clone())
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    # rows 100..199 of a [300, p] draw equal the reference rows 100..199
    ref = _reference_normals(99, 0, 100, 130, row0=100)
    assert np.abs(outs[0][100:200].numpy() - ref).max() < 1e-5


def test_fused_update_equals_separate_draw_and_update():
    """x ← a ⊙ x + b + c ⊙ ξ uses the normals that fill() gives for the same draw; copy gets the result."""
    gen = torch.Generator().manual_seed(0)
    s, p = 50, 150
    x = torch.randn(s, p, generator=gen, dtype=F64)
    a, b, c = (torch.randn(p, generator=gen, dtype=F64) for _ in range(3))
    xi = _native.PhiloxNormals(5).fill(torch.empty(s, p, dtype=F64))
    expected = a * x + b + c * xi
    slots = torch.zeros(s, 3, p, dtype=F64)  # a strided destination, like a checkpoint slot
    src = _native.PhiloxNormals(5)
    out = src.affine(x, a, b, c, copy=slots[:, 1])
    assert out is x
    torch.testing.assert_close(x, expected, rtol=1e-14, atol=1e-14)
    assert torch.equal(slots[:, 1], x)
    assert not slots[:, 0].any() and not slots[:, 2].any()
    # float32, on a later draw
    x32, a32, b32, c32 = x.float(), a.float(), b.float(), c.float()
    draw, fused = _native.PhiloxNormals(5), _native.PhiloxNormals(5)
    draw.draws = fused.draws = 3
    xi32 = draw.fill(torch.empty(s, p))
    torch.testing.assert_close(fused.affine(x32.clone(), a32, b32, c32), a32 * x32 + b32 + c32 * xi32)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_multi_step_kernel_equals_one_step_at_a_time(dtype):
    """sgd_steps over n steps (draws d .. d+n−1, one call, rows in parallel) equals n single-step affine
    updates with a = 1 − η_t h, b = η_t g, c = −η_t sd on the same draws, and streams its result to copy."""
    gen = torch.Generator().manual_seed(1)
    s, p, n = 257, 200, 7  # s·p·n > 2^15: the rows are split across threads
    x0 = torch.randn(s, p, generator=gen, dtype=F64).to(dtype)
    h = torch.rand(p, generator=gen, dtype=F64).to(dtype)
    g = torch.zeros(p, dtype=dtype)
    g[0] = 0.7
    sd = torch.rand(p, generator=gen, dtype=F64).to(dtype)
    lrs = torch.linspace(0.3, 0.1, n, dtype=F64)
    fused, stepwise = _native.PhiloxNormals(3, threads=2), _native.PhiloxNormals(3, threads=1)
    fused.draws = stepwise.draws = 11
    slots = torch.zeros(s, 2, p, dtype=dtype)
    x = fused.sgd_steps(x0.clone(), h, g, sd, lrs, copy=slots[:, 1])
    y = x0.clone()
    for lr in lrs.tolist():
        stepwise.affine(
            y, (1 - lr * h.double()).to(dtype), (lr * g.double()).to(dtype), (-lr * sd.double()).to(dtype)
        )
    assert fused.draws == stepwise.draws == 11 + n
    tol = 1e-12 if dtype == F64 else 1e-5
    torch.testing.assert_close(x, y, rtol=tol, atol=tol)
    assert torch.equal(slots[:, 1], x) and not slots[:, 0].any()
    three = _native.PhiloxNormals(3, threads=3)
    three.draws = 11
    assert torch.equal(three.sgd_steps(x0.clone(), h, g, sd, lrs), x)  # any thread split, same bits
    with pytest.raises(ValueError, match="^lrs:"):
        fused.sgd_steps(x, h, g, sd, lrs.float())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("p", [128, 130])
def test_jumps_kernel_streams_each_result_to_its_slot(dtype, p):
    """n jumps in one call equal n single affine updates, and slot k holds the k-th result; p = 128 takes
    the aligned non-temporal stores for both dtypes, p = 130 the unaligned rows and the column tail."""
    gen = torch.Generator().manual_seed(2)
    s, n = 300, 5
    x0 = torch.randn(s, p, generator=gen, dtype=F64).to(dtype)
    a, b, c = (torch.randn(p, generator=gen, dtype=F64).to(dtype) for _ in range(3))
    out = torch.full((s, n + 1, p), math.nan, dtype=dtype)
    x = _native.PhiloxNormals(8, threads=2).jumps(x0.clone(), a, b, c, out[:, 1:])
    ref, y = _native.PhiloxNormals(8, threads=1), x0.clone()
    for k in range(n):
        ref.affine(y, a, b, c)
        assert torch.equal(out[:, k + 1], y)
    assert torch.equal(x, y) and out[:, 0].isnan().all()


def _packed(x0, vecs):
    """``vecs`` and then ``x0``'s rows, back to back in one buffer: x's row 0 starts right after the last
    vector, where gcc's run-time overlap check sends the update loop to its scalar copy."""
    p = x0.shape[1]
    buf = torch.empty(len(vecs) * p + x0.numel(), dtype=x0.dtype)
    parts = [buf[k * p : (k + 1) * p].copy_(v) for k, v in enumerate(vecs)]
    return buf[len(vecs) * p :].view_as(x0).copy_(x0), parts


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("p", [3, 4, 5, 67])
def test_updates_do_not_depend_on_threads_or_on_where_the_tensors_lie(dtype, p):
    """Every row gets the same bits whichever thread runs it and wherever x and the coefficient vectors
    lie in memory: a row right after a vector once took gcc's scalar loop, which contracted
    a x + b + c ξ into FMAs differently from the vector loop (1 ulp apart, a flaky simulator test)."""
    gen = torch.Generator().manual_seed(p)
    s, n = 263, 19  # odd rows, s·p·n ≥ 2^15 for p ≥ 7: split across threads
    x0 = torch.randn(s, p, generator=gen, dtype=F64).to(dtype)
    a, b, c = (torch.randn(p, generator=gen, dtype=F64).to(dtype) for _ in range(3))
    h, sd = a.abs(), c.abs()
    lrs = torch.linspace(0.3, 0.1, n, dtype=F64)
    ref = _native.PhiloxNormals(4, threads=1)
    jumps_ref = torch.empty(s, n, p, dtype=dtype)
    x_jumps = ref.jumps(x0.clone(), a, b, c, jumps_ref)
    x_affine = ref.affine(x0.clone(), a, b, c)
    x_sgd = ref.sgd_steps(x0.clone(), h, b, sd, lrs)
    for threads in (1, 2, 3):
        src = _native.PhiloxNormals(4, threads=threads)
        x, (pa, pb, pc) = _packed(x0, (a, b, c))
        out = torch.full((s, n, p), math.nan, dtype=dtype)
        assert torch.equal(src.jumps(x, pa, pb, pc, out), x_jumps)
        assert torch.equal(out, jumps_ref)
        x, (pa, pb, pc) = _packed(x0, (a, b, c))
        assert torch.equal(src.affine(x, pa, pb, pc), x_affine)
        x, (ph, pg, psd) = _packed(x0, (h, b, sd))
        assert torch.equal(src.sgd_steps(x, ph, pg, psd, lrs), x_sgd)
        # and in separate allocations, on any thread split
        src.draws = 0
        assert torch.equal(src.jumps(x0.clone(), a, b, c, out), x_jumps)


def test_loss_curve_and_checkpoints_on_the_native_path():
    """Loss records and checkpoints cut the native multi-step calls into segments: a record at a checkpoint
    step is that checkpoint's mean loss exactly, the records land on the same steps as on the torch path,
    and the checkpoint losses agree with the torch path in distribution."""
    q = QuadraticRiverValley(slope=0.5, curvatures=[0.5, 2.0])
    kw = dict(steps=30, lr=0.2, noise=1.0, seeds=4000, ckpt_every=7, record_loss_every=7)
    a = simulate(q, noise_backend="native", seed=1, **kw)
    b = simulate(q, noise_backend="torch", seed=1, **kw)
    assert a.loss_steps.tolist() == b.loss_steps.tolist() == a.ckpt_steps.tolist() == [0, 7, 14, 21, 28]
    np.testing.assert_allclose(a.loss_curve, a.ckpt_loss.mean(0).numpy(), rtol=1e-12, atol=1e-12)
    la, lb = a.ckpt_loss[:, 1:], b.ckpt_loss[:, 1:]
    se = torch.sqrt(la.var(0) / la.shape[0] + lb.var(0) / lb.shape[0])
    assert ((la.mean(0) - lb.mean(0)).abs() / se).max() < 5
    off = simulate(q, noise_backend="native", seed=1, **{**kw, "ckpt_from": 3})  # records between checkpoints
    assert off.loss_steps.tolist() == list(range(0, 31, 7)) and off.ckpt_steps.tolist() == [3, 10, 17, 24]
    assert torch.equal(off.final, a.final)  # the same 30 draws, however the calls are cut


def test_denormals_are_flushed_in_every_thread_and_the_caller_setting_restored():
    """A row gives the same numbers on any thread: the kernels flush denormals themselves (the simulator
    flushes them only in its own thread), then restore the caller's floating-point mode."""
    x0 = torch.full((64, 1024), 1e-300, dtype=F64)
    a = torch.full((1024,), 1e-10, dtype=F64)  # a·x = 1e-310: a denormal
    zero = torch.zeros(1024, dtype=F64)
    for threads in (1, 2):
        x = _native.PhiloxNormals(0, threads=threads).affine(x0.clone(), a, zero, zero)
        assert not x.any()
    tiny = torch.tensor([1e-310], dtype=F64)
    assert float(tiny * 1.0) != 0.0  # this thread is back to IEEE behaviour


def test_bad_arguments_name_the_tensor():
    src = _native.PhiloxNormals(1)
    x = torch.zeros(4, 8, dtype=F64)
    v = torch.zeros(8, dtype=F64)
    with pytest.raises(ValueError, match="^a:"):
        src.affine(x, torch.zeros(7, dtype=F64), v, v)
    with pytest.raises(ValueError, match="^c:"):
        src.affine(x, v, v, v.float())
    with pytest.raises(ValueError, match="^x:"):
        src.affine(x.t(), v, v, v)
    with pytest.raises(ValueError, match="^copy:"):
        src.affine(x, v, v, v, copy=torch.zeros(4, 8))
    with pytest.raises(ValueError, match="^out:"):
        src.fill(torch.zeros(4, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="^x: rows overlap"):
        src.affine(torch.zeros(8, dtype=F64).expand(4, 8), v, v, v)
    with pytest.raises(ValueError, match="^copy: must not overlap x"):
        src.affine(x, v, v, v, copy=x)
    with pytest.raises(ValueError, match="^out: must not overlap x"):
        big = torch.zeros(4, 3, 8, dtype=F64)
        src.jumps(big[:, 0], v, v, v, big[:, 1:])  # slot 0 is x itself: rows of x interleave with out
    with pytest.raises(ValueError, match="^out:"):
        src.jumps(x, v, v, v, torch.zeros(4, 2, 8, dtype=torch.float32))


def test_distribution_is_standard_normal():
    """2^21 draws: mean, variance, skewness, excess kurtosis and the tail masses beyond 2σ, 3σ and 4σ
    against N(0, 1) (z-scores); adjacent columns, tiles and rows uncorrelated; and the Box-Muller pairs
    have a uniform angle."""
    from scipy import stats

    x = _native.PhiloxNormals(2024).fill(torch.empty(1024, 2048, dtype=F64))
    v = x.flatten().numpy()
    n = v.size
    z = [
        v.mean() * math.sqrt(n),
        (v.var() - 1) / math.sqrt(2 / n),
        stats.skew(v) / math.sqrt(6 / n),
        stats.kurtosis(v) / math.sqrt(24 / n),
    ]
    for t in (2.0, 3.0, 4.0):
        pr = 2 * stats.norm.sf(t)
        z.append(((np.abs(v) > t).sum() - pr * n) / math.sqrt(pr * (1 - pr) * n))
    for da, db in [(x[:, :-1], x[:, 1:]), (x[:, :-16], x[:, 16:]), (x[:, :-64], x[:, 64:]), (x[:-1], x[1:])]:
        z.append(float((da * db).mean()) * math.sqrt(da.numel()))
    assert np.abs(z).max() < 5, z
    assert np.abs(v).max() < math.sqrt(2 * 24 * math.log(2)) + 1e-6  # the 24-bit uniforms' bound
    angle = np.arctan2(x[:, 16::64].flatten().numpy(), x[:, 0::64].flatten().numpy())
    assert stats.kstest((angle + np.pi) / (2 * np.pi), "uniform").pvalue > 1e-4


# --------------------------------------------------------------------------------------------------
# building, and falling back to torch


def test_build_into_a_fresh_cache_and_report_failures(tmp_path, monkeypatch):
    monkeypatch.setenv("RIVERVALLEY_CACHE", str(tmp_path / "cache"))
    lib, detail = _native._load()
    assert lib is not None, detail
    assert str(tmp_path / "cache") in detail
    built = list((tmp_path / "cache").glob("noise-*.so"))
    assert len(built) == 1
    assert not [p for p in (tmp_path / "cache").iterdir() if p not in built]  # no half-written leftovers
    # a file in the cache that does not load is rebuilt (atomically: a new file replaces it). A fresh
    # folder, since this process has the first file loaded and must not see it change under it.
    stale = tmp_path / "stale" / built[0].name
    stale.parent.mkdir(mode=0o700)
    stale.write_bytes(b"not a shared library")
    monkeypatch.setenv("RIVERVALLEY_CACHE", str(stale.parent))
    lib, detail = _native._load()
    assert lib is not None and str(stale) in detail and stale.stat().st_size > 1000
    # CC may carry arguments
    monkeypatch.setenv("CC", "cc -g0")
    lib, detail = _native._load()
    assert lib is not None and "compiled with cc -g0" in detail
    monkeypatch.delenv("CC")
    # a cache folder others can write to is refused (the library would run in this process)
    shared = tmp_path / "shared"
    (shared / "tmp" / f"rivervalley-{os.getuid()}").mkdir(parents=True)
    for d in (shared, shared / "tmp" / f"rivervalley-{os.getuid()}"):
        d.chmod(0o777)
    monkeypatch.setenv("RIVERVALLEY_CACHE", str(shared))
    monkeypatch.setattr(tempfile, "tempdir", str(shared / "tmp"))  # the fallback folder is shared too
    lib, detail = _native._load()
    assert lib is None and detail.count("not private to this user") == 2 * len(_native.FLAG_SETS)
    assert not list(shared.glob("*.so")) and not list(shared.glob("tmp/*/*"))
    monkeypatch.undo()
    monkeypatch.setenv("RIVERVALLEY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    lib, detail = _native._load()
    assert lib is None and "no C compiler" in detail
    # a compiler that runs but fails: every flag set is tried, the reason quotes it, nothing is left behind
    bad = tmp_path / "badcc"
    bad.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && { echo fakecc 1.0; exit 0; }\necho "fatal: no way" >&2\nexit 1\n'
    )
    bad.chmod(0o755)
    monkeypatch.setenv("CC", str(bad))
    monkeypatch.setenv("RIVERVALLEY_CACHE", str(tmp_path / "cache2"))
    lib, detail = _native._load()
    assert lib is None and detail.count("fatal: no way") == len(_native.FLAG_SETS)
    assert not any((tmp_path / "cache2").iterdir())
    monkeypatch.delenv("CC")
    monkeypatch.setenv("RIVERVALLEY_NATIVE", "0")
    lib, detail = _native._load()
    assert lib is None and "RIVERVALLEY_NATIVE=0" in detail


def test_simulator_falls_back_to_torch_without_the_kernel():
    code = (
        "import torch\n"
        "from rivervalley.landscapes import QuadraticRiverValley\n"
        "from rivervalley.simulate import simulate\n"
        "q = QuadraticRiverValley(slope=1.0, curvatures=[1.0, 2.0])\n"
        "r = simulate(q, steps=5, lr=0.1, noise=1.0, seeds=3)\n"
        "print(r.config['noise_backend'])\n"
        "try:\n"
        "    simulate(q, steps=5, lr=0.1, noise=1.0, noise_backend='native')\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    env = {**os.environ, "RIVERVALLEY_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == "torch"
    assert lines[1].startswith("noise_backend='native' is unavailable") and "RIVERVALLEY_NATIVE=0" in lines[1]


# --------------------------------------------------------------------------------------------------
# the simulator on the native backend


def test_backend_choice_is_recorded_and_validated():
    q = QuadraticRiverValley(slope=1.0, curvatures=[1.0, 2.0])
    kw = dict(steps=5, lr=0.1, noise=1.0, seeds=3)
    assert simulate(q, **kw).config["noise_backend"] == "native"
    assert simulate(q, noise_backend="torch", **kw).config["noise_backend"] == "torch"
    assert simulate(q, noise_dtype=F64, **kw).config["noise_backend"] == "torch"  # auto: full precision
    assert simulate(q, dtype=torch.float32, **kw).config["noise_backend"] == "native"
    with pytest.raises(ValueError, match="noise_backend must be one of"):
        simulate(q, noise_backend="gpu", **kw)
    with pytest.raises(ValueError, match="noise_dtype"):
        simulate(q, noise_backend="native", noise_dtype=F64, **kw)
    with pytest.raises(ValueError, match="float32/float64"):
        simulate(q, noise_backend="native", dtype=torch.bfloat16, **kw)


@pytest.mark.parametrize("exact", [False, True])
def test_zero_steps(exact):
    q = QuadraticRiverValley(slope=1.0, curvatures=[1.0, 2.0])
    init = torch.arange(9, dtype=F64).reshape(3, 3)
    for kw in ({}, {"ckpt_every": 1}):
        r = simulate(q, steps=0, lr=0.1, noise=1.0, seeds=3, exact=exact, init=init, **kw)
        assert r.config["noise_backend"] == "native" and torch.equal(r.final, init)
        assert r.checkpoints.shape == (3, len(kw), 3)
        if kw:
            assert torch.equal(r.checkpoints[:, 0], init)


@pytest.mark.parametrize("exact", [False, True])
def test_checkpoints_do_not_change_the_trajectory(exact):
    """Counter-based draws: one draw per step (per jump), so checkpointing every step or every other step
    gives the same θ at the common steps, bit for bit; writing into a reused ``out`` changes nothing."""
    q = QuadraticRiverValley(slope=1.0, curvatures=[0.5, 1.0, 3.0])
    kw = dict(steps=12, lr=0.2, noise=1.0, seeds=5, seed=4)
    if exact:  # jumps go checkpoint to checkpoint, so only the output buffer can vary
        a = simulate(q, exact=True, ckpt_every=2, **kw)
        assert torch.equal(a.final, a.checkpoints[:, -1])
        out = torch.full_like(a.checkpoints, math.nan)
        c = simulate(q, exact=True, ckpt_every=2, out=out, **kw)
        assert c.checkpoints is out and torch.equal(out, a.checkpoints)
        return
    a = simulate(q, ckpt_every=1, **kw)
    b = simulate(q, ckpt_every=2, **kw)
    assert torch.equal(a.checkpoints[:, ::2], b.checkpoints)
    odd = simulate(q, ckpt_every=3, ckpt_from=1, **kw)  # steps 1, 4, 7, 10
    assert odd.ckpt_steps.tolist() == [1, 4, 7, 10]
    assert torch.equal(a.checkpoints[:, 1::3], odd.checkpoints)
    assert torch.equal(a.final, a.checkpoints[:, -1]) and torch.equal(b.final, b.checkpoints[:, -1])
    out = torch.full_like(b.checkpoints, math.nan)
    c = simulate(q, ckpt_every=2, out=out, **kw)
    assert c.checkpoints is out and torch.equal(out, b.checkpoints)
    with pytest.raises(ValueError, match="^out must"):
        simulate(q, ckpt_every=2, out=out[:, 1:], **kw)


# --------------------------------------------------------------------------- the cache, bound to what loads


def _shared_lib(tmp_path, name: str, body: str):
    """Compile the C ``body`` into tmp_path/name (a shared library)."""
    src = tmp_path / f"{name}.c"
    src.write_text(body)
    out = tmp_path / name
    subprocess.run(["cc", "-shared", "-fPIC", str(src), "-o", str(out)], check=True, capture_output=True)
    out.chmod(0o700)
    return out


_CTOR = (
    "#include <fcntl.h>\n#include <stdlib.h>\n#include <unistd.h>\n"
    '__attribute__((constructor)) static void ran(void) { close(open(getenv("RV_TEST_MARK"), '
    "O_CREAT | O_WRONLY, 0600)); }\n"
)


def test_a_library_swapped_after_its_check_is_not_the_one_loaded(tmp_path, monkeypatch):
    """Issue 21 item 4: the library is checked on a descriptor and loaded through it (/proc/self/fd/N).
    The hook swaps a foreign library in between the check and the load: loaded by path, its constructor
    ran in this process."""
    import ctypes

    from _race import can_exchange, exchange

    if not can_exchange(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) unavailable")
    cache = tmp_path / "cache"
    monkeypatch.setenv("RIVERVALLEY_CACHE", str(cache))
    assert _native._load()[0] is not None
    (built,) = cache.glob("noise-*.so")
    foreign = _shared_lib(tmp_path, "foreign.so", _CTOR)
    mark = tmp_path / "constructor-ran"
    monkeypatch.setenv("RV_TEST_MARK", str(mark))
    fresh = tmp_path / "fresh"  # a new file of the kernel: this process has not loaded it yet
    fresh.mkdir(mode=0o700)
    shutil.copy2(built, fresh / built.name)
    monkeypatch.setenv("RIVERVALLEY_CACHE", str(fresh))
    real, swapped = ctypes.CDLL, []

    def swap_then_load(name, *args, **kwargs):
        if not swapped and name != "None" and name is not None:
            exchange(fresh / built.name, foreign)  # the attacker's move, between check and load
            swapped.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(ctypes, "CDLL", swap_then_load)
    lib, detail = _native._load()
    assert swapped and lib is not None, detail
    assert not mark.exists()  # the foreign constructor never ran
    assert lib.rv_normal_f32 is not None


def test_a_cache_inside_a_folder_others_can_write_is_refused(tmp_path, monkeypatch):
    shared = tmp_path / "project"
    (shared / "cache").mkdir(parents=True, mode=0o700)
    shared.chmod(0o777)  # a shared project folder without the sticky bit
    monkeypatch.setenv("RIVERVALLEY_CACHE", str(shared / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(shared))  # the fallback folder is there too
    lib, detail = _native._load()
    assert lib is None and "others may write (no sticky bit)" in detail and str(shared) in detail
    assert not list(shared.rglob("*.so"))
    shared.chmod(0o1777)  # with the sticky bit (as /tmp): others cannot rename our folder away
    lib, detail = _native._load()
    assert lib is not None, detail


def test_a_stale_library_without_the_kernel_functions_is_rebuilt(tmp_path, monkeypatch):
    """Issue 21 item 12: a library in the cache that loads but lacks the kernel's symbols (an old build)
    gave an AttributeError traceback; it is rebuilt."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("RIVERVALLEY_CACHE", str(cache))
    assert _native._load()[0] is not None
    (built,) = cache.glob("noise-*.so")
    stale_dir = tmp_path / "stale"
    stale_dir.mkdir(mode=0o700)
    old = _shared_lib(tmp_path, "old.so", "int rv_something_else(void) { return 1; }\n")
    old.rename(stale_dir / built.name)
    monkeypatch.setenv("RIVERVALLEY_CACHE", str(stale_dir))
    lib, detail = _native._load()
    assert lib is not None and str(stale_dir / built.name) in detail, detail
    assert lib.rv_normal_f32 is not None
