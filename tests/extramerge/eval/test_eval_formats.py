"""`extramerge eval` of checkpoints that are not HF folders (issue 24 item 2), as the study evaluates them:
a nanoGPT ``.pt`` run through ``--model-factory extramerge.study.factories:nanogpt`` and a DCP run of an HF
model's state dict through ``--config HF_CONFIG_DIR``, each with ``--tokenizer``. The loss of a checkpoint
equals a direct forward of the model with its state (1e-5) and the study's own loss of it; cloze runs on
the factory's model too. Bad flags and checkpoints that do not fit are one line, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from _model_runs import ARGS, FACTORY, LLAMA_POSITIONS, N, blocks_of, direct_loss, llama, llama_config

from extramerge.cli import main
from extramerge.eval import load_texts
from extramerge.study.factories import GPT, GPTConfig

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _eval(capsys, *argv):
    rc = main(["eval", *map(str, argv), "--threads", "1", "--batch-size", "4"])
    out, err = capsys.readouterr()
    return rc, out, err


def _nanogpt(state):
    model = GPT(GPTConfig(**ARGS)).eval()
    model.load_state_dict(state)
    return model


def test_nanogpt_checkpoints_with_a_factory(nanogpt_run, byte_tok_dir, cycle_text, tmp_path, capsys):
    from extramerge.study.evaluator import Evaluator
    from extramerge.study.inputs import read_checkpoints
    from extramerge.study.models import ModelSource

    root, states = nanogpt_run
    out = tmp_path / "eval.json"
    rc, stdout, err = _eval(capsys, root / "ckpt_300.pt", root / "ckpt_800.pt", "--data", cycle_text,
                            "--model-factory", FACTORY, "--tokenizer", byte_tok_dir, "--cloze", "8",
                            "--json", out)  # fmt: skip
    assert rc == 0, err
    rec = json.loads(out.read_text())
    rows = rec["models"]
    assert [r["name"] for r in rows] == [str(root / "ckpt_300.pt"), str(root / "ckpt_800.pt")]
    assert [r["step"] for r in rows] == [300, 800] and rec["model_factory"] == FACTORY
    assert all(r["seq_len"] == ARGS["block_size"] for r in rows)  # the factory's model's context length
    texts = load_texts(cycle_text)
    blocks = blocks_of(byte_tok_dir, texts, ARGS["block_size"])
    for row, state in zip(rows, (states[2], states[7]), strict=True):
        assert row["loss"] == pytest.approx(direct_loss(_nanogpt(state), blocks), abs=1e-5)
        assert row["cloze"]["n"] == 8 and 0 <= row["cloze"]["accuracy"] <= 1
    assert rows[0]["loss"] != rows[1]["loss"]

    # the study's loss of the newest checkpoint, on the same documents, is eval's
    ckpts, infos = read_checkpoints([root], any_format=True)
    try:
        ev = Evaluator(ckpts, list(infos), byte_tok_dir, batch_size=8, model=ModelSource(factory=FACTORY))
        ev.add_half("all", texts)
        assert ev.measure(np.eye(N)[-1], "all").loss == pytest.approx(rows[1]["loss"], abs=1e-5)
    finally:
        for c in ckpts:
            c.close()


def test_a_folder_of_nanogpt_checkpoints_is_each_evaluated(nanogpt_run, byte_tok_dir, cycle_text, capsys):
    root, _ = nanogpt_run
    rc, stdout, err = _eval(capsys, root, "--data", cycle_text, "--model-factory", FACTORY,
                            "--tokenizer", byte_tok_dir, "--cloze", "0", "--seq-len", "16")  # fmt: skip
    assert rc == 0, err
    names = [line.split()[0] for line in stdout.splitlines() if line.startswith(root.name)]
    assert names == [f"{root.name}/ckpt_{100 * k}.pt" for k in range(1, N + 1)]


def test_dcp_checkpoint_with_an_hf_config(dcp_run, byte_tok_dir, cycle_text, tmp_path, capsys):
    root, states = dcp_run
    out = tmp_path / "eval.json"
    flags = ["--config", root / "config", "--tokenizer", byte_tok_dir, "--cloze", "6", "--json", out]
    rc, stdout, err = _eval(capsys, root / "run" / "step-800", "--data", cycle_text, *flags)
    assert rc == 0, err
    (row,) = json.loads(out.read_text())["models"]
    assert row["step"] == 800 and row["seq_len"] == LLAMA_POSITIONS and row["cloze"]["n"] == 6
    blocks = blocks_of(byte_tok_dir, load_texts(cycle_text), LLAMA_POSITIONS)
    assert row["loss"] == pytest.approx(direct_loss(llama(states[-1]), blocks), abs=1e-5)


def test_the_tokenizer_beside_the_checkpoint_is_found(
    nanogpt_run, byte_tok_dir, cycle_text, tmp_path, capsys
):
    root, _ = nanogpt_run
    run = tmp_path / "run"
    shutil.copytree(byte_tok_dir, run)
    shutil.copy(root / "ckpt_800.pt", run / "ckpt_800.pt")
    rc, _, err = _eval(capsys, run / "ckpt_800.pt", "--data", cycle_text, "--model-factory", FACTORY,
                       "--cloze", "0")  # fmt: skip
    assert rc == 0, err
    shutil.rmtree(run)
    run.mkdir()
    shutil.copy(root / "ckpt_800.pt", run / "ckpt_800.pt")
    rc, _, err = _eval(capsys, run / "ckpt_800.pt", "--data", cycle_text, "--model-factory", FACTORY)
    assert rc == 2 and "no tokenizer files" in err and "--tokenizer" in err


# ------------------------------------------------------------------------------------------- bad input


def raises(ckpt):  # a factory that fails
    raise RuntimeError("no such model size")


def not_a_model(ckpt):  # a factory returning something else
    return {"model_args": ckpt.extras.get("model_args")}


def last_logits_only(ckpt):  # nanoGPT's own forward without targets: the last position's logits only
    from extramerge.study.factories import nanogpt

    model = nanogpt(ckpt)
    inner = model.forward
    model.forward = lambda idx: (inner(idx)[:, -1:, :], None)
    return model


def no_logits(ckpt):  # a forward that returns something that holds no logits
    from extramerge.study.factories import nanogpt

    model = nanogpt(ckpt)
    model.forward = lambda idx: {"hidden": idx}
    return model


def broken_forward(ckpt):  # a forward that raises
    from extramerge.study.factories import nanogpt

    model = nanogpt(ckpt)

    def forward(idx):
        raise TypeError("forward() missing 1 required positional argument: 'targets'")

    model.forward = forward
    return model


def wider(ckpt):  # a model whose tensors are not the checkpoint's
    return GPT(GPTConfig(**{**ckpt.extras["model_args"], "n_embd": 32}))


@pytest.mark.parametrize(
    "flags, expect",
    [
        (["--model-factory", "no_such_module_xyz:build"], ["--model-factory", "no_such_module_xyz"]),
        (["--model-factory", f"{__name__}:raises"], ["raises", "failed", "no such model size"]),
        (["--model-factory", f"{__name__}:not_a_model"], ["not_a_model", "dict", "torch.nn.Module"]),
        (["--model-factory", f"{__name__}:last_logits_only"], ["last_logits_only", "every position"]),
        (["--model-factory", f"{__name__}:no_logits"], ["no_logits", "not logits"]),
        (["--model-factory", f"{__name__}:broken_forward"], ["broken_forward", "forward failed", "targets"]),
        (["--model-factory", f"{__name__}:wider"], ["ckpt_800.pt", "shape"]),
        (["--model-factory", FACTORY, "--seq-len", "64"], ["--seq-len 64", "32 positions"]),
        (["--model-factory", FACTORY, "--lm-eval"], ["--lm-eval"]),
        (["--config", "EMPTY"], ["--config", "config.json"]),
        (["--config", "CFG", "--model-factory", FACTORY], ["--model-factory and --config"]),
        (["--config", "CFG"], ["ckpt_800.pt", "the model does not have"]),
        (["--model-factory", FACTORY, "--tokenizer", "EMPTY"], ["--tokenizer", "tokenizer files"]),
        (["--tokenizer", "TOK"], ["--tokenizer", "--config or --model-factory"]),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(
    nanogpt_run, byte_tok_dir, cycle_text, tmp_path, capsys, flags, expect
):
    root, _ = nanogpt_run
    (tmp_path / "empty").mkdir()
    llama_config().save_pretrained(tmp_path / "cfg")
    sub = {"EMPTY": tmp_path / "empty", "CFG": tmp_path / "cfg", "TOK": byte_tok_dir}
    if "--tokenizer" not in flags:
        flags = [*flags, "--tokenizer", "TOK"]
    flags = [sub.get(f, f) for f in flags]
    out = tmp_path / "out" / "eval.json"
    rc, stdout, err = _eval(capsys, root / "ckpt_800.pt", "--data", cycle_text, *flags, "--json", out,
                            "--save-cloze", tmp_path / "out" / "items.jsonl")  # fmt: skip
    lines = [x for x in err.strip().splitlines() if x]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("extramerge: error: "), err
    assert "Traceback" not in err and not stdout.strip()
    for e in expect:
        assert e in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_two_architectures_are_one_line(nanogpt_run, byte_tok_dir, cycle_text, tmp_path, capsys):
    root, _ = nanogpt_run
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"model": GPT(GPTConfig(**{**ARGS, "n_layer": 1})).state_dict(), "model_args": ARGS},
               other / "ckpt_900.pt")  # fmt: skip
    rc, _, err = _eval(capsys, root / "ckpt_800.pt", other / "ckpt_900.pt", "--data", cycle_text,
                       "--model-factory", FACTORY, "--tokenizer", byte_tok_dir)  # fmt: skip
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "ckpt_800.pt" in err and "ckpt_900.pt" in err and "one architecture" in err
