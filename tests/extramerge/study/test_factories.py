"""The study on checkpoints that are not HF folders (issue 24 item 2): a nanoGPT-format run (``.pt`` files
with ``model_args``) through ``--model-factory extramerge.study.factories:nanogpt``, and a DCP run of an HF
model's state dict through ``--config HF_CONFIG_DIR``, each studied end to end with ``--tokenizer``; the
newest checkpoint's loss equals a direct forward of the model with that state (1e-5), stacked and streamed.
Bad flags are one line, exit 2, nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _dcp_factory import dcp_save

from extramerge.cli import main as em_main
from extramerge.study.factories import GPT, GPTConfig
from tests._ckpt_factory import cycle_docs

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 257  # the byte tokenizer's (extramerge.lm.tokenizer)
N = 8
ARGS = dict(n_layer=2, n_head=2, n_embd=16, block_size=32, bias=True, vocab_size=VOCAB, dropout=0.0)
QUICK = ["--quiet", "--threads", "1", "--quick", "--offsets", "2", "--alphas=-0.5,0.5", "--batch-size", "8"]
FACTORY = "extramerge.study.factories:nanogpt"


def _drifts(state: dict, seed: int):
    """θ_k = θ_0 + k·0.02·v + 0.01·ε_k for k = 1..N (one dict per checkpoint)."""
    g = torch.Generator().manual_seed(seed)
    v = {k: torch.randn(t.shape, generator=g) for k, t in state.items()}
    for k in range(1, N + 1):
        yield {n: t + k * 0.02 * v[n] + 0.01 * torch.randn(t.shape, generator=g) for n, t in state.items()}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from extramerge.lm.tokenizer import build_tokenizer

    d = tmp_path_factory.mktemp("tok")
    build_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "text.jsonl"
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in cycle_docs(16, n_words=120)))
    return p


@pytest.fixture(scope="module")
def nanogpt_run(tmp_path_factory):
    """ckpt_100.pt .. ckpt_800.pt as nanoGPT's train.py writes them under torch.compile: {'model':
    state dict with '_orig_mod.' names and lm_head.weight tied to transformer.wte.weight, 'model_args',
    'iter_num', 'optimizer', 'config', ...}."""
    root = tmp_path_factory.mktemp("nanogpt")
    torch.manual_seed(0)
    model = GPT(GPTConfig(**ARGS))
    base = {k: v.detach().clone() for k, v in model.named_parameters()}  # wte/lm_head once
    states = []
    for k, params in enumerate(_drifts(base, 1), start=1):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name])
        sd = {f"_orig_mod.{n}": t for n, t in model.state_dict().items()}  # shares wte = lm_head storage
        ckpt = {
            "model": sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
            "model_args": dict(ARGS),
            "iter_num": 100 * k,
            "best_val_loss": 3.0,
            "config": {"batch_size": 8, "learning_rate": 1e-3},
        }
        torch.save(ckpt, root / f"ckpt_{100 * k}.pt")
        states.append({n: t.clone() for n, t in model.state_dict().items()})
    return root, states


def _blocks(tok, docs, L):
    from transformers import AutoTokenizer

    from extramerge.eval import token_blocks

    return token_blocks(docs, AutoTokenizer.from_pretrained(tok), L)


def _direct_loss(model, blocks) -> float:
    """Mean NLL of every scored token, the model's own forward, in float64."""
    from extramerge.eval import PAD

    nll, n = 0.0, 0
    with torch.no_grad():
        for b in blocks.ids:
            x, y = b[None, :-1].clamp_min(0), b[None, 1:]
            out = model(x)
            logits = out if isinstance(out, torch.Tensor) else out.logits
            loss = F.cross_entropy(logits[0].double(), y[0], ignore_index=PAD, reduction="sum")
            nll, n = nll + float(loss), n + int((y != PAD).sum())
    return nll / n


def _halves(data):
    from extramerge.study.inputs import load_documents, split_documents

    return split_documents(load_documents([data]), str(data))


def test_nanogpt_run_studied_end_to_end(nanogpt_run, tok, data, tmp_path, capsys):
    from extramerge.study.evaluator import Evaluator
    from extramerge.study.inputs import read_checkpoints
    from extramerge.study.models import ModelSource

    root, states = nanogpt_run
    out = tmp_path / "out"
    argv = ["study", str(root), "--data", str(data), "-o", str(out), "--tokenizer", str(tok), *QUICK]
    rc = em_main([*argv, "--model-factory", FACTORY])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "study.json").read_text())
    assert rep["recommendation"] and rep["evaluations"] > 0

    ckpts, infos = read_checkpoints([root], any_format=True)
    assert [c.step for c in ckpts] == [100 * k for k in range(1, N + 1)]
    calib, _ = _halves(data)
    ref = GPT(GPTConfig(**ARGS)).eval()
    ref.load_state_dict(states[-1])
    direct = _direct_loss(ref, _blocks(tok, calib, ARGS["block_size"]))
    for stream in (False, True):
        ev = Evaluator(
            ckpts, list(infos), tok, batch_size=8, stream=stream, model=ModelSource(factory=FACTORY)
        )
        ev.add_half("calib", calib)
        assert ev.halves["calib"][0].seq_len == ARGS["block_size"]
        assert ev.measure(np.eye(N)[-1], "calib").loss == pytest.approx(direct, abs=1e-5)
        # a merge is the weighted sum of the states, tied lm_head included
        sma = {k: sum(s[k] for s in states[-2:]) / 2 for k in states[-1]}
        ref.load_state_dict(sma)
        w = np.zeros(N)
        w[-2:] = 0.5
        ref_sma = _direct_loss(ref, _blocks(tok, calib, ARGS["block_size"]))
        assert ev.measure(w, "calib").loss == pytest.approx(ref_sma, abs=1e-5)
        ref.load_state_dict(states[-1])
    for c in ckpts:
        c.close()


def _llama_config():
    from extramerge.lm.tokenizer import EOS_ID

    return transformers.AutoConfig.for_model(
        "llama",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory):
    """step-100 .. step-800: torch.distributed.checkpoint saves (single process) of a tiny HF llama's state
    dict, as an FSDP/torchtitan-style loop of an HF model writes them; its config.json in a folder apart."""
    root = tmp_path_factory.mktemp("dcp")
    torch.manual_seed(2)
    cfg = _llama_config()
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    cfg.save_pretrained(root / "config")
    states = []
    for k, sd in enumerate(_drifts(model.state_dict(), 3), start=1):
        dcp_save({n: t.contiguous() for n, t in sd.items()}, root / "run" / f"step-{100 * k}")
        states.append(sd)
    return root, states


def test_dcp_run_studied_end_to_end_with_an_hf_config(dcp_run, tok, data, tmp_path, capsys):
    from extramerge.study.evaluator import Evaluator
    from extramerge.study.inputs import read_checkpoints
    from extramerge.study.models import ModelSource

    root, states = dcp_run
    run, cfg_dir = root / "run", root / "config"
    out = tmp_path / "out"
    argv = ["study", str(run), "--data", str(data), "-o", str(out), "--tokenizer", str(tok), *QUICK]
    rc = em_main([*argv, "--config", str(cfg_dir)])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "study.json").read_text())["recommendation"]

    ckpts, infos = read_checkpoints([run], any_format=True)
    assert [c.format for c in ckpts] == ["dcp"] * N
    calib, _ = _halves(data)
    ref = transformers.AutoModelForCausalLM.from_config(_llama_config(), dtype=torch.float32).eval()
    ref.load_state_dict(states[-1])
    direct = _direct_loss(ref, _blocks(tok, calib, 64))
    for stream in (False, True):
        source = ModelSource(config=str(cfg_dir))
        ev = Evaluator(ckpts, list(infos), tok, batch_size=8, stream=stream, model=source)
        ev.add_half("calib", calib)
        assert ev.halves["calib"][0].seq_len == 64
        assert ev.measure(np.eye(N)[-1], "calib").loss == pytest.approx(direct, abs=1e-5)
    for c in ckpts:
        c.close()


def test_without_a_model_source_other_formats_are_refused_by_name(nanogpt_run, tok, data, tmp_path, capsys):
    root, _ = nanogpt_run
    argv = ["study", str(root), "--data", str(data), "-o", str(tmp_path / "out"), "--tokenizer", str(tok)]
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
def test_bad_model_flags_are_one_line(nanogpt_run, tok, data, tmp_path, capsys, flags, expect):
    root, _ = nanogpt_run
    (tmp_path / "empty").mkdir()
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(_llama_config().to_dict()))
    sub = {"MISSING": str(tmp_path / "empty"), "CFG": str(tmp_path / "cfg")}
    flags = [sub.get(f, f) for f in flags]
    argv = ["study", str(root), "--data", str(data), "-o", str(tmp_path / "out"), "--tokenizer", str(tok)]
    err = _one_line_exit_2([*argv, *QUICK, *flags], tmp_path, capsys)
    for e in expect:
        assert e in err, err


def test_a_config_for_other_tensors_is_one_line(nanogpt_run, tok, data, tmp_path, capsys):
    """--config of an HF llama for nanoGPT tensors: transformers' loader refuses the names, one line."""
    root, _ = nanogpt_run
    _llama_config().save_pretrained(tmp_path / "cfg")
    argv = ["study", str(root), "--data", str(data), "-o", str(tmp_path / "out"), "--tokenizer", str(tok)]
    err = _one_line_exit_2([*argv, *QUICK, "--config", str(tmp_path / "cfg")], tmp_path, capsys)
    assert "ckpt_800.pt" in err and "the model does not have" in err
