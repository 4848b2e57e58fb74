"""extramerge.lm.models presets and the extramerge.lm trainer: loss drops, checkpoints that transformers and
extramerge open, run records, Muon's parameter split, determinism and exact resume."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from extramerge.lm import config as lmconfig
from extramerge.lm.cli import main
from extramerge.lm.config import TrainConfig
from extramerge.lm.models import (
    ARCHS,
    PRESETS,
    build_config,
    build_model,
    count_params,
    preset_param_count,
    resolve_size,
)
from extramerge.lm.optimizers import build_optimizers, param_groups
from extramerge.lm.train import train

# 2 layers x 32 wide, context 32, batch 4: ~35k parameters, a few hundred steps per second on one core.
TINY = dict(size="tiny", n_layer=2, d_model=32, n_head=2, seq_len=32, batch_size=4, threads=1, progress=False)


def _config(tmp_path, name="run", **kw):
    return TrainConfig(out=str(tmp_path / name), **{**TINY, **kw})


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _train_losses(run):
    return [(e["step"], e["train_loss"]) for e in _log(run) if "train_loss" in e]


def _weights(run, step):
    return load_file(run / f"step_{step:06d}" / "model.safetensors")


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    cfg = TrainConfig(
        out=str(tmp_path_factory.mktemp("gpt2") / "run"),
        **TINY,
        arch="gpt2",
        optimizer="adamw",
        lr=1e-2,  # a 32-wide model learns fastest with a large lr
        steps=40,
        ckpt_every=5,
        log_every=5,
        eval_every=10,
    )
    return train(cfg)


# ------------------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("arch", ARCHS)
def test_presets_build_offline(arch):
    for size, lo, hi in [("tiny", 0.5e6, 1.5e6), ("small", 8e6, 14e6)]:
        model = build_model(arch, size)
        n = count_params(model)
        assert lo < n < hi, (arch, size, n)
        assert n == preset_param_count(arch, size)
        assert model.config.vocab_size == 257
        assert model.config.eos_token_id == model.config.bos_token_id == model.config.pad_token_id == 256


@pytest.mark.parametrize("arch", ARCHS)
def test_big_presets_counted_on_meta_device(arch):
    assert 80e6 < preset_param_count(arch, "gpt2-124m") < 130e6
    assert preset_param_count(arch, "llama-125m") == preset_param_count(arch, "124m")
    assert 280e6 < preset_param_count(arch, "llama-350m") < 380e6


def test_preset_shapes_and_overrides():
    cfg = build_config("gpt2", "gpt2-124m")
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions) == (12, 768, 12, 1024)
    assert cfg.tie_word_embeddings
    cfg = build_config("llama", "llama-125m", n_layer=2)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (2, 768, 2048)
    assert not cfg.tie_word_embeddings
    assert build_config("llama", "tiny").intermediate_size % 64 == 0
    assert set(PRESETS) == {"tiny", "small", "gpt2-124m", "llama-125m", "llama-350m"}
    with pytest.raises(ValueError, match="unknown model size"):
        resolve_size("huge")
    with pytest.raises(ValueError, match="divisible"):
        resolve_size("tiny", n_head=3)
    with pytest.raises(ValueError, match="unknown arch"):
        build_config("bert", "tiny")


# ---------------------------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("arch", ARCHS)
def test_muon_gets_only_hidden_matrices(arch):
    model = build_model(arch, "tiny", n_layer=2, d_model=32, n_head=2)
    groups = param_groups(model, "muon")
    assert groups["muon"] and groups["decay"] and groups["no_decay"]
    for name in groups["muon"]:
        assert not any(k in name for k in ("wte", "wpe", "embed", "lm_head", "ln_", "norm", "bias")), name
        assert dict(model.named_parameters())[name].ndim == 2
    rest = groups["decay"] + groups["no_decay"]
    assert any("wte" in n or "embed_tokens" in n for n in rest)
    assert all(n in rest for n, p in model.named_parameters() if p.ndim == 1)
    n_total = len(list(model.parameters()))
    assert len(groups["muon"]) + len(rest) == n_total
    assert param_groups(model, "adamw")["muon"] == []
    opts = build_optimizers(
        model,
        lmconfig.resolve(
            TrainConfig(arch=arch, optimizer="muon", **{k: v for k, v in TINY.items() if k != "progress"})
        ),
    )
    assert [type(o).__name__ for o in opts] == ["Muon", "AdamW"]
    assert opts[0].param_groups[0]["base_lr"] == lmconfig.DEFAULT_LR["muon"]
    assert {g["base_lr"] for g in opts[1].param_groups} == {lmconfig.DEFAULT_ADAM_LR}


def test_the_resolved_config_is_frozen_and_records_as_before():
    cfg = TrainConfig(optimizer="muon", steps=200, ckpt_every=30, lr=1, device="cpu", extra={"note": [1]})
    r = lmconfig.resolve(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.lr = 0.5
    # run.json's "resolved" entry and a resume compare this dict: the given fields in TrainConfig's order with
    # the derived values in place, then the model shape and tokens per step (the dict runs recorded before
    # the config became a dataclass)
    expected = {
        **dataclasses.asdict(cfg),
        "seq_len": 128,
        "lr": 1.0,
        "adam_lr": lmconfig.DEFAULT_ADAM_LR,
        "warmup": 10,
        "ckpt_from": 140,  # 200 - 30 · floor(0.3 · 200 / 30)
        "online_every": 1,
        "online_save": False,
        "preset": {"n_layer": 4, "d_model": 128, "n_head": 4, "seq_len": 128, "intermediate": None},
        "tokens_per_step": 32 * 128,
    }
    assert list(r.to_dict().items()) == list(expected.items())
    assert json.dumps(r.to_dict()) == json.dumps(expected)
    assert isinstance(r.lr, float) and r.preset == resolve_size("tiny")
    assert lmconfig.resolve(dataclasses.replace(cfg, optimizer="adamw")).adam_lr is None


def test_checkpoint_grid_covers_the_last_30_percent():
    r = lmconfig.resolve(TrainConfig(steps=1000, ckpt_every=100))
    assert lmconfig.checkpoint_steps_with_final(1000, 100, r.ckpt_from) == [700, 800, 900, 1000]
    assert lmconfig.checkpoint_steps_with_final(95, 10, 63) == [63, 73, 83, 93, 95]
    assert lmconfig.checkpoint_steps_with_final(10, 50, 10) == [10]


# --------------------------------------------------------------------------------------------------- train


def test_gpt2_adamw_lowers_the_loss(gpt2_run):
    losses = [loss for _, loss in _train_losses(gpt2_run)]
    assert losses[0] > 4.5  # ln 257 = 5.55 at init
    assert losses[-1] < losses[0] - 1.2, losses


def test_llama_muon_lowers_the_loss(tmp_path):
    run = train(_config(tmp_path, arch="llama", optimizer="muon", steps=40, ckpt_every=40, log_every=5))
    losses = [loss for _, loss in _train_losses(run)]
    assert losses[-1] < losses[0] - 1.2, losses
    rec = json.loads((run / "run.json").read_text())
    assert (
        rec["model"]["class"] == "LlamaForCausalLM" and rec["resolved"]["adam_lr"] == lmconfig.DEFAULT_ADAM_LR
    )


def test_checkpoints_open_in_transformers_and_extramerge(gpt2_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from extramerge.io import load_checkpoints

    steps = [30, 35, 40]  # 40 steps, every 5: the grid over the last 30%
    assert sorted(p.name for p in gpt2_run.iterdir() if p.name.startswith("step_")) == [
        f"step_{s:06d}" for s in steps
    ]
    assert not any(p.name.startswith(".") for p in gpt2_run.iterdir())  # no temporary folders left
    ckpts = load_checkpoints([gpt2_run])
    assert [c.step for c in ckpts] == steps
    assert [c.path.name for c in ckpts] == [f"step_{s:06d}" for s in steps]
    model = AutoModelForCausalLM.from_pretrained(gpt2_run / "step_000040")
    assert model.config.n_layer == 2 and model.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(gpt2_run / "step_000040")
    assert tok("hi")["input_ids"] == [104, 105] and tok.eos_token_id == 256
    w = _weights(gpt2_run, 40)
    assert all(a.dtype == np.float32 for a in w.values())


def test_run_json_and_log(gpt2_run):
    rec = json.loads((gpt2_run / "run.json").read_text())
    assert rec["status"] == "finished" and rec["step"] == 40
    assert rec["model"]["params"] == count_params(
        build_model("gpt2", "tiny", n_layer=2, d_model=32, n_head=2, seq_len=32)
    )
    assert rec["tokens_per_step"] == 4 * 32
    assert rec["schedule"]["name"] == "cosine" and rec["schedule"]["params"]["total_steps"] == 40
    assert rec["data_dir"] == "data" and (gpt2_run / "data" / "train.npy").is_file()
    assert [c["step"] for c in rec["checkpoints"]] == [30, 35, 40]
    sched = lmconfig.build_schedule(lmconfig.resolve(TrainConfig(**rec["config"])))
    for c in rec["checkpoints"]:
        assert c["lr"] == pytest.approx(sched(c["step"] - 1))
        assert c["val_loss"] is not None
    assert rec["timings"]["train_s"] > 0 and rec["timings"]["tokens_per_s"] > 0
    log = _log(gpt2_run)
    train_lines = [e for e in log if "train_loss" in e]
    assert [e["step"] for e in train_lines] == list(range(5, 41, 5))
    assert set(train_lines[0]) == {"step", "lr", "train_loss", "grad_norm", "tokens", "elapsed"}
    assert train_lines[-1]["tokens"] == 40 * 128
    val_steps = [e["step"] for e in log if "val_loss" in e]
    assert val_steps == [10, 20, 30, 35, 40]  # every --eval-every and at every checkpoint


def test_same_seed_same_losses_other_seed_differs(tmp_path, gpt2_run):
    cfg = dataclasses.replace(
        TrainConfig(**json.loads((gpt2_run / "run.json").read_text())["config"]), out=str(tmp_path / "again")
    )
    again = train(cfg)
    assert _train_losses(again) == _train_losses(gpt2_run)
    for s in (30, 40):
        a, b = _weights(again, s), _weights(gpt2_run, s)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    other = train(dataclasses.replace(cfg, out=str(tmp_path / "other"), seed=1))
    assert _train_losses(other) != _train_losses(gpt2_run)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, optimizer):
    kw = dict(
        arch="gpt2" if optimizer == "adamw" else "llama",
        optimizer=optimizer,
        steps=20,
        ckpt_every=3,
        ckpt_from=8,
        log_every=4,
        schedule="wsd",
    )
    full = train(_config(tmp_path, "full", **kw))
    part = train(_config(tmp_path, "part", stop_at=10, **kw))
    rec = json.loads((part / "run.json").read_text())
    assert rec["status"] == "stopped" and rec["step"] == 10
    assert sorted(p.name for p in part.glob("step_*")) == ["step_000008"]
    resumed = train(_config(tmp_path, "part", resume=True, **kw))
    assert resumed == part
    assert _train_losses(resumed) == _train_losses(full)
    strip = lambda log: [{k: v for k, v in e.items() if k != "elapsed"} for e in log]
    assert strip(_log(resumed)) == strip(_log(full))
    steps = [8, 11, 14, 17, 20]
    assert sorted(p.name for p in resumed.glob("step_*")) == [f"step_{s:06d}" for s in steps]
    for s in steps:
        a, b = _weights(resumed, s), _weights(full, s)
        assert all(np.array_equal(a[k], b[k]) for k in a), s
    ra, rb = (json.loads((p / "run.json").read_text()) for p in (resumed, full))
    assert ra["checkpoints"] == rb["checkpoints"] and ra["status"] == "finished"


def test_resume_refuses_a_changed_config(tmp_path):
    train(_config(tmp_path, steps=6, ckpt_every=3, stop_at=3))
    with pytest.raises(ValueError, match="different lr"):
        train(_config(tmp_path, steps=6, ckpt_every=3, lr=0.1, resume=True))


def test_refuses_to_overwrite_a_run(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty.*--resume"):
        train(_config(tmp_path, steps=2))
    assert main(["-o", str(tmp_path / "run"), "--steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "exists and is not empty" in err and err.count("\n") == 1
    assert main(["-o", str(tmp_path / "fresh"), "--resume", "--no-progress"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["-o", str(tmp_path / "x"), "--corpus", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err


def test_cli_trains_and_resumes(tmp_path, capsys):
    args = [
        "-o",
        str(tmp_path / "cli"),
        "--size",
        "tiny",
        "--n-layer",
        "1",
        "--d-model",
        "32",
        "--n-head",
        "2",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--steps",
        "6",
        "--ckpt-every",
        "1",
        "--threads",
        "1",
        "--optimizer",
        "muon",
        "--schedule",
        "constant",
        "--warmup",
        "0",
    ]
    assert main([*args, "--stop-at", "3", "--no-progress"]) == 0
    assert main(["-o", str(tmp_path / "cli"), "--resume"]) == 0  # the rest of the flags come from run.json
    out = capsys.readouterr().out
    assert "ckpts" in out and "tokens/s" in out
    rec = json.loads((tmp_path / "cli" / "run.json").read_text())
    assert rec["status"] == "finished" and [c["step"] for c in rec["checkpoints"]] == [5, 6]
    assert rec["schedule"]["factory"] == "constant" and rec["config"]["optimizer"] == "muon"


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    assert main(["-o", str(tmp_path / "a"), "--steps", "0"]) == 2
    assert "--steps must be an integer >= 1" in capsys.readouterr().err
    assert main(["-o", str(tmp_path / "b"), "--size", "huge"]) == 2
    assert "unknown model size" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bad_corpus_leaves_no_run_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for corpus in (str(tmp_path / "missing"), str(tmp_path / "empty")):
        rc = main(["-o", str(tmp_path / "new" / "run"), "--corpus", corpus, "--steps", "5", "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and corpus in err[0]
        assert not (tmp_path / "new").exists()


def test_the_experiments_script_still_runs():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    p = subprocess.run(
        [sys.executable, "-m", "experiments.lm.train", "--help"], cwd=root, capture_output=True, text=True
    )
    assert p.returncode == 0 and p.stdout.startswith("usage: python -m experiments.lm.train"), p.stderr


def test_resume_reads_run_json_as_untrusted_input(tmp_path, capsys):
    """Issue 21 item 12: a run.json of 100k nested '[' was a RecursionError traceback on --resume."""
    run = tmp_path / "run"
    run.mkdir()
    for text, needle in [("[" * 100_000 + "]" * 100_000, "invalid JSON (nested too deeply)"),
                         ('{"config": 1}', "not a run record")]:  # fmt: skip
        (run / "run.json").write_text(text)
        assert main(["-o", str(run), "--resume", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{run / 'run.json'}: " in err and needle in err, err
