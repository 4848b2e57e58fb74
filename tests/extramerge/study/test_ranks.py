"""The study on several processes (torchrun, gloo, CPU) and in bf16: every rank evaluates a contiguous share
of each half's blocks and the per-document NLL is summed over the ranks, so study.json equals one process's
up to summation order; `--dtype bf16` runs the forwards under autocast; a device the machine lacks is one
line."""

import json

import numpy as np
import pytest
from _procs import leftovers, run_one, run_torchrun

from extramerge.cli import main as em_main
from extramerge.lm.config import TrainConfig
from extramerge.lm.train import train

TINY = dict(size="tiny", n_layer=2, d_model=32, n_head=2, seq_len=32, batch_size=8, threads=1, progress=False)
FAST = ["--quiet", "--window", "2", "--offsets", "2", "--alphas=-0.5,0.5", "--batch-size", "3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks") / "run"
    train(TrainConfig(out=str(out), steps=40, ckpt_every=5, ckpt_from=20, schedule="wsd", lr=3e-3, **TINY))
    return out


def _halves(run):
    return ["--calib", str(run / "data/val.jsonl"), "--test", str(run / "data/test.jsonl")]


def _numbers(rep: dict) -> dict:
    """Every loss the report holds, by where it sits."""
    out = {f"calib {k}": np.asarray(x) for k, x in rep["calibration"]["losses"].items()}
    out |= {f"calib docs {i}": np.asarray(x) for i, x in enumerate(rep["calibration"]["doc_nll"])}
    out |= {f"measured {m['name']}": np.asarray(m["doc_nll"]) for m in rep["measured"]}
    out |= {f"delta {m['name']}": np.asarray([m["delta"], m["se"]]) for m in rep["measured"]}
    return out


def test_two_processes_equal_one_up_to_summation_order(run, tmp_path):
    args = ["study", str(run), *_halves(run), *FAST, "--threads", "1", "--quick"]
    one = run_one([*args, "-o", tmp_path / "one"], tmp_path)
    assert one.returncode == 0, one.stderr
    two = run_torchrun([*args, "-o", tmp_path / "two"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one/study.json").read_text())
    b = json.loads((tmp_path / "two/study.json").read_text())
    assert b["timing"]["ranks"] == 2 and a["timing"]["ranks"] == 1
    assert a["data"]["test"]["tokens"] == b["data"]["test"]["tokens"]
    na, nb = _numbers(a), _numbers(b)
    assert na.keys() == nb.keys() and len(na) > 10
    for k in na:
        np.testing.assert_allclose(nb[k], na[k], rtol=1e-12, atol=1e-12, err_msg=k)
    assert a["recommendation"]["name"] == b["recommendation"]["name"]
    assert a["recommendation"]["weights"] == b["recommendation"]["weights"]
    assert a["evaluations"] == b["evaluations"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )
    assert leftovers(tmp_path) == []
    assert "recommended merge" in two.stdout and two.stdout.count("recommended merge") == 1  # rank 0 only


def test_bf16_forwards_run_under_autocast_and_stay_close(run, tmp_path):
    outs = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / dtype
        args = ["study", str(run), *_halves(run), *FAST, "--threads", "1", "--quick", "--dtype", dtype]
        assert em_main([*args, "-o", str(out)]) == 0
        outs[dtype] = json.loads((out / "study.json").read_text())
    a, b = outs["fp32"], outs["bf16"]
    assert a["timing"]["dtype"] == "fp32" and b["timing"]["dtype"] == "bf16"
    assert a["calibration"]["losses"].keys() == b["calibration"]["losses"].keys()
    la = np.asarray(list(a["calibration"]["losses"].values()))
    lb = np.asarray([b["calibration"]["losses"][k] for k in a["calibration"]["losses"]])
    assert not np.array_equal(la, lb)  # bf16 matmuls really ran
    np.testing.assert_allclose(lb, la, atol=0.05)  # and stay within bf16's rounding of the loss
    t = b["timing"]
    assert t["build_seconds"] > 0 and t["forward_seconds"] > 0 and t["tokens_per_s"] > 0
    assert t["tokens"] == b["evaluations"] * b["data"]["calib"]["tokens"]  # --quick: calibration only


@pytest.mark.parametrize(
    "device, why", [("cuda", "CUDA is not available"), ("tpu", "not a device"), ("meta", "cpu or cuda")]
)
def test_a_device_the_machine_lacks_is_one_line(run, tmp_path, capsys, device, why):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    assert em_main(["study", str(run), *_halves(run), *FAST, "--device", device, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--device {device}" in err[0] and why in err[0], err
    assert not out.exists()
