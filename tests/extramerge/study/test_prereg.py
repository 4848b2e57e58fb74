"""Pre-registration: ``extramerge study --predict-only`` never opens the measurement half, and ``--measure``
measures exactly those predictions, refusing other checkpoints, tokenizers, halves and tampered files."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from extramerge.cli import main as em_main
from extramerge.lm.config import TrainConfig
from extramerge.lm.train import train

TINY = dict(size="tiny", n_layer=2, d_model=32, n_head=2, seq_len=32, batch_size=8, threads=1, progress=False)
KNOBS = ["--quiet", "--threads", "1", "--offsets", "2,4", "--alphas=-0.5,0.5,1", "--forecast-from", "55"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("prereg") / "run"
    train(TrainConfig(out=str(out), steps=60, ckpt_every=5, ckpt_from=25, schedule="wsd", lr=3e-3, **TINY))
    return out


def _halves(run):
    return str(run / "data/val.jsonl"), str(run / "data/test.jsonl")


@pytest.fixture(scope="module")
def pred(run, tmp_path_factory):
    """Predictions written in a child process that records every file it opens (audit hook)."""
    out = tmp_path_factory.mktemp("prereg_pred") / "pred"
    calib, test = _halves(run)
    log = out.parent / "opened.txt"
    code = textwrap.dedent(
        f"""
        import sys
        opened = []
        def hook(event, args):
            if event == "open" and args and isinstance(args[0], (str, bytes)):
                opened.append(args[0] if isinstance(args[0], str) else args[0].decode(errors="replace"))
        sys.addaudithook(hook)
        from extramerge.cli import main
        rc = main(["study", {str(run)!r}, "--calib", {calib!r}, "--predict-only", "-o", {str(out)!r},
                   *{KNOBS!r}])
        open({str(log)!r}, "w").write("\\n".join(opened))
        sys.exit(rc)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return out, log.read_text().splitlines(), res.stdout


@pytest.fixture(scope="module")
def measured(run, pred, tmp_path_factory):
    out = tmp_path_factory.mktemp("prereg_meas") / "meas"
    _, test = _halves(run)
    before = hashlib.sha256((pred[0] / "predictions.json").read_bytes()).hexdigest()
    assert em_main(["study", "--measure", str(pred[0]), "--test", test, "-o", str(out), "--quiet"]) == 0
    assert hashlib.sha256((pred[0] / "predictions.json").read_bytes()).hexdigest() == before  # untouched
    return json.loads((out / "study.json").read_text()), before


def test_predict_only_never_opens_the_measurement_half(run, pred):
    out, opened, stdout = pred
    calib, test = _halves(run)
    real = {os.path.realpath(p) for p in opened}
    assert os.path.realpath(calib) in real  # the hook sees the files the study reads
    assert os.path.realpath(test) not in real
    assert not any("test.jsonl" in p for p in opened)
    assert "predictions.json" in stdout and "--measure" in stdout


def test_predictions_hold_every_candidate_alpha_star_pick_and_forecast(pred):
    p = json.loads((pred[0] / "predictions.json").read_text())
    assert p["mode"] == "predict-only" and "measured" not in p and "test" not in p["data"]
    rows = p["to_measure"]
    names = [r["name"] for r in rows]
    assert {"last", "SMA K=4", "Extra K=4 d=2 alpha=0.5", "Extra K=4 d=4 alpha=3"} <= set(names)
    for r in rows:
        assert {"delta", "interval", "vs_plain", "vs_plain_interval", "model"} <= r["predicted"].keys()
        assert len(r["weights"]) == p["checkpoints"]["n"]
    for d in ("2", "4"):
        cell = p["extra"]["by_offset"][d]
        assert "alpha_star" in cell and isinstance(cell["identified"], bool)
    assert p["recommendation"]["name"] in names and p["theory_pick"]["name"] in names
    assert p["forecast"]["from_step"] == 55
    assert any(r["weights"] == p["forecast"]["weights"] for r in rows)
    reg = p["preregistration"]
    assert len(reg["checkpoints"]) == p["checkpoints"]["n"]
    assert all(len(c["sha256"]) == 64 for c in reg["checkpoints"])
    assert reg["calib"]["documents"] == p["data"]["calib"]["documents"] == len(reg["calib"]["doc_sha256"])
    assert reg["tokenizer"]["fingerprint"] and len(reg["code"]) == 64
    assert "before the measurement half was read" in (pred[0] / "predictions.md").read_text()


def test_measure_later_equals_the_study_in_one_go(run, measured, tmp_path):
    later, digest = measured
    calib, test = _halves(run)
    out = tmp_path / "full"
    assert em_main(["study", str(run), "--calib", calib, "--test", test, "-o", str(out), *KNOBS]) == 0
    once = json.loads((out / "study.json").read_text())
    for key in ("recommendation", "plain_best", "theory_pick", "theory_vs_plain", "forecast", "extra"):
        assert later[key] == once[key], key
    assert [m["name"] for m in later["measured"]] == [m["name"] for m in once["measured"]]
    for a, b in zip(later["measured"], once["measured"], strict=True):
        assert a["delta"] == pytest.approx(b["delta"], abs=1e-9) and a["covered"] == b["covered"]
    reg = later["preregistration"]
    assert reg["predictions"]["sha256"] == digest and reg["same_code"] is True
    assert reg["test"]["documents"] == later["data"]["test"]["documents"]


def _bad(argv, capsys, out):
    rc = em_main(["study", *argv, "-o", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert not out.exists()
    return err[0]


def test_measure_refuses_other_inputs_and_flags(run, pred, tmp_path, capsys):
    p, out = pred[0], tmp_path / "o"
    calib, test = _halves(run)
    assert "calibration half" in _bad(["--measure", str(p), "--test", calib], capsys, out)
    assert "--window" in _bad(["--measure", str(p), "--test", test, "--window", "3"], capsys, out)
    assert "--calib" in _bad(["--measure", str(p), "--test", test, "--calib", calib], capsys, out)
    assert "--test FILE" in _bad(["--measure", str(p)], capsys, out)
    assert "--predict-only" in _bad(
        [str(run), "--calib", calib, "--test", test, "--predict-only"], capsys, out
    )
    assert "--predict-only" in _bad([str(run), "--data", calib, "--predict-only"], capsys, out)
    assert "no checkpoints" in _bad(["--calib", calib, "--test", test], capsys, out)
    # a checkpoint changed after the predictions: named, before any measurement
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    ck = sorted(moved.glob("step_*"))[-1]
    st = ck / "model.safetensors"
    raw = bytearray(st.read_bytes())
    raw[-5] ^= 0x01  # one bit of the last tensor's data
    st.write_bytes(bytes(raw))
    err = _bad([*map(str, sorted(moved.glob("step_*"))), "--measure", str(p), "--test", test], capsys, out)
    assert str(ck) in err and "differ" in err
    few = [str(x) for x in sorted(moved.glob("step_*"))[:-1]]
    assert "steps" in _bad([*few, "--measure", str(p), "--test", test], capsys, out)


@pytest.mark.parametrize(
    "edit, why",
    [
        (
            lambda p: p["to_measure"][1].update(
                weights=[1.0, 1.0] + [0.0] * (len(p["to_measure"][1]["weights"]) - 2)
            ),
            "summing to 1",
        ),
        (lambda p: p.pop("plain_best"), "plain_best"),
        (lambda p: p["preregistration"].update(format="other/9"), "format"),
        (lambda p: p.update(theory_best="no such merge"), "theory_best"),
        (lambda p: p["to_measure"][0]["predicted"].update(interval=[1, 0]), "interval"),
        (lambda p: p["to_measure"].append(p["to_measure"][0]), "twice"),
        (lambda p: p["checkpoints"].update(n=True), "checkpoints.n"),
    ],
)
def test_measure_refuses_malformed_predictions(run, pred, tmp_path, capsys, edit, why):
    bad = tmp_path / "pred"
    shutil.copytree(pred[0], bad)
    p = json.loads((bad / "predictions.json").read_text())
    edit(p)
    (bad / "predictions.json").write_text(json.dumps(p))
    err = _bad(["--measure", str(bad), "--test", _halves(run)[1]], capsys, tmp_path / "o")
    assert str(bad / "predictions.json") in err and why in err


def test_measure_refuses_a_non_json_or_missing_predictions_file(run, tmp_path, capsys):
    test = _halves(run)[1]
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "predictions.json").write_text("[" * 100_000)
    assert "nested too deeply" in _bad(
        ["--measure", str(tmp_path / "p"), "--test", test], capsys, tmp_path / "o"
    )
    assert "cannot read" in _bad(
        ["--measure", str(tmp_path / "nope"), "--test", test], capsys, tmp_path / "o"
    )
