"""The study on checkpoints that are not HF folders (issue 24 item 2): a nanoGPT-format run (``.pt`` files
with ``model_args``) through ``--model-factory extramerge.study.factories:nanogpt``, and a DCP run of an HF
model's state dict through ``--config HF_CONFIG_DIR``, each studied end to end with ``--tokenizer``; the
newest checkpoint's loss equals a direct forward of the model with that state (1e-5), stacked and streamed.
Bad flags are one line, exit 2, nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _model_runs import ARGS, FACTORY, N, blocks_of, direct_loss, llama, llama_config

from extramerge.cli import main as em_main
from extramerge.study.factories import GPT, GPTConfig

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUICK = ["--quiet", "--threads", "1", "--quick", "--offsets", "2", "--alphas=-0.5,0.5", "--batch-size", "8"]


def _halves(cycle_text):
    from extramerge.study.inputs import load_documents, split_documents

    return split_documents(load_documents([cycle_text]), str(cycle_text))


def test_nanogpt_run_studied_end_to_end(nanogpt_run, byte_tok_dir, cycle_text, tmp_path, capsys):
    from extramerge.study.evaluator import Evaluator
    from extramerge.study.inputs import read_checkpoints
    from extramerge.study.models import ModelSource

    root, states = nanogpt_run
    out = tmp_path / "out"
    argv = [
        "study",
        str(root),
        "--data",
        str(cycle_text),
        "-o",
        str(out),
        "--tokenizer",
        str(byte_tok_dir),
        *QUICK,
    ]
    rc = em_main([*argv, "--model-factory", FACTORY])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "study.json").read_text())
    assert rep["recommendation"] and rep["evaluations"] > 0

    ckpts, infos = read_checkpoints([root], any_format=True)
    assert [c.step for c in ckpts] == [100 * k for k in range(1, N + 1)]
    calib, _ = _halves(cycle_text)
    ref = GPT(GPTConfig(**ARGS)).eval()
    ref.load_state_dict(states[-1])
    direct = direct_loss(ref, blocks_of(byte_tok_dir, calib, ARGS["block_size"]))
    for stream in (False, True):
        ev = Evaluator(
            ckpts, list(infos), byte_tok_dir, batch_size=8, stream=stream, model=ModelSource(factory=FACTORY)
        )
        ev.add_half("calib", calib)
        assert ev.halves["calib"][0].seq_len == ARGS["block_size"]
        assert ev.measure(np.eye(N)[-1], "calib").loss == pytest.approx(direct, abs=1e-5)
        # a merge is the weighted sum of the states, tied lm_head included
        sma = {k: sum(s[k] for s in states[-2:]) / 2 for k in states[-1]}
        ref.load_state_dict(sma)
        w = np.zeros(N)
        w[-2:] = 0.5
        ref_sma = direct_loss(ref, blocks_of(byte_tok_dir, calib, ARGS["block_size"]))
        assert ev.measure(w, "calib").loss == pytest.approx(ref_sma, abs=1e-5)
        ref.load_state_dict(states[-1])
    for c in ckpts:
        c.close()


def test_dcp_run_studied_end_to_end_with_an_hf_config(dcp_run, byte_tok_dir, cycle_text, tmp_path, capsys):
    from extramerge.study.evaluator import Evaluator
    from extramerge.study.inputs import read_checkpoints
    from extramerge.study.models import ModelSource

    root, states = dcp_run
    run, cfg_dir = root / "run", root / "config"
    out = tmp_path / "out"
    argv = [
        "study",
        str(run),
        "--data",
        str(cycle_text),
        "-o",
        str(out),
        "--tokenizer",
        str(byte_tok_dir),
        *QUICK,
    ]
    rc = em_main([*argv, "--config", str(cfg_dir)])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "study.json").read_text())["recommendation"]

    ckpts, infos = read_checkpoints([run], any_format=True)
    assert [c.format for c in ckpts] == ["dcp"] * N
    calib, _ = _halves(cycle_text)
    direct = direct_loss(llama(states[-1]), blocks_of(byte_tok_dir, calib, 64))
    for stream in (False, True):
        source = ModelSource(config=str(cfg_dir))
        ev = Evaluator(ckpts, list(infos), byte_tok_dir, batch_size=8, stream=stream, model=source)
        ev.add_half("calib", calib)
        assert ev.halves["calib"][0].seq_len == 64
        assert ev.measure(np.eye(N)[-1], "calib").loss == pytest.approx(direct, abs=1e-5)
    for c in ckpts:
        c.close()


def test_without_a_model_source_other_formats_are_refused_by_name(
    nanogpt_run, byte_tok_dir, cycle_text, tmp_path, capsys
):
    root, _ = nanogpt_run
    argv = [
        "study",
        str(root),
        "--data",
        str(cycle_text),
        "-o",
        str(tmp_path / "out"),
        "--tokenizer",
        str(byte_tok_dir),
    ]
    err = _one_line_exit_2([*argv, *QUICK], tmp_path, capsys)
    assert "ckpt_100.pt" in err and "--model-factory" in err


def _one_line_exit_2(argv, tmp_path, capsys) -> str:
    rc = em_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    return err[0]


def not_a_model(ckpt):  # a factory returning something else (used by spec below)
    return {"model_args": ckpt.extras.get("model_args")}


def last_logits_only(ckpt):  # nanoGPT's own forward without targets: the last position's logits only
    from extramerge.study.factories import nanogpt

    model = nanogpt(ckpt)
    inner = model.forward
    model.forward = lambda idx: (inner(idx)[:, -1:, :], None)
    return model


@pytest.mark.parametrize(
    "flags, expect",
    [
        (["--model-factory", "no_such_module_xyz:build"], ["--model-factory", "no_such_module_xyz"]),
        (["--model-factory", "extramerge.study.factories:nope"], ["--model-factory", "nope"]),
        (["--model-factory", "not a spec"], ["--model-factory", "module:function"]),
        (["--model-factory", f"{__name__}:not_a_model"], ["not_a_model", "dict", "torch.nn.Module"]),
        (["--model-factory", f"{__name__}:last_logits_only"], ["last_logits_only", "every position"]),
        (["--config", "MISSING"], ["--config", "config.json"]),
        (["--config", "CFG", "--model-factory", FACTORY], ["--model-factory and --config"]),
    ],
)
def test_bad_model_flags_are_one_line(nanogpt_run, byte_tok_dir, cycle_text, tmp_path, capsys, flags, expect):
    root, _ = nanogpt_run
    (tmp_path / "empty").mkdir()
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(llama_config().to_dict()))
    sub = {"MISSING": str(tmp_path / "empty"), "CFG": str(tmp_path / "cfg")}
    flags = [sub.get(f, f) for f in flags]
    argv = [
        "study",
        str(root),
        "--data",
        str(cycle_text),
        "-o",
        str(tmp_path / "out"),
        "--tokenizer",
        str(byte_tok_dir),
    ]
    err = _one_line_exit_2([*argv, *QUICK, *flags], tmp_path, capsys)
    for e in expect:
        assert e in err, err


def test_a_config_for_other_tensors_is_one_line(nanogpt_run, byte_tok_dir, cycle_text, tmp_path, capsys):
    """--config of an HF llama for nanoGPT tensors: transformers' loader refuses the names, one line."""
    root, _ = nanogpt_run
    llama_config().save_pretrained(tmp_path / "cfg")
    argv = [
        "study",
        str(root),
        "--data",
        str(cycle_text),
        "-o",
        str(tmp_path / "out"),
        "--tokenizer",
        str(byte_tok_dir),
    ]
    err = _one_line_exit_2([*argv, *QUICK, "--config", str(tmp_path / "cfg")], tmp_path, capsys)
    assert "ckpt_800.pt" in err and "the model does not have" in err
