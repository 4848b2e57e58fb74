"""The registry's decay and posthoc-ema methods through the Python API and the CLI on tiny safetensors
checkpoints: the merged tensors equal Σ w θ with the rivervalley.weights vector, merge.json records the
post-hoc fit's residual, and bad inputs get one clear error."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _ckpt_factory import load_state, make_safetensors_files, reference_merge, toy_state, trajectory
from safetensors.torch import save_file

from extramerge import api, cli
from extramerge.methods import GAMMA_KEY, STEP_KEY
from rivervalley import weights as W


def _assert_merged(out, paths, weights):
    got, want = load_state(out), reference_merge(paths, weights)
    assert got.keys() == want.keys()
    for k, v in want.items():
        np.testing.assert_allclose(got[k].double().numpy(), v.numpy(), rtol=1e-6, atol=1e-6, err_msg=k)


def test_decay_through_the_api_and_the_cli(tmp_path):
    paths = make_safetensors_files(tmp_path / "in", n=6, with_int=False)
    out = tmp_path / "api.safetensors"
    api.merge(paths, method="decay", shape="minus_sqrt", window=4, output=out, progress=False)
    _assert_merged(out, paths, W.decay(6, 4, "minus_sqrt"))
    rec = json.loads((tmp_path / "api.merge.json").read_text())
    assert rec["method"] == "decay" and rec["shape"] == "minus_sqrt" and rec["window"] == 4

    cli_out = tmp_path / "cli.safetensors"
    args = ["merge", *map(str, paths), "--method", "decay", "--shape", "cosine", "--window", "5"]
    assert cli.main([*args, "-o", str(cli_out), "--quiet"]) == 0
    _assert_merged(cli_out, paths, W.decay(6, 5, "cosine"))
    plan = api.plan(paths and [SimpleNamespace(path=p, step=None) for p in paths], "decay")
    np.testing.assert_allclose(plan.weights, W.sma(6, 6), atol=1e-15)  # linear over all N: the SMA


def _ema_snapshots(tmp_path):
    """EMA snapshots as the online merger saves them: γ and step in the safetensors metadata."""
    steps, gammas = [300, 600, 900, 1200] * 2, [16.97] * 4 + [6.94] * 4
    states = trajectory(toy_state(0, torch.float32, with_int=False), 8, seed=3)
    paths = []
    for i, (state, t, g) in enumerate(zip(states, steps, gammas, strict=True)):
        p = tmp_path / f"snap{i}.safetensors"  # no step in the name: it comes from the metadata
        save_file(
            {k: v.contiguous() for k, v in state.items()}, str(p), {GAMMA_KEY: str(g), STEP_KEY: str(t)}
        )
        paths.append(p)
    return paths, steps, gammas


def test_posthoc_ema_over_ema_snapshots(tmp_path, capsys):
    paths, steps, gammas = _ema_snapshots(tmp_path)
    out = tmp_path / "merged"
    assert (
        cli.main(
            ["merge", *map(str, paths), "--method", "posthoc-ema", "--sigma-rel", "0.08", "-o", str(out)]
        )
        == 0
    )
    fit = W.posthoc_ema(steps, gammas, sigma_rel=0.08)
    _assert_merged(out, paths, fit.weights)
    rec = json.loads((out / "merge.json").read_text())
    assert rec["method"] == "posthoc-ema" and rec["snapshots"] == "ema"
    assert rec["fit_residual"] == pytest.approx(fit.residual) and 0 < fit.residual < 0.1
    assert rec["snapshot_gammas"] == gammas and rec["step"] == 1200
    assert "poor fit" not in capsys.readouterr().out

    far = api.plan(api.open_all(paths)[0], "posthoc-ema", gamma=0.1, progress=False)
    assert far.params["fit_residual"] > 0.3 and any("poor fit" in n for n in far.notes)


def test_posthoc_ema_over_raw_checkpoints(tmp_path):
    paths = make_safetensors_files(tmp_path / "in", n=6, with_int=False)  # steps 100..600 from the names
    out = tmp_path / "raw.safetensors"
    api.merge(paths, method="posthoc-ema", gamma=3.0, output=out, progress=False)
    fit = W.posthoc_ema([100, 200, 300, 400, 500, 600], gamma=3.0)
    _assert_merged(out, paths, fit.weights)
    rec = json.loads((tmp_path / "raw.merge.json").read_text())
    assert rec["snapshots"] == "raw checkpoints" and rec["fit_residual"] == pytest.approx(fit.residual)


def _fake(steps, gammas=None):
    meta = [{} if g is None else {GAMMA_KEY: str(g)} for g in (gammas or [None] * len(steps))]
    return [
        SimpleNamespace(path=f"/c/{i}", step=s, metadata=m)
        for i, (s, m) in enumerate(zip(steps, meta, strict=True))
    ]


def test_posthoc_ema_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError, match="needs the target EMA: --sigma-rel S or --gamma G"):
        api.plan(_fake([1, 2]), "posthoc-ema")
    with pytest.raises(ValueError, match="some checkpoints are EMA snapshots"):
        api.plan(_fake([1, 2], [3.0, None]), "posthoc-ema", gamma=1.0)
    with pytest.raises(ValueError, match="/c/1 has none in its name"):
        api.plan(_fake([1, None]), "posthoc-ema", gamma=1.0)
    with pytest.raises(ValueError, match="metadata extramerge.gamma = 'x' is not a finite number"):
        api.plan(_fake([1, 2], ["x", "1"]), "posthoc-ema", gamma=1.0)
    with pytest.raises(ValueError, match="--shape \\(shape\\) does not apply to method 'posthoc-ema'"):
        api.plan(_fake([1, 2]), "posthoc-ema", gamma=1.0, shape="linear")
    with pytest.raises(ValueError, match="--sigma-rel \\(sigma_rel\\) does not apply to method 'decay'"):
        api.plan(_fake([1, 2]), "decay", sigma_rel=0.1)
    with pytest.raises(ValueError, match="shape must be one of"):
        api.plan(_fake([1, 2]), "decay", shape="steps")


def test_decay_notes_uneven_steps_in_its_window():
    assert api.plan(_fake([1, 2, 3, 5, 9]), "decay", window=3).notes == [
        "checkpoint steps are unevenly spaced: the emulated decay is a staircase over them"
    ]
    assert api.plan(_fake([1, 2, 3, 5, 9]), "decay", window=2).notes == []  # only the window's steps count
