"""The study loads each merge as ``from_pretrained`` would load it from a folder, for every causal-LM family
the installed transformers offers among the common ones: tiny random configs written by ``save_pretrained``
as checkpoint-N folders of one run (perturbations of one init, a byte tokenizer in the run folder).

(a) the study's loss of the newest checkpoint equals ``from_pretrained`` + ``extramerge eval``'s loss of that
folder, and (b) its loss of an SMA merge equals ``extramerge merge`` (method sma) + ``from_pretrained`` +
the same loss, to 1e-5. A config stating no maximum length (BLOOM) is evaluated at one default length by
both; an architecture transformers does not know, or checkpoints of two architectures, are one line, exit 2.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests._ckpt_factory import cycle_docs

transformers = pytest.importorskip("transformers")

VOCAB = 257  # the byte tokenizer's (extramerge.lm.tokenizer)
N_CKPTS = 5
_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
_GQA = dict(_SMALL, num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "gpt_neox": dict(_SMALL, max_position_embeddings=64),
    "llama": _GQA,
    "mistral": _GQA,
    "qwen2": _GQA,
    "qwen3": dict(_GQA, head_dim=8),
    "opt": dict(_SMALL, ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32),
    "phi": dict(_SMALL, max_position_embeddings=64),
    "phi3": _GQA,
    "gemma": dict(_GQA, head_dim=8),
    "gemma2": dict(_GQA, head_dim=8),
    "olmo": dict(_SMALL, max_position_embeddings=64),
    "olmo2": _GQA,
    "falcon": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64),
    "gptj": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4),
    "stablelm": _GQA,
    "starcoder2": _GQA,
    "bloom": dict(hidden_size=32, n_layer=2, n_head=4),  # no maximum length in its config
}
AVAILABLE = [f for f in FAMILIES if f in transformers.CONFIG_MAPPING]


def _config(family: str):
    from extramerge.lm.tokenizer import EOS_ID

    ids = dict(bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    return transformers.AutoConfig.for_model(family, vocab_size=VOCAB, **FAMILIES[family], **ids)


def _write_run(root, family: str, seed: int = 0):
    """checkpoint-100 .. checkpoint-500: θ_k = θ_0 + k·0.02·v + 0.01·ε_k, each by save_pretrained."""
    from extramerge.lm.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(family)).eval()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    drift = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    for k in range(1, N_CKPTS + 1):
        with torch.no_grad():
            for name, p in model.named_parameters():  # tied parameters are one object, moved once
                p.copy_(base[name] + k * 0.02 * drift[name] + 0.01 * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / f"checkpoint-{100 * k}")
    build_tokenizer().save_pretrained(root)
    return root


def _reference_loss(folder, docs, seq_len):
    """from_pretrained + the loss ``extramerge eval`` reports (its own forward on the same blocks)."""
    from extramerge import eval as E
    from extramerge.lm.tokenizer import build_tokenizer

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return E.evaluate_loss(model, build_tokenizer(), docs, seq_len=seq_len).loss


@pytest.fixture(scope="module")
def docs():
    return cycle_docs(6, n_words=12)


@pytest.mark.parametrize("family", AVAILABLE)
def test_study_loads_checkpoints_and_merges_as_from_pretrained(family, tmp_path, docs):
    from extramerge.api import merge
    from extramerge.study.evaluator import Evaluator
    from extramerge.study.inputs import read_checkpoints

    root = _write_run(tmp_path / "run", family)
    ckpts, infos = read_checkpoints([root])
    assert len(ckpts) == N_CKPTS
    ev = Evaluator(ckpts, list(infos), root, batch_size=4)
    ev.add_half("test", docs)
    L = ev.halves["test"][0].seq_len
    newest = np.eye(N_CKPTS)[-1]
    assert ev.measure(newest, "test").loss == pytest.approx(
        _reference_loss(ckpts[-1].path, docs, L), abs=1e-5
    )
    merge([c.path for c in ckpts], method="sma", window=N_CKPTS, output=tmp_path / "sma", progress=False)
    sma = np.full(N_CKPTS, 1 / N_CKPTS)
    assert ev.measure(sma, "test").loss == pytest.approx(_reference_loss(tmp_path / "sma", docs, L), abs=1e-5)


def test_a_config_without_maximum_length_has_one_default_for_study_and_eval(tmp_path, docs, capsys):
    """BLOOM states no maximum length: the study and ``extramerge eval`` both use DEFAULT_SEQ_LEN."""
    from extramerge import eval as E
    from extramerge.cli import main as em_main
    from extramerge.study.evaluator import Evaluator
    from extramerge.study.inputs import read_checkpoints

    if "bloom" not in AVAILABLE:
        pytest.skip("this transformers has no BLOOM")
    root = _write_run(tmp_path / "run", "bloom")
    ckpts, infos = read_checkpoints([root])
    ev = Evaluator(ckpts, list(infos), root, batch_size=4)
    ev.add_half("test", docs)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "e.json"
    rc = em_main(["eval", str(ckpts[-1].path), "--data", str(data), "--cloze", "0", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    row = json.loads(out.read_text())["models"][0]
    assert ev.halves["test"][0].seq_len == row["seq_len"] == E.DEFAULT_SEQ_LEN
    assert row["loss"] == pytest.approx(ev.measure(np.eye(N_CKPTS)[-1], "test").loss, abs=1e-5)


def _study_argv(run, tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in cycle_docs(16, n_words=120)))
    return ["study", str(run), "--data", str(data), "-o", str(tmp_path / "out"), "--quiet", "--threads", "1"]


def _one_line_exit_2(argv, tmp_path, capsys) -> str:
    from extramerge.cli import main as em_main

    rc = em_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    return err[0]


def test_unknown_architecture_and_mixed_architectures_are_one_line(tmp_path, capsys):
    run = _write_run(tmp_path / "run", "llama")
    folders = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    cfg = json.loads((folders[0] / "config.json").read_text())
    # Mistral has Llama's tensor names and shapes: only config.json tells the two apart
    (folders[0] / "config.json").write_text(
        json.dumps({**cfg, "model_type": "mistral", "architectures": ["MistralForCausalLM"]})
    )
    err = _one_line_exit_2(_study_argv(run, tmp_path), tmp_path, capsys)
    assert "different architectures" in err and "checkpoint-100" in err and "mistral" in err
    for f in folders:
        (f / "config.json").write_text(json.dumps({**cfg, "model_type": "riverllama-unknown"}))
    err = _one_line_exit_2(_study_argv(run, tmp_path), tmp_path, capsys)
    assert "checkpoint-500" in err and "riverllama-unknown" in err


def test_load_weights_takes_checkpoint_names_and_refuses_what_does_not_fit():
    from extramerge.eval import load_weights

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config("gpt_neox")).eval()
    # the name GPT-NeoX checkpoints use: transformers 5 calls the module lm_head and renames it on load
    rename = {"lm_head.weight": "embed_out.weight"}
    state = {rename.get(k, k): torch.randn_like(v) for k, v in model.state_dict().items()}
    assert "embed_out.weight" in state
    load_weights(model, state)
    assert torch.equal(model.get_output_embeddings().weight, state["embed_out.weight"])
    with pytest.raises(ValueError, match="does not have: .*stray"):
        load_weights(model, {**state, "stray.weight": torch.zeros(1)})
    final = "gpt_neox.final_layer_norm.weight"
    with pytest.raises(ValueError, match=f"missing from the checkpoints: .*{final}"):
        load_weights(model, {k: v for k, v in state.items() if k != final})
    with pytest.raises(ValueError, match=f"another shape.*{final}"):
        load_weights(model, {**state, final: torch.zeros(3)})


def test_load_weights_takes_a_base_models_checkpoint_as_from_pretrained():
    """A checkpoint of the base model alone (no ``model.`` prefix) loads into the causal LM, as
    ``from_pretrained`` loads it, the head tied to its embeddings."""
    from extramerge.eval import load_weights

    torch.manual_seed(0)
    cfg = _config("llama")
    cfg.tie_word_embeddings = True
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    state = {k: torch.randn_like(v) for k, v in model.model.state_dict().items()}
    load_weights(model, state)
    got = model.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())
    assert torch.equal(model.lm_head.weight, state["embed_tokens.weight"])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
