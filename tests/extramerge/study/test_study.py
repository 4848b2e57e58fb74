"""extramerge study end to end on tiny runs: report, measured losses, quick mode, bad input, signals."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from _procs import default_signals

from experiments.lm import study as lm_study
from extramerge.cli import main as em_main
from extramerge.lm.config import TrainConfig
from extramerge.lm.train import train
from extramerge.study import StudyError
from extramerge.study import evaluator as E

# 2 layers x 32 wide, context 32: trains 60 steps in a few seconds; 8 checkpoints from step 25.
TINY = dict(size="tiny", n_layer=2, d_model=32, n_head=2, seq_len=32, batch_size=8, threads=1, progress=False)
FAST_ALPHAS = (-0.5, 0.5, 1)
FAST = ["--quiet", "--threads", "1", "--offsets", "2,4", "--alphas=-0.5,0.5,1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lmstudy") / "run"
    train(TrainConfig(out=str(out), steps=60, ckpt_every=5, ckpt_from=25, schedule="wsd", lr=3e-3, **TINY))
    return out


@pytest.fixture(scope="module")
def report(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("lmstudy_out") / "study"
    assert lm_study.main(["--run", str(run), "-o", str(out), *FAST]) == 0
    return json.loads((out / "study.json").read_text()), out


def test_report_has_the_promised_fields(report):
    r, out = report
    rec = r["recommendation"]
    for k in ("method", "weights", "alpha", "offset", "predicted_delta", "predicted_interval", "identified"):
        assert k in rec
    assert sum(rec["weights"]) == pytest.approx(1) and len(rec["weights"]) == r["checkpoints"]["n"] == 8
    assert rec["identified"] == (rec["predicted_interval"] is not None)
    assert rec["prediction_source"] == "calibration" and rec["predicted_delta"] == rec["calib_delta"]
    if rec["identified"]:
        lo, hi = rec["predicted_interval"]
        assert lo <= rec["predicted_delta"] <= hi
    names = {m["name"] for m in r["measured"]}
    assert {"last", "SMA K=4", "Extra K=4 d=2 alpha=0.5", "Extra K=4 d=4 alpha=3"} <= names
    for m in r["measured"]:
        assert {"name", "weights", "delta", "se"} <= m.keys() and sum(m["weights"]) == pytest.approx(1)
    last = next(m for m in r["measured"] if m["name"] == "last")
    assert last["delta"] == 0 and last["se"] == 0
    assert r["lr"]["given"] and r["lr"]["lr_ratio"][-1] < r["lr"]["lr_ratio"][0]  # the WSD decay was read
    assert (out / "study.md").is_file() and (out / "alpha.png").is_file()
    assert {"rho_interval", "rho_identified", "with_bend", "problems"} <= r["fit"].keys()
    assert len(r["calibration"]["doc_nll"]) == len(r["calibration"]["losses"])
    for d in ("2", "4"):
        cell = r["extra"]["by_offset"][d]
        assert "measured_best_alpha" in cell and (cell["alpha_star"] is None) == (not cell["identified"])


def test_menu_is_complete_and_every_merge_says_its_kind(report):
    r, _ = report
    names = {c["name"] for c in r["candidates"]}
    for k in ("2", "4", "all"):  # 8 checkpoints: K = 8 is every checkpoint
        assert f"SMA K={k}" in names and f"WMA K={k}" in names
    for k in ("4", "all"):
        for ahead in (0, 1, 2):
            assert f"trend K={k} ahead={ahead}" in names
    assert {c["kind"] for c in r["candidates"]} <= {"plain", "theory"}
    n_docs = r["data"]["test"]["documents"]
    for m in r["measured"]:
        assert m["kind"] in ("plain", "theory")
        assert len(m["doc_tokens"]) == len(m["doc_nll"]) == n_docs
        assert sum(m["doc_tokens"]) == r["data"]["test"]["tokens"]
        # ΔL against the newest checkpoint is recomputable offline from the per-document numbers
        last = next(x for x in r["measured"] if x["name"] == "last")
        d = (np.sum(m["doc_nll"]) - np.sum(last["doc_nll"])) / np.sum(m["doc_tokens"])
        assert d == pytest.approx(m["delta"], abs=1e-9)
    plain = next(m for m in r["measured"] if m["name"] == r["plain_best"]["name"])
    assert plain["delta_vs_plain"] == 0 and plain["kind"] == "plain"
    cands = {c["name"]: c for c in r["candidates"]}
    for m in r["measured"]:  # the shipped prediction and the model's, each scored
        assert {"delta", "interval", "vs_plain_interval", "covered", "covered_vs_plain"} <= m["model"].keys()
        c = cands.get(m["name"])
        if c is not None and c["calib_delta"] is not None:
            # measured on the calibration half: that measurement is the prediction
            assert m["prediction_source"] == "calibration" and m["predicted"] == c["calib_delta"]


def test_theory_is_offered_only_through_the_gate(report):
    r, _ = report
    gate = r["theory_gate"]
    assert gate["open"] == (not gate["why_closed"])
    for c in r["candidates"]:
        if c["kind"] != "theory":
            continue
        assert c["offered"] == (not c["not_offered_because"])
        if c["offered"]:
            assert gate["open"] and c["calib_delta"] <= 0
    offered = [c for c in r["candidates"] if c["kind"] == "theory" and c["offered"]]
    tvp = r["theory_vs_plain"]
    assert tvp["plain"] == r["plain_best"]["name"]
    if offered:
        best = min(offered, key=lambda c: c["calib_delta"])
        assert tvp["theory"] == best["name"] and tvp["se"] > 0
        t = next(m for m in r["measured"] if m["name"] == best["name"])
        assert tvp["delta"] == pytest.approx(t["delta_vs_plain"])
    else:
        assert tvp["delta"] is None and tvp["why"]
    tp = r["theory_pick"]
    if not tp["offered"]:
        assert tp["name"] == "last" and tp["why_not"]
    rec = r["recommendation"]  # never a merge whose own interval says it is worse than the newest
    assert rec["kind"] == "plain" or any(c["name"] == rec["name"] and c["offered"] for c in offered)
    if rec["predicted_interval"] is not None and rec["name"] != "last":
        assert rec["predicted_interval"][0] <= 0


def test_forecast_chooses_from_a_prefix_and_measures_at_the_newest(run, tmp_path):
    out = tmp_path / "fc"
    halves = ["--calib", str(run / "data/val.jsonl"), "--test", str(run / "data/test.jsonl")]
    small = ["--quiet", "--threads", "1", "--window", "2", "--offsets", "2", "--alphas=-0.5,0.5"]
    assert em_main(["study", str(run), *halves, "-o", str(out), "--forecast-from", "50", *small]) == 0
    r = json.loads((out / "study.json").read_text())
    fc = r["forecast"]
    assert fc["from_step"] == 50 and fc["checkpoints"] == 6 and fc["steps"] == [25, 50]
    n = r["checkpoints"]["n"]
    assert len(fc["weights"]) == n and sum(fc["weights"]) == pytest.approx(1)
    w = np.asarray(fc["weights"])
    if fc["recipe"]["method"] != "last":
        assert np.all(w[:2] == 0) or fc["recipe"]["method"] in ("ema", "custom")  # built at the newest
    row = next(m for m in r["measured"] if np.allclose(m["weights"], fc["weights"]))
    assert fc["measured"]["delta"] == row["delta"]
    best = min(r["measured"], key=lambda m: m["delta"])
    assert fc["measured"]["best"] == best["name"] and fc["measured"]["gap_to_best"] >= -1e-12
    assert "forecast from step 50" in (out / "study.md").read_text()


@pytest.mark.parametrize("step, why", [("30", "needs at least"), ("60", "every checkpoint")])
def test_bad_forecast_step_is_one_line_before_any_evaluation(run, tmp_path, capsys, step, why):
    out = tmp_path / "fc"
    halves = ["--calib", str(run / "data/val.jsonl"), "--test", str(run / "data/test.jsonl")]
    assert em_main(["study", str(run), *halves, "-o", str(out), "--forecast-from", step, *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--forecast-from" in err[0] and why in err[0]
    assert not out.exists()


def test_measured_delta_is_the_loss_of_the_merge(report, run):
    """A merge written by `extramerge merge` and scored by `extramerge.eval` gives the study's ΔL."""
    import torch

    from extramerge import eval as ev
    from extramerge.api import merge

    r, _ = report
    row = next(m for m in r["measured"] if m["name"] == "Extra K=4 d=2 alpha=0.5")
    ckpts = sorted(run.glob("step_*"))
    out = run.parent / "merged"
    merge([str(p) for p in ckpts], output=out, method="custom", weights=row["weights"], dtype="float32")
    texts = ev.load_texts(run / "data" / "test.jsonl")
    losses = []
    for path in (out, ckpts[-1]):
        model, tok = ev.load_model(path, dtype=torch.float32)
        losses.append(ev.evaluate_loss(model, tok, texts).loss)
    assert losses[0] - losses[1] == pytest.approx(row["delta"], abs=2e-5)


def test_paired_delta_is_the_clustered_ratio_estimator():
    rng = np.random.default_rng(0)
    tok = rng.integers(10, 100, 9).astype(float)
    base = E.DocLosses(rng.uniform(1, 2, 9) * tok, tok)
    a = E.DocLosses(base.nll - 0.1 * tok + rng.normal(0, 1, 9), tok)
    delta, se = E.paired_delta(a, base)
    assert delta == pytest.approx(a.loss - base.loss)
    d = a.nll - base.nll
    boot = []
    for _ in range(4000):
        i = rng.integers(0, 9, 9)
        boot.append(d[i].sum() / tok[i].sum())
    assert se == pytest.approx(np.std(boot), rel=0.15)


def test_quick_mode_gives_only_the_recommendation(run, report, tmp_path):
    out = tmp_path / "quick"
    rc = em_main(
        [
            "study",
            str(run),
            "--calib",
            str(run / "data/val.jsonl"),
            "--test",
            str(run / "data/test.jsonl"),
            "-o",
            str(out),
            "--quick",
            *FAST,
        ]
    )
    assert rc == 0
    q = json.loads((out / "study.json").read_text())
    assert q["mode"] == "quick" and q["measured"] == [] and q["recommendation"]["weights"]
    # the lean calibration, then the short list: 2 SMA, WMA, EMA, 2 trends, the α grid at one offset
    assert (
        q["evaluations"]
        <= len(q["calibration"]["losses"]) + 7 + len(FAST_ALPHAS)
        < report[0]["evaluations"] / 2
    )


def _hf_folders(root, run, n=6):
    """Checkpoints of 'another training loop': a plain torch loop on GPT2LMHeadModel, saved with
    save_pretrained as checkpoint-N/ with the tokenizer copied in."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(sorted(run.glob("step_*"))[-1])
    eos = tok.eos_token_id
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=32,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.randint(0, 256, (64, 32))
    for step in range(1, 10 * n + 1):
        b = data[torch.randint(0, 64, (8,))]
        loss = model(input_ids=b, labels=b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            model.save_pretrained(root / f"checkpoint-{step}")
            tok.save_pretrained(root / f"checkpoint-{step}")
    return root


def test_study_of_hf_folders_from_another_loop_with_data_split(run, tmp_path, capsys):
    root = _hf_folders(tmp_path / "hf", run)
    data = tmp_path / "text.jsonl"
    docs = [json.loads(l)["text"] for f in ("val.jsonl", "test.jsonl") for l in open(run / "data" / f)]
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "st"
    rc = em_main(
        [
            "study",
            str(root),
            "--data",
            str(data),
            "-o",
            str(out),
            "--lr-schedule",
            "0:0.05,100:0.05",
            "--window",
            "2",
            *FAST,
        ]
    )
    assert rc == 0, capsys.readouterr().err
    r = json.loads((out / "study.json").read_text())
    assert r["checkpoints"]["steps"] == [10, 20, 30, 40, 50, 60]
    assert r["data"]["calib"]["documents"] + r["data"]["test"]["documents"] == len(docs)
    assert "recommended merge" in capsys.readouterr().out


def _bad(argv, capsys, out):
    rc = em_main(["study", *argv, "-o", str(out), *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert not out.exists() and not [p for p in out.parent.iterdir() if ".tmp" in p.name]
    return err[0]


def test_bad_input_one_line_exit_2_nothing_written(run, tmp_path, capsys):
    val, test = str(run / "data/val.jsonl"), str(run / "data/test.jsonl")
    halves = ["--calib", val, "--test", test]
    out = tmp_path / "o"
    # a checkpoint transformers cannot load: weights without config.json
    nocfg = tmp_path / "nocfg"
    for p in sorted(run.glob("step_*"))[:6]:
        shutil.copytree(p, nocfg / p.name)
    (nocfg / "step_000050" / "config.json").unlink()
    assert "config.json" in _bad([str(nocfg), *halves], capsys, out)
    # a tokenizer mismatch
    mism = tmp_path / "mism"
    for p in sorted(run.glob("step_*"))[:6]:
        shutil.copytree(p, mism / p.name)
    tj = mism / "step_000050" / "tokenizer_config.json"
    if tj.is_file():
        cfg = json.loads(tj.read_text())
        cfg["model_max_length"] = 7
        tj.write_text(json.dumps(cfg))
        assert "tokenizer mismatch" in _bad([str(mism), *halves], capsys, out)
    # data too small for both halves
    small = tmp_path / "small.jsonl"
    small.write_text('{"text": "tiny"}\n' * 3)
    assert "at least 8" in _bad([str(run), "--data", str(small)], capsys, out)
    # fewer checkpoints than the candidates need
    few = tmp_path / "few"
    for p in sorted(run.glob("step_*"))[:4]:
        shutil.copytree(p, few / p.name)
    assert "needs at least 5" in _bad([str(few), *halves], capsys, out)
    # a learning-rate schedule that does not cover the checkpoints
    assert "covers steps 0..30" in _bad([str(run), *halves, "--lr-schedule", "0:1,30:1"], capsys, out)
    # a run.json nested too deeply for a JSON parser's recursion: one line, not a RecursionError
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    assert "nested too deeply" in _bad([str(run), *halves, "--lr-schedule", str(deep)], capsys, out)
    # mixed architectures
    other = tmp_path / "other"
    train(TrainConfig(out=str(other), steps=10, ckpt_every=10, ckpt_from=10, **{**TINY, "d_model": 48}))
    mixed = tmp_path / "mixed"
    for p in sorted(run.glob("step_*"))[:5]:
        shutil.copytree(p, mixed / p.name)
    shutil.copytree(other / "step_000010", mixed / "step_000100")
    assert "different architectures" in _bad([str(mixed), *halves], capsys, out)


def test_output_exists_refused_then_forced(run, report, tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert lm_study.main(["--run", str(run), "-o", str(out), *FAST]) == 2
    assert "exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "x"
    assert lm_study.main(["--run", str(run), "-o", str(out), "--force", *FAST]) == 2
    assert "not an earlier study" in capsys.readouterr().err
    _, earlier = report
    copy = tmp_path / "copy"
    shutil.copytree(earlier, copy)
    assert lm_study.main(["--run", str(run), "-o", str(copy), "--force", "--quick", *FAST]) == 0
    assert json.loads((copy / "study.json").read_text())["mode"] == "quick"


def test_run_wrapper_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert lm_study.main(["--run", str(tmp_path / "empty"), "--quiet"]) == 2
    assert "no step_XXXXXX checkpoints" in capsys.readouterr().err
    assert lm_study.main(["--run", str(tmp_path / "missing"), "--quiet"]) == 2
    assert "no such run folder" in capsys.readouterr().err


_STUDY_SIGNAL = """
import os, signal, sys
from extramerge.study import evaluator
real = evaluator.Evaluator.measure
calls = []
def measure(*a, **k):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*a, **k)
evaluator.Evaluator.measure = measure
from experiments.lm import study
sys.exit(study.main(sys.argv[1:]))
"""


def test_signals_leave_no_partial_study(run, tmp_path):
    out = tmp_path / "study"
    argv = ["--run", str(run), "-o", str(out), *FAST]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(
        [sys.executable, "-c", _STUDY_SIGNAL, *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        preexec_fn=default_signals,
    )
    assert p.returncode == 128 + signal.SIGTERM, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("experiments.lm.study: stopped by SIGTERM; nothing was written")
    assert not out.exists() and not [q for q in tmp_path.rglob("*") if ".tmp-" in q.name]


def test_study_refuses_checkpoints_that_cannot_fit_in_memory(tmp_path, monkeypatch):
    from _ckpt_factory import make_safetensors_files

    from extramerge.io import open_checkpoint
    from rivervalley.common import resources

    ckpts = [open_checkpoint(p) for p in make_safetensors_files(tmp_path, n=3)]
    names = list(ckpts[-1].infos)
    E._check_memory(E.plan(ckpts, names))  # fits
    monkeypatch.setattr(resources, "available_memory", lambda: 1000)
    need = r"the study of 3 checkpoints x .* needs about [\d.]+ [KMGT]?i?B but only 1000 B"
    for stream in (False, True):  # neither held in memory nor streamed
        with pytest.raises(ValueError, match=need):
            E._check_memory(E.plan(ckpts, names, stream=stream))


def test_study_error_is_a_value_error():
    assert issubclass(StudyError, ValueError)


def test_lr_schedule_from_run_json_log_and_pairs_agree(run):
    """The three --lr-schedule forms give the same learning rate at the checkpoints (WSD run)."""
    from extramerge.study.inputs import read_lr_schedule

    steps = [int(p.name.split("_")[1]) for p in sorted(run.glob("step_*"))]
    at = {}
    for key, spec in (("json", str(run / "run.json")), ("log", str(run / "log.jsonl"))):
        xs, ys = read_lr_schedule(spec, steps)
        at[key] = np.interp(steps, xs, ys)
    logged = [i for i, s in enumerate(steps) if s % 10 == 0]  # the log has a line every 10 steps
    np.testing.assert_allclose(at["json"][logged], at["log"][logged], rtol=1e-6)
    np.testing.assert_allclose(at["json"], at["log"], rtol=0.05)  # in between, the log interpolates
    pairs = ",".join(f"{s}:{v}" for s, v in zip(steps, at["log"], strict=True))
    xs, ys = read_lr_schedule(pairs, steps)
    np.testing.assert_allclose(ys, at["log"])
    with pytest.raises(StudyError, match="not a run.json"):
        read_lr_schedule("nonsense", steps)
