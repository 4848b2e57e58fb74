"""Trajectory diagnostics (extramerge.trajectory) on known geometry."""

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from extramerge import trajectory as T
from extramerge.io import load_checkpoints
from extramerge.trajectory import gram as TG
from extramerge.trajectory import gram_pass
from rivervalley import analysis as A
from rivervalley import weights as W


def _gram_data(tensors_by_name: dict[str, np.ndarray], reference=-1) -> T.GramData:
    """GramData of in-memory trajectories {name: [N, ...]}: written as N safetensors files (in a temporary
    folder) and read by the streaming pass itself, inline."""
    n = len(next(iter(tensors_by_name.values())))
    with tempfile.TemporaryDirectory() as d:
        paths = [Path(d) / f"step_{k + 1:06d}.safetensors" for k in range(n)]
        for k, path in enumerate(paths):
            save_file({name: np.ascontiguousarray(X[k]) for name, X in tensors_by_name.items()}, path)
        ckpts = load_checkpoints([str(p) for p in paths])
        try:
            return gram_pass(ckpts, reference=reference, progress=False, workers=0)
        finally:
            for c in ckpts:
                c.close()


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
    frozen_at, moving_at = data.names.index("frozen"), data.names.index("moving")
    assert pt["fve1"]["raw"][frozen_at] is None and pt["fve1"]["raw"][moving_at] > 0.99
    assert pt["variance_share"][moving_at] == 1.0 and pt["variance_share"][frozen_at] == 0.0


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
