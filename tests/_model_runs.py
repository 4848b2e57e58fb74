"""Runs of checkpoints that are not HF folders, for the tests of ``--model-factory`` and ``--config``
(``extramerge study`` and ``extramerge eval``); their fixtures are in tests/extramerge/conftest.py.

    write_nanogpt_run(root) -> states   ckpt_100.pt .. ckpt_800.pt as nanoGPT's train.py writes them
    write_dcp_run(root) -> states       root/run/step-100 .. step-800 (DCP saves of a tiny HF llama's state
                                        dict) and root/config/ (its config.json)
    write_tokenizer(folder)             the byte tokenizer (extramerge.lm.tokenizer), saved
    write_text(path)                    16 cycle_docs documents as .jsonl
    blocks_of(tok_dir, docs, L)         extramerge.eval.token_blocks with the saved tokenizer
    direct_loss(model, blocks)          mean NLL of every scored token, the model's own forward, float64
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from _ckpt_factory import cycle_docs
from _dcp_factory import dcp_save

from extramerge.study.factories import GPT, GPTConfig

VOCAB = 257  # the byte tokenizer's (extramerge.lm.tokenizer)
N = 8
ARGS = dict(n_layer=2, n_head=2, n_embd=16, block_size=32, bias=True, vocab_size=VOCAB, dropout=0.0)
FACTORY = "extramerge.study.factories:nanogpt"
LLAMA_POSITIONS = 64


def drifts(state: dict, seed: int):
    """θ_k = θ_0 + k·0.02·v + 0.01·ε_k for k = 1..N (one dict per checkpoint)."""
    g = torch.Generator().manual_seed(seed)
    v = {k: torch.randn(t.shape, generator=g) for k, t in state.items()}
    for k in range(1, N + 1):
        yield {n: t + k * 0.02 * v[n] + 0.01 * torch.randn(t.shape, generator=g) for n, t in state.items()}


def write_tokenizer(folder: Path) -> Path:
    from extramerge.lm.tokenizer import build_tokenizer

    build_tokenizer().save_pretrained(folder)
    return folder


def write_text(path: Path) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in cycle_docs(16, n_words=120)))
    return path


def write_nanogpt_run(root: Path) -> list[dict]:
    """ckpt_100.pt .. ckpt_800.pt as nanoGPT's train.py writes them under torch.compile: {'model':
    state dict with '_orig_mod.' names and lm_head.weight tied to transformer.wte.weight, 'model_args',
    'iter_num', 'optimizer', 'config', ...}; returns each checkpoint's state dict (plain names)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**ARGS))
    base = {k: v.detach().clone() for k, v in model.named_parameters()}  # wte/lm_head once
    states = []
    for k, params in enumerate(drifts(base, 1), start=1):
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
    return states


def llama_config():
    import transformers

    from extramerge.lm.tokenizer import EOS_ID

    return transformers.AutoConfig.for_model(
        "llama",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=LLAMA_POSITIONS,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )


def write_dcp_run(root: Path) -> list[dict]:
    """root/run/step-100 .. step-800: torch.distributed.checkpoint saves (single process) of a tiny HF
    llama's state dict, as an FSDP/torchtitan-style loop of an HF model writes them; its config.json in
    root/config, a folder apart. Returns each checkpoint's state dict."""
    import transformers

    torch.manual_seed(2)
    cfg = llama_config()
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    cfg.save_pretrained(root / "config")
    states = []
    for k, sd in enumerate(drifts(model.state_dict(), 3), start=1):
        dcp_save({n: t.contiguous() for n, t in sd.items()}, root / "run" / f"step-{100 * k}")
        states.append(sd)
    return states


def llama(state: dict | None = None):
    """The tiny llama of ``write_dcp_run`` in float32, eval mode, with ``state`` loaded."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(llama_config(), dtype=torch.float32).eval()
    if state is not None:
        model.load_state_dict(state)
    return model


def blocks_of(tok_dir, docs, L):
    from transformers import AutoTokenizer

    from extramerge.eval import token_blocks

    return token_blocks(docs, AutoTokenizer.from_pretrained(tok_dir), L)


def direct_loss(model, blocks) -> float:
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
