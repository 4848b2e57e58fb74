"""experiments.lm.study end to end on a tiny run: report contents, files, the engine check, and bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from experiments.lm import study
from experiments.lm.train import TrainConfig, train
from rivervalley import weights

# 2 layers x 32 wide, context 32: trains 80 steps in a few seconds; 9 checkpoints from step 40.
TINY = dict(size="tiny", n_layer=2, d_model=32, n_head=2, seq_len=32, batch_size=8, threads=1, progress=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lmstudy") / "run"
    train(
        TrainConfig(out=str(out), steps=80, ckpt_every=5, ckpt_from=40, schedule="constant", lr=3e-3, **TINY)
    )
    return out


def _cfg(run, out, **kw):
    base = dict(
        run=run, out=out, cloze_items=20, candidates=4, progress=False, alphas=(0.0, 0.5, 1.0), threads=1
    )
    return study.StudyConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def report(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("lmstudy_out") / "study"
    return study.run_study(_cfg(run, out)), out


def test_report_has_every_part(report):
    rep, out = report
    for f in ("study.json", "study.md", "analysis/analysis.json", "analysis/gram.npz"):
        assert (out / f).is_file(), f
    for fig in ("alpha.png", "fve1.png", "trajectory.png", "loss_curve.png"):
        assert (out / "figures" / fig).stat().st_size > 1000, fig
    on_disk = json.loads((out / "study.json").read_text())
    assert on_disk["checkpoints"]["n"] == 9 and on_disk["checkpoints"]["steps"][0] == 40
    groups = {r["group"].split(" ")[0] for r in on_disk["methods"]}
    assert {"last", "sma", "ema", "wma", "extra", "trend", "pc1"} <= groups
    # rank-1: merged FVE1 reported for each window, and between 0 and 1
    assert 0 < rep["rank1"]["raw_fve1"] <= 1
    assert set(rep["rank1"]["merged_fve1"]) >= {"2", "4", "8"}
    # predicted next to measured for every method, α* per offset for both fits
    for r in rep["methods"]:
        assert np.isfinite(r["loss"]) and 0 <= r["cloze"] <= 1
        assert set(r["predicted"]) == {"losses", "geometry"}
    assert rep["methods"][0]["name"] == "last" and rep["methods"][0]["delta_measured"] == 0.0
    for e in rep["extra"]["by_offset"].values():
        assert e["measured_best_alpha"] in (0.0, 0.5, 1.0)
        assert "alpha_star" in e["losses"] and "alpha_star" in e["geometry"]
    md = (out / "study.md").read_text()
    assert "Predicted vs measured" in md and "FVE₁" in md


def test_measured_losses_are_the_merges(report, run):
    """The study's loss of SMA K=4 equals evaluating the merged weights directly (no stale model state)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from extramerge import evaluate
    from extramerge.checkpoints import load_checkpoints

    rep, _ = report
    row = next(r for r in rep["methods"] if r["name"] == "SMA K=4")
    ckpts = load_checkpoints([str(run)])
    w = weights.sma(len(ckpts), 4)
    model = AutoModelForCausalLM.from_pretrained(ckpts[-1].path, local_files_only=True)
    state = {
        n: sum(float(wj) * c.read(n).double() for wj, c in zip(w, ckpts, strict=True)).float()
        for n in model.state_dict()
        if n in ckpts[-1].infos
    }
    model.load_state_dict(state, strict=False)
    tok = AutoTokenizer.from_pretrained(ckpts[-1].path)
    texts = evaluate.load_texts(run / "data" / "test.jsonl")
    with torch.no_grad():
        got = evaluate.evaluate_loss(model, tok, texts, batch_size=16).loss
    assert got == pytest.approx(row["loss"], abs=1e-5)


def test_engine_writes_the_same_merge(report):
    eng = report[0]["engine_check"]
    assert eng["abs_diff"] < 1e-5


def test_predictions_use_the_fit(report):
    """Predicted ΔL comes from estimate.predict_delta with the reported fit (recomputed here)."""
    from experiments.lm import estimate

    rep, _ = report
    f = rep["fits"]["losses"]
    fit = estimate.RiverFit(
        f["F0"],
        f["F1"],
        f["F2"],
        f["omega_fast"],
        f["omega_slow"],
        f["rho"],
        f["rho_source"],
        f["rmse"],
        f["n"],
        f["n_calibration"],
        tuple(tuple(r) for r in f["cov"]),
    )
    for r in rep["methods"]:
        assert r["predicted"]["losses"]["delta"] == pytest.approx(estimate.predict_delta(r["weights"], fit))


def test_output_exists_refused_then_forced(run, report, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(study.StudyError, match="exists"):
        study.run_study(_cfg(run, out))
    assert (out / "keep.txt").read_text() == "x"


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--alphas", ""], "--alphas"),
        (["--alphas", "a,b"], "--alphas"),
        (["--offsets", "50"], "--offsets"),
        (["--threads", "0"], "--threads"),
        (["--device", "foo"], "--device"),
    ],
)
def test_cli_bad_flags(run, tmp_path, capsys, argv, match):
    rc = study.main(["--run", str(run), "-o", str(tmp_path / "o"), "--quiet", "--threads", "1", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and match in err[0]
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.tmp")]


def test_cli_run_without_checkpoints(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = study.main(["--run", str(tmp_path / "empty"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no step_XXXXXX checkpoints" in err and str(tmp_path / "empty") in err
    rc = study.main(["--run", str(tmp_path / "missing"), "--quiet"])
    assert rc == 2 and "no such run folder" in capsys.readouterr().err


def test_cli_mixed_architectures(run, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in sorted(run.glob("step_*"))[:4]:
        shutil.copytree(p, mixed / p.name)
    other = tmp_path / "other"
    train(TrainConfig(out=str(other), steps=10, ckpt_every=10, ckpt_from=10, **{**TINY, "d_model": 48}))
    shutil.copytree(other / "step_000010", mixed / "step_000100")
    shutil.copytree(run / "data", mixed / "data")
    rc = study.main(["--run", str(mixed), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "different architectures" in err[0]
    assert not (mixed / "study").exists()


def test_too_few_checkpoints(run, tmp_path, capsys):
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(run.glob("step_*"))[:3]:
        shutil.copytree(p, few / p.name)
    rc = study.main(["--run", str(few), "--quiet"])
    assert rc == 2 and "at least 4 checkpoints" in capsys.readouterr().err


def test_summarize_table(report, capsys):
    from experiments.lm import summarize

    _, out = report
    assert summarize.main([str(out / "study.json")]) == 0
    text = capsys.readouterr().out
    assert f"| {out.name} |" in text and "measured ΔL / predicted ΔL" in text


def test_output_never_replaces_the_run(run, tmp_path, capsys):
    for out in (run, run.parent):
        rc = study.main(["--run", str(run), "-o", str(out), "--force", "--quiet", "--threads", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "replace the run" in err[0]
    assert len(list(run.glob("step_*"))) == 9 and (run / "log.jsonl").is_file()
    other = tmp_path / "not_a_study"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    rc = study.main(["--run", str(run), "-o", str(other), "--force", "--quiet", "--threads", "1"])
    assert rc == 2 and "not an earlier study" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "x"


def test_force_replaces_an_earlier_study(run, report, tmp_path):
    _, first = report
    out = tmp_path / "copy"
    shutil.copytree(first, out)
    rep = study.run_study(_cfg(run, out, force=True, cloze_items=0, engine_check=False, alphas=(0.0,)))
    assert json.loads((out / "study.json").read_text())["extra"]["alphas"] == [0.0]
    assert rep["out"] == str(out) and not list(tmp_path.glob(".copy.*"))


def test_data_dir_is_relative_to_the_run(run, tmp_path, monkeypatch):
    """A relative data_dir in run.json must not pick up ./data of the current directory."""
    decoy = tmp_path / "data"
    decoy.mkdir()
    (decoy / "val.jsonl").write_text('{"text": "decoy"}\n')
    monkeypatch.chdir(tmp_path)
    assert study._data_dir(run, {"data_dir": "data"}) == run / "data"


_STUDY_SIGNAL = """
import os, signal, sys
from extramerge import trajectory
from experiments.lm.study import main

real = trajectory.load_gram
def interrupted(path):
    os.kill(os.getpid(), signal.SIGTERM)  # the staging folder holds analysis/ by now
    return real(path)
trajectory.load_gram = interrupted
sys.exit(main(sys.argv[1:]))
"""


def _leftovers(root):
    return sorted(p.name for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


def test_signals_leave_no_partial_study(run, tmp_path, monkeypatch, capsys):
    from extramerge import trajectory

    out = tmp_path / "study"
    argv = ["--run", str(run), "-o", str(out), "--quiet", "--threads", "1", "--cloze-items", "5"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(
        [sys.executable, "-c", _STUDY_SIGNAL, *argv], capture_output=True, text=True, env=env, timeout=120
    )
    assert p.returncode == 128 + signal.SIGTERM and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("experiments.lm.study: stopped by SIGTERM; nothing was written")
    assert p.stderr.strip().endswith("start again with: python -m experiments.lm.study " + " ".join(argv))
    assert not out.exists() and _leftovers(tmp_path) == [] and _leftovers(run.parent) == []
    # Ctrl-C (in this process): the same
    real = trajectory.load_gram

    def ctrl_c(path):
        os.kill(os.getpid(), signal.SIGINT)
        return real(path)

    monkeypatch.setattr(trajectory, "load_gram", ctrl_c)
    assert study.main(argv) == 130
    assert capsys.readouterr().err.startswith("experiments.lm.study: stopped by SIGINT; nothing was written")
    assert not out.exists() and _leftovers(tmp_path) == []
    # with the progress bar shown (no --quiet), stopped while it runs: the line stands below the bar
    monkeypatch.setattr(trajectory, "load_gram", real)
    real_measure, calls = study._Evaluator.measure, []

    def hup(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the bar has shown one step
            os.kill(os.getpid(), signal.SIGHUP)
        return real_measure(*a, **k)

    monkeypatch.setattr(study._Evaluator, "measure", hup)
    loud = [a for a in argv if a != "--quiet"]
    assert study.main(loud) == 128 + signal.SIGHUP
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("experiments.lm.study: stopped by SIGHUP; nothing was written"), last
    assert not out.exists() and _leftovers(tmp_path) == []


def test_study_refuses_checkpoints_that_cannot_fit_in_memory(tmp_path, monkeypatch):
    """Checked before any tensor is read: N float32 copies of the model plus the float64 merge buffers."""
    from _ckpt_factory import make_safetensors_files

    from extramerge.checkpoints import open_checkpoint
    from rivervalley import _memory

    ckpts = [open_checkpoint(p) for p in make_safetensors_files(tmp_path, n=3)]
    names = list(ckpts[-1].infos)
    study._check_memory(ckpts, names)  # fits
    monkeypatch.setattr(_memory, "available_memory", lambda: 1000)
    with pytest.raises(ValueError, match=r"the study of 3 checkpoints x .* needs about .* GB"):
        study._check_memory(ckpts, names)
