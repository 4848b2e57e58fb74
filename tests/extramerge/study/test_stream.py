"""The study with checkpoints streamed from their files: the same losses as stacked in memory, each merge
tensor built only when transformers' loader sets it, and --dry-run's memory plan."""

import json
import threading

import numpy as np
import pytest

from extramerge.cli import main as em_main
from extramerge.lm.config import TrainConfig
from extramerge.lm.train import train
from extramerge.study import evaluator as E
from extramerge.study.inputs import load_documents, read_checkpoints, tokenizer_of

TINY = dict(size="tiny", n_layer=2, d_model=32, n_head=2, seq_len=32, batch_size=8, threads=1, progress=False)
QUICK = ["--quiet", "--threads", "1", "--quick", "--offsets", "2", "--alphas=-0.5,0.5"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "run"
    train(
        TrainConfig(out=str(out), steps=40, ckpt_every=5, ckpt_from=10, schedule="constant", lr=3e-3, **TINY)
    )
    return out


def test_streamed_losses_equal_stacked_and_build_one_tensor_at_a_time(run, monkeypatch):
    ckpts, infos = read_checkpoints([run])
    docs = load_documents([run / "data/val.jsonl"])
    w = np.zeros(len(ckpts))
    w[-4:] = [-1.0, 0.5, -0.5, 2.0]  # an extrapolation: large weights of both signs
    seen = []
    real = E._Merged.__getitem__

    def spy(self, key):
        seen.append((self.name, threading.get_ident()))
        return real(self, key)

    monkeypatch.setattr(E._Merged, "__getitem__", spy)
    out = {}
    for stream in (False, True):
        ev = E.Evaluator(ckpts, list(infos), tokenizer_of(ckpts, None), stream=stream, digests=True)
        assert ev.plan["mode"] == ("streamed" if stream else "stacked")
        ev.add_half("calib", docs)
        out[stream] = (ev.measure(w, "calib").nll, ev.digests, ev.measure(w[::-1].copy(), "calib").nll)
        if stream:  # after the first merge each tensor is written into the parameter that takes it
            assert len(ev.targets) == len(ev.floats) and all(
                t.dtype.is_floating_point for t in ev.targets.values()
            )
    assert np.array_equal(out[True][0], out[False][0])  # both accumulate in float64, in the same order
    assert np.array_equal(out[True][2], out[False][2])  # the second merge too, built in place
    assert out[True][1] == out[False][1]  # the checkpoints' digests, read either way
    names = [n for n, _ in seen]
    floats = sorted(n for n in infos if infos[n].dtype_str.startswith("F"))
    assert sorted(set(names)) == floats and len(names) == 2 * len(floats)  # each tensor once per merge
    assert {t for _, t in seen} == {threading.get_ident()}  # materialised in turn, not by a thread pool
    for c in ckpts:
        c.close()


def test_stream_flag_gives_the_same_study(run, tmp_path):
    halves = ["--calib", str(run / "data/val.jsonl"), "--test", str(run / "data/test.jsonl")]
    reps = []
    for extra, name in (([], "stacked"), (["--stream"], "streamed")):
        out = tmp_path / name
        assert em_main(["study", str(run), *halves, "-o", str(out), *QUICK, *extra]) == 0
        r = json.loads((out / "study.json").read_text())
        assert r["memory"]["mode"] == name
        reps.append(r)
    assert reps[0]["calibration"]["losses"] == reps[1]["calibration"]["losses"]
    assert reps[0]["recommendation"] == reps[1]["recommendation"]


def test_dry_run_prints_the_plan_and_writes_nothing(run, tmp_path, capsys):
    halves = ["--calib", str(run / "data/val.jsonl"), "--test", str(run / "data/test.jsonl")]
    out = tmp_path / "never"
    for extra, mode in (([], "stacked"), (["--stream"], "streamed")):
        assert em_main(["study", str(run), *halves, "-o", str(out), "--dry-run", *extra]) == 0
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert f"held {mode}" in line and "of memory" in line and "nothing written" in line
        assert not out.exists()
    ckpts, infos = read_checkpoints([run])
    p = E.plan(ckpts, list(infos), stream=True)
    floats = [infos[n].numel for n in infos if infos[n].dtype_str.startswith("F")]
    assert p["streamed_bytes"] < p["stacked_bytes"] and p["parameters"] == sum(floats)
    for c in ckpts:
        c.close()
    # a bad input is still found by the dry run
    rc = em_main(
        [
            "study",
            str(run),
            "--calib",
            str(tmp_path / "nope.jsonl"),
            "--test",
            halves[3],
            "-o",
            str(out),
            "--dry-run",
        ]
    )
    assert rc == 2 and "nope.jsonl" in capsys.readouterr().err
