"""Trajectory diagnostics (extramerge.trajectory) and α selection (extramerge.select) on known geometry."""

import math

import numpy as np
import pytest
import torch

from extramerge import select as S
from extramerge import trajectory as T
from extramerge.trajectory import gram as TG
from rivervalley import analysis as A
from rivervalley import weights as W


def _gram_data(tensors_by_name: dict[str, np.ndarray], reference=-1) -> T.GramData:
    """GramData from in-memory trajectories {name: [N, ...]} via the pass's own per-tensor kernel."""
    names, per, norms, numel = [], [], [], []
    for name, X in tensors_by_name.items():
        n = X.shape[0]
        G, r2 = TG._tensor_gram([torch.from_numpy(x) for x in X], range(n)[reference])
        names.append(name), per.append(G), norms.append(r2), numel.append(X[0].size)
    per = np.stack(per)
    return T.GramData(per.sum(0), names, per, np.array(numel), np.array(norms), range(n)[reference])


def _line(n, p, rng, slope=1.0):
    a, b = rng.normal(size=p), rng.normal(size=p) * slope
    return a + b * np.arange(n)[:, None]


def test_small_spread_float32_keeps_full_precision():
    # Late training: weights ~1, checkpoints differ by ~1e-4. The raw Gram is dominated by ‖θ‖² and
    # centring it cancels ~8 digits; the Gram of differences from a reference keeps them all.
    rng = np.random.default_rng(0)
    n, p = 8, 50_000
    X = (1 + 0.1 * rng.normal(size=p) + 1e-4 * rng.normal(size=(n, p))).astype(np.float32)
    X64 = X.astype(np.float64)
    exact = np.linalg.svd(X64 - X64.mean(0), compute_uv=False)[: n - 1] ** 2
    ours = A.pca_spectrum(_gram_data({"w": X}).gram)[: n - 1]
    raw = A.pca_spectrum(A.gram(X64))[: n - 1]
    assert np.max(np.abs(ours / exact - 1)) < 1e-10
    assert np.max(np.abs(raw / exact - 1)) > 1e-9  # the failure mode being avoided, even in float64
    first = A.pca_spectrum(_gram_data({"w": X}, reference=0).gram)[: n - 1]
    np.testing.assert_allclose(first, ours, rtol=1e-10)  # centring is invariant to the reference


def test_exact_line_is_rank_one_raw_and_merged():
    rng = np.random.default_rng(1)
    data = _gram_data({"a": _line(9, 30, rng), "b": _line(9, 12, rng).reshape(9, 3, 4)})
    rep = T.summarize(data, windows=(1, 2, 4, 8, 16))
    assert rep["windows"] == [1, 2, 4, 8] and rep["skipped_windows"] == [16]
    assert abs(rep["raw"]["fve1"] - 1) < 1e-9
    for g in rep["merged"].values():
        assert abs(g["fve1"] - 1) < 1e-9
        assert g["pc1_residual_std"] < 1e-9 * g["pc1_drift"]
        assert all(abs(c - 1) < 1e-9 for c in g["cosines"])
    # drift per checkpoint along PC1 is the line's speed, unchanged by SMA merging
    speed = math.sqrt(data.gram[1, 1] - 2 * data.gram[0, 1] + data.gram[0, 0])
    assert rep["raw"]["pc1_drift"] == pytest.approx(speed, rel=1e-9)
    assert rep["merged"]["4"]["pc1_drift"] == pytest.approx(speed, rel=1e-9)
    for fves in rep["per_tensor"]["fve1"].values():
        assert np.allclose(fves, 1, atol=1e-9)


def test_line_plus_noise_merging_raises_fve1():
    rng = np.random.default_rng(2)
    n, p = 24, 400
    X = _line(n, p, rng, slope=0.05) + 0.3 * rng.normal(size=(n, p))
    rep = T.summarize(_gram_data({"w": X}))
    f = [rep["raw"]["fve1"]] + [rep["merged"][k]["fve1"] for k in ("2", "4", "8")]
    assert f[0] < 0.8 and all(b > a for a, b in zip(f, f[1:], strict=False))
    assert rep["merged"]["8"]["mean_cosine"] > rep["raw"]["mean_cosine"]


def test_per_tensor_map_and_frozen_tensor():
    rng = np.random.default_rng(3)
    frozen = np.repeat(rng.normal(size=(1, 5)), 6, axis=0)
    data = _gram_data({"moving": _line(6, 7, rng), "frozen": frozen})
    np.testing.assert_allclose(data.per_tensor.sum(0), data.gram)
    pt = T.summarize(data, windows=(1, 2))["per_tensor"]
    assert pt["fve1"]["raw"][1] is None and pt["variance_share"] == [1.0, 0.0]


def test_project_scores_match_explicit_projection():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(7, 20)) + np.arange(7)[:, None] * rng.normal(size=20)
    G = A.gram(X)
    Xc = X - X.mean(0)
    _, _, Vt = np.linalg.svd(Xc, full_matrices=False)
    Wm = W.merge_matrix(7, 3)
    explicit = (Wm @ X - X.mean(0)) @ Vt[:2].T
    ours = T.project_scores(G, Wm, k=2)
    np.testing.assert_allclose(np.abs(ours), np.abs(explicit), atol=1e-9)
    raw = T.project_scores(G, np.eye(7), k=1)[:, 0]
    assert raw[-1] > raw[0]  # PC1 oriented along time


def test_gram_save_load_roundtrip(tmp_path):
    data = _gram_data({"w": _line(4, 5, np.random.default_rng(5))})
    data.paths, data.steps, data.skipped = ["a", "b", "c", "d"], [1, None, 3, 4], ["ids"]
    data.save(tmp_path / "gram.npz")
    back = T.load_gram(tmp_path / "gram.npz")
    np.testing.assert_array_equal(back.per_tensor, data.per_tensor)
    assert (back.paths, back.steps, back.skipped, back.names) == (data.paths, data.steps, ["ids"], ["w"])


# ------------------------------------------------------------------------------------------------ select


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
    est = S.estimate_river(A.gram(_ar1_trajectory(40, 3000, drift=2.0, V=9.0, rho=0.5, rng=rng)))
    assert est.drift == pytest.approx(2.0, rel=0.05)
    assert est.noise_var == pytest.approx(9.0, rel=0.1)
    assert est.rho == pytest.approx(0.5, abs=0.08)
    exact = S.estimate_river(A.gram(_line(5, 4, rng)))
    assert exact.noise_var < 1e-12 and exact.drift == pytest.approx(exact.drift_pc1)


def _expected_sq_error(w, estimate) -> float:
    """E‖wᵀθ − T‖² = ‖b‖² lag(w)² + V wᵀΓ(ρ)w: what alpha_geometric minimises (select's docstring)."""
    w = np.asarray(w, dtype=float)
    gamma = W.correlation_matrix(estimate.rho, w.size)
    return float(estimate.drift**2 * W.lag(w) ** 2 + estimate.noise_var * w @ gamma @ w)


def test_alpha_geometric_reduces_to_match_without_noise_and_minimises_error():
    est = S.RiverEstimate(drift=1.0, drift_pc1=1.0, noise_var=0.0, noise_std=0.0, rho=0.0, n=8)
    for K, d in [(4, 4), (5, 3), (1, 2)]:
        assert S.alpha_geometric(est, K, d) == pytest.approx(S.alpha_match(K, d))
    noisy = S.RiverEstimate(1.0, 1.0, 4.0, 2.0, 0.3, 8)
    a = S.alpha_geometric(noisy, 4, 4)
    assert 0 <= a < S.alpha_match(4, 4)  # noise pulls the estimate towards less extrapolation
    grid = np.linspace(-1, 2, 3001)
    errs = [_expected_sq_error(W.extra(8, 4, 4, x), noisy) for x in grid]
    assert a == pytest.approx(grid[int(np.argmin(errs))], abs=2e-3)


def test_the_expected_error_alpha_geometric_minimises_matches_monte_carlo():
    rng = np.random.default_rng(7)
    n, p, reps = 6, 20, 500
    est = S.RiverEstimate(0.5, 0.5, 2.0, math.sqrt(2.0), 0.4, n)
    w = W.extra(n, 3, 3, 0.5)
    a, b = rng.normal(size=p), np.full(p, 0.5 / math.sqrt(p))
    line = a + np.arange(1, n + 1)[:, None] * b
    sq = [np.sum((w @ (line + _ar1_noise(n, p, 2.0, 0.4, rng)) - line[-1]) ** 2) for _ in range(reps)]
    assert np.mean(sq) == pytest.approx(_expected_sq_error(w, est), rel=0.1)


def test_gram_pass_agrees_on_processes_threads_and_inline(tmp_path, monkeypatch):
    """Forked worker processes, worker threads and the inline pass add the same blocks in the same order:
    bit-for-bit equal Gram matrices, equal to an explicit float64 computation; bfloat16 inputs go through
    ml_dtypes. Small units make each worker handle several."""
    from _ckpt_factory import load_state, make_safetensors_files

    from extramerge.io import load_checkpoints

    paths = make_safetensors_files(tmp_path, n=5, dtype=torch.bfloat16, noise=0.3)
    ckpts = load_checkpoints(paths)
    monkeypatch.setattr(TG, "_UNIT_BYTES", 64)
    monkeypatch.setattr(TG, "can_fork", lambda: True)
    forked = T.gram_pass(ckpts, progress=False, workers=2)
    forked3 = T.gram_pass(ckpts, progress=False, workers=3)
    monkeypatch.setattr(TG, "can_fork", lambda: False)
    threads = T.gram_pass(ckpts, progress=False, workers=2)
    inline = T.gram_pass(ckpts, progress=False, workers=0)
    states = [load_state(p) for p in paths]
    X = np.stack([np.concatenate([s[k].double().reshape(-1).numpy() for k in inline.names]) for s in states])
    np.testing.assert_allclose(inline.gram, A.gram(X - X[-1]), rtol=1e-12, atol=1e-12)
    for g in (forked, forked3, threads):
        assert g.names == inline.names
        for field in ("gram", "per_tensor", "ref_norm2"):
            assert np.array_equal(getattr(g, field), getattr(inline, field)), field


def test_forked_gram_pass_reports_a_worker_error(tmp_path, monkeypatch):
    from _ckpt_factory import load_state, make_safetensors_files
    from safetensors.torch import save_file

    from extramerge.io import CheckpointError, load_checkpoints

    paths = make_safetensors_files(tmp_path, n=3)
    state = load_state(paths[1])
    state["transformer.h.0.mlp.c_fc.weight"][2, 3] = float("inf")
    save_file(state, str(paths[1]))
    monkeypatch.setattr(TG, "_UNIT_BYTES", 64)
    monkeypatch.setattr(TG, "can_fork", lambda: True)
    msg = "'transformer.h.0.mlp.c_fc.weight' in step_000200.* NaN or Inf"
    with pytest.raises(CheckpointError, match=msg):
        T.gram_pass(load_checkpoints(paths), progress=False, workers=2)
