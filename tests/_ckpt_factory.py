"""Small checkpoint trajectories in every format, for tests (shared by the engine, CLI and analysis tests).

Every factory writes N checkpoints θ_k = θ_0 + k·drift·v + noise·ε_k (k = 1..N, one fixed direction v,
fresh Gaussian ε_k per checkpoint, all seeded) and returns their paths oldest first, named by step:
step_000100, step_000200, ... (``steps`` overrides). Integer tensors, where present, count the step, so
"copied from the newest" is checkable. Nothing is downloaded: HF models come from tiny configs.

Public, stable helpers:
    make_hf_run(tmp, arch='gpt2'|'llama', n=6, fmt='safetensors'|'sharded'|'bin'|'sharded-bin', seed=0)
    make_safetensors_files(tmp, n=4, seed=0, dtype=torch.float32, with_int=True)
    make_torch_files(tmp, n=4, seed=0, nested=None|'nanogpt'|'state_dict', prefix=None|'_orig_mod.'|'module.')
    toy_state(seed=0, dtype=torch.float32, with_int=True, tied=False) -> dict   (θ_0 of the file factories)
    trajectory(base, n, seed=0, drift=0.05, noise=0.01) -> list[dict]
    load_state(path) -> dict[str, Tensor]       (independent reader: safetensors.torch / torch.load only)
    reference_merge(paths, weights) -> dict     (Σ w_j θ_j in float64, integer tensors from the newest)
    tiny_config(arch) / tiny_model(arch, seed)  (transformers GPT2 / Llama with 2 layers, width 32)
    byte_gpt2(seed=0, n_positions=64, n_embd=32)  (2-layer GPT-2, byte vocabulary of 257, eval mode)
    cycle_docs(n_docs, n_words=60)              (documents cycling through CYCLE_WORDS, a shift per document)
    train_briefly(model, tok, texts, steps, seed=0) -> model   (a short AdamW loop, returned in eval mode)
    save_model(model, tok, folder) -> folder    (save_pretrained of the model and the tokenizer)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DEFAULT_DRIFT = 0.05
DEFAULT_NOISE = 0.01
_PREFIXES = ("_orig_mod.", "module.")


def _steps(n: int, steps) -> list[int]:
    return list(steps) if steps is not None else [100 * (k + 1) for k in range(n)]


def trajectory(
    base: dict[str, torch.Tensor],
    n: int,
    seed: int = 0,
    drift: float = DEFAULT_DRIFT,
    noise: float = DEFAULT_NOISE,
    steps=None,
) -> list[dict[str, torch.Tensor]]:
    """N states θ_k = θ_0 + k·drift·v + noise·ε_k for floating tensors (computed in float64, then cast to
    each tensor's dtype); integer tensors become base + step (bool tensors stay as they are)."""
    g = torch.Generator().manual_seed(seed)
    direction = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in base.items()}
    out = []
    for k, step in enumerate(_steps(n, steps), start=1):
        state = {}
        for name, v in base.items():
            if v.dtype.is_floating_point:
                eps = torch.randn(v.shape, generator=g, dtype=torch.float64)
                state[name] = (v.double() + k * drift * direction[name] + noise * eps).to(v.dtype)
            elif v.dtype == torch.bool:
                state[name] = v.clone()
            else:
                state[name] = v + step
        out.append(state)
    return out


def toy_state(seed: int = 0, dtype=torch.float32, with_int: bool = True, tied: bool = False) -> dict:
    """θ_0 of a GPT-like toy model (a few shapes incl. a scalar and an empty tensor).

    With ``tied``, ``lm_head.weight`` is the same tensor object as ``transformer.wte.weight``.
    """
    g = torch.Generator().manual_seed(seed + 1000)
    shapes = {
        "transformer.wte.weight": (16, 8),
        "transformer.h.0.attn.c_attn.weight": (8, 24),
        "transformer.h.0.attn.c_attn.bias": (24,),
        "transformer.h.0.mlp.c_fc.weight": (8, 32),
        "transformer.ln_f.weight": (8,),
        "transformer.scale": (),
        "transformer.empty": (0, 4),
    }
    state = {k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for k, s in shapes.items()}
    if with_int:
        state["transformer.h.0.attn.counter"] = torch.arange(3, dtype=torch.int64)
        state["transformer.mask"] = torch.tensor([True, False, True])
    if tied:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def _tie(states: list[dict], tied: bool) -> list[dict]:
    if tied:
        for s in states:
            s["lm_head.weight"] = s["transformer.wte.weight"]
    return states


def make_safetensors_files(
    tmp, n: int = 4, seed: int = 0, dtype=torch.float32, with_int: bool = True, steps=None, **kw
) -> list[Path]:
    """N single .safetensors files tmp/step_000100.safetensors, ... (safetensors.torch.save_file)."""
    from safetensors.torch import save_file

    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    states = trajectory(toy_state(seed, dtype, with_int), n, seed, steps=steps, **kw)
    paths = []
    for step, state in zip(_steps(n, steps), states, strict=True):
        p = tmp / f"step_{step:06d}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(p))
        paths.append(p)
    return paths


def make_torch_files(
    tmp,
    n: int = 4,
    seed: int = 0,
    nested: str | None = None,
    prefix: str | None = None,
    tied: bool = True,
    dtype=torch.float32,
    with_int: bool = True,
    steps=None,
    suffix: str = ".pt",
    **kw,
) -> list[Path]:
    """N PyTorch files tmp/step_000100.pt, ... holding the toy state dict.

    nested=None: a plain state dict; 'nanogpt': {'model': sd, 'optimizer': ..., 'model_args': ...,
    'iter_num': step, 'best_val_loss': tensor, 'config': ...} as nanoGPT's train.py saves; 'state_dict':
    {'state_dict': sd, 'epoch': ...}. ``prefix`` prepends '_orig_mod.' (torch.compile) or 'module.' (DDP)
    to every key. With ``tied``, lm_head.weight shares storage with transformer.wte.weight.
    """
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    states = _tie(trajectory(toy_state(seed, dtype, with_int), n, seed, steps=steps, **kw), tied)
    paths = []
    for step, state in zip(_steps(n, steps), states, strict=True):
        sd = {f"{prefix or ''}{k}": v for k, v in state.items()}
        if nested == "nanogpt":
            obj = {
                "model": sd,
                "optimizer": {"state": {0: {"exp_avg": torch.zeros(8)}}, "param_groups": [{"lr": 1e-3}]},
                "model_args": {"n_layer": 1, "n_embd": 8, "vocab_size": 16},
                "iter_num": step,
                "best_val_loss": torch.tensor(3.0),
                "config": {"learning_rate": 6e-4, "dataset": "toy"},
            }
        elif nested == "state_dict":
            obj = {"state_dict": sd, "epoch": step // 100}
        elif nested is None:
            obj = sd
        else:
            raise ValueError(f"unknown nesting {nested!r}")
        p = tmp / f"step_{step:06d}{suffix}"
        torch.save(obj, p)
        paths.append(p)
    return paths


def tiny_config(arch: str = "gpt2"):
    """A 2-layer, width-32 transformers config (vocab 64) for 'gpt2' (tied lm_head) or 'llama' (untied)."""
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
        )
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=64,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
            tie_word_embeddings=False,
        )
    raise ValueError(f"unknown arch {arch!r}")


def tiny_model(arch: str = "gpt2", seed: int = 0):
    """A freshly initialised tiny AutoModelForCausalLM (seeded)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


# ---------------------------------------------------------------------------- tiny byte-level language models

CYCLE_WORDS = "black crown dream fight gloss happy jewel vapor".split()  # distinct first and last letters


def byte_gpt2(seed: int = 0, n_positions: int = 64, n_embd: int = 32):
    """A freshly initialised 2-layer GPT-2 over the byte vocabulary (257 tokens, bos = eos = EOS_ID), seeded,
    in eval mode. transformers' default dropout stays on (unlike extramerge.lm.models.build_config)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from extramerge.lm.tokenizer import EOS_ID

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=n_embd, n_head=2, vocab_size=257, n_positions=n_positions,
                     bos_token_id=EOS_ID, eos_token_id=EOS_ID)  # fmt: skip
    return GPT2LMHeadModel(cfg).eval()


def cycle_docs(n_docs: int, n_words: int = 60) -> list[str]:
    """``n_docs`` documents of ``n_words`` CYCLE_WORDS in cyclic order, document k starting at word k."""
    w = CYCLE_WORDS
    return [" ".join(w[(k + i) % len(w)] for i in range(n_words)) + "." for k in range(n_docs)]


def train_briefly(
    model, tok, texts, steps: int, seed: int = 0, lr: float = 3e-3, batch: int = 16, block: int = 64
):
    """Train ``model`` in place for ``steps`` AdamW steps on random ``block``-token windows (drawn with a
    generator seeded by ``seed``) of the texts' token stream; returns the model in eval mode. Dropout draws
    from torch's global generator, so the result also depends on its state on entry."""
    from extramerge import eval as E

    stream = E.token_blocks(texts, tok, 1 << 16).ids[0]
    stream = stream[stream != E.PAD]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - block, (batch,), generator=g)
        x = torch.stack([stream[s : s + block] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def save_model(model, tok, folder) -> Path:
    """``model`` and ``tok`` saved with save_pretrained into ``folder`` (returned)."""
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)


def _save_bin_shards(sd: dict, folder: Path, parts: int) -> None:
    names = list(sd)
    size = -(-len(names) // parts)
    chunks = [names[i : i + size] for i in range(0, len(names), size)]
    weight_map = {}
    for k, chunk in enumerate(chunks):
        fname = f"pytorch_model-{k + 1:05d}-of-{len(chunks):05d}.bin"
        torch.save({n: sd[n].clone() for n in chunk}, folder / fname)
        weight_map.update({n: fname for n in chunk})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def make_hf_run(
    tmp,
    arch: str = "gpt2",
    n: int = 6,
    fmt: str = "safetensors",
    seed: int = 0,
    dtype=torch.float32,
    steps=None,
    **kw,
) -> list[Path]:
    """N HF checkpoint folders tmp/step_000100/, ... of a tiny GPT-2 or Llama trajectory.

    fmt: 'safetensors' (save_pretrained: model.safetensors, tied lm_head stored once), 'sharded'
    (save_pretrained with a small max_shard_size: model-0000k-of-0000K.safetensors + index), 'bin'
    (config.json + torch.save(state_dict) as pytorch_model.bin: the tied lm_head.weight shares storage
    with transformer.wte.weight), 'sharded-bin' (pytorch_model-*.bin + index, tied duplicate dropped).
    """
    tmp = Path(tmp)
    model = tiny_model(arch, seed).to(dtype)
    tied = getattr(model.config, "tie_word_embeddings", False)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if tied:
        base.pop("lm_head.weight", None)
    states = trajectory(base, n, seed, steps=steps, **kw)
    paths = []
    for step, state in zip(_steps(n, steps), states, strict=True):
        model.load_state_dict(state, strict=False)
        folder = tmp / f"step_{step:06d}"
        if fmt == "safetensors":
            model.save_pretrained(folder)
        elif fmt == "sharded":
            model.save_pretrained(folder, max_shard_size="40KB")
        elif fmt in ("bin", "sharded-bin"):
            folder.mkdir(parents=True, exist_ok=True)
            model.config.save_pretrained(folder)
            sd = model.state_dict()
            if fmt == "bin":
                torch.save(sd, folder / "pytorch_model.bin")
            else:
                if tied:
                    sd.pop("lm_head.weight", None)
                _save_bin_shards(sd, folder, parts=3)
        else:
            raise ValueError(f"unknown fmt {fmt!r}")
        paths.append(folder)
    return paths


# ------------------------------------------------------------------------------------ independent reading


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p) :], True
    return name


def _load_file(p: Path) -> dict:
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    obj = torch.load(p, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    return {_strip(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_state(path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file or HF folder, read with safetensors.torch / torch.load only."""
    path = Path(path)
    if path.is_file():
        return _load_file(path)
    out = {}
    for pattern in ("model*.safetensors", "pytorch_model*.bin"):
        for f in sorted(path.glob(pattern)):
            out.update(_load_file(f))
        if out:
            return out
    files = [f for f in path.iterdir() if f.suffix in (".safetensors", ".pt", ".pth", ".bin")]
    if len(files) == 1:
        return _load_file(files[0])
    raise FileNotFoundError(f"no weights in {path}")


def reference_merge(paths, weights) -> dict[str, torch.Tensor]:
    """Σ_j w_j θ_j per floating tensor in float64; integer/bool tensors from the newest checkpoint."""
    states = [load_state(p) for p in paths]
    out = {}
    for name, newest in states[-1].items():
        if newest.dtype.is_floating_point:
            out[name] = sum(float(w) * s[name].double() for w, s in zip(weights, states, strict=True))
        else:
            out[name] = newest.clone()
    return out
