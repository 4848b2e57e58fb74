"""GPT-2 and LLaMA model presets over the 257-token byte vocabulary (built from configs, never downloaded).

A *size* names a shape (layers, width, heads, context); an *arch* names the block that fills it:

- ``gpt2``: ``GPT2LMHeadModel`` (learned positions, LayerNorm, GELU MLP 4d, biases, tied embeddings, no
  dropout);
- ``llama``: ``LlamaForCausalLM`` (RoPE, RMSNorm, SwiGLU MLP of ``intermediate`` ≈ 8/3 d rounded up to a
  multiple of 64, no biases, untied ``lm_head`` as in LLaMA: with 257 tokens untying costs only 257·d).

Every size works with both archs. ``gpt2-124m`` and ``llama-125m`` are the same shape (GPT-2 small: 12 × 768,
12 heads, context 1024), named after the family that made it famous; ``124m``/``125m`` are aliases, so
``--arch llama --size gpt2-124m`` is valid. With a byte vocabulary the embeddings are tiny, so the actual
counts are below the names (GPT-2 small's 124M includes 38M of 50k-token embeddings): see ``PRESETS`` and
``count_params``; the trainer records the actual count in run.json.

=============  ======  =====  =====  =======  ===================  ===================
size           layers  width  heads  context  gpt2 params          llama params
=============  ======  =====  =====  =======  ===================  ===================
tiny           4       128    4      128      0.84 M               0.87 M
small          6       384    6      256      10.8 M               11.0 M
gpt2-124m      12      768    12     1024     85.9 M               85.3 M
llama-125m     (same shape as gpt2-124m)
llama-350m     24      1024   16     1024     303 M                ~308 M
=============  ======  =====  =====  =======  ===================  ===================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from .tokenizer import EOS_ID, VOCAB_SIZE

__all__ = [
    "ARCHS",
    "PRESETS",
    "Preset",
    "resolve_size",
    "build_config",
    "build_model",
    "count_params",
    "preset_param_count",
]

ARCHS = ("gpt2", "llama")


@dataclass(frozen=True)
class Preset:
    n_layer: int
    d_model: int
    n_head: int
    seq_len: int
    intermediate: int | None = None  # LLaMA MLP width; None: 8/3 d rounded up to a multiple of 64

    @property
    def llama_intermediate(self) -> int:
        if self.intermediate is not None:
            return self.intermediate
        return -(-8 * self.d_model // 3 // 64) * 64


_GPT2_SMALL = Preset(n_layer=12, d_model=768, n_head=12, seq_len=1024)
PRESETS: dict[str, Preset] = {
    "tiny": Preset(n_layer=4, d_model=128, n_head=4, seq_len=128),
    "small": Preset(n_layer=6, d_model=384, n_head=6, seq_len=256),
    "gpt2-124m": _GPT2_SMALL,
    "llama-125m": _GPT2_SMALL,
    "llama-350m": Preset(n_layer=24, d_model=1024, n_head=16, seq_len=1024),
}
_ALIASES = {"124m": "gpt2-124m", "125m": "llama-125m", "350m": "llama-350m", "gpt2-350m": "llama-350m"}
_OVERRIDES = ("n_layer", "d_model", "n_head", "seq_len", "intermediate")


def resolve_size(size: str, **overrides) -> Preset:
    """The preset named ``size`` (or an alias), with shape fields replaced by non-None ``overrides``."""
    name = _ALIASES.get(size, size)
    if name not in PRESETS:
        names = ", ".join([*PRESETS, *_ALIASES])
        raise ValueError(f"unknown model size {size!r} (choose from {names})")
    bad = sorted(set(overrides) - set(_OVERRIDES))
    if bad:
        raise ValueError(f"unknown model override {bad[0]!r} (allowed: {', '.join(_OVERRIDES)})")
    preset = replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
    for k, v in asdict(preset).items():
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"{k} must be a positive integer, got {v!r}")
    if preset.d_model % preset.n_head:
        raise ValueError(f"d_model ({preset.d_model}) must be divisible by n_head ({preset.n_head})")
    return preset


def build_config(arch: str, size: str = "tiny", **overrides):
    """A transformers ``GPT2Config`` or ``LlamaConfig`` for ``arch`` at ``size`` (vocab 257,
    bos = eos = pad = 256)."""
    p = resolve_size(size, **overrides)
    ids = dict(vocab_size=VOCAB_SIZE, bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            n_layer=p.n_layer,
            n_embd=p.d_model,
            n_head=p.n_head,
            n_positions=p.seq_len,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            **ids,
        )
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            num_hidden_layers=p.n_layer,
            hidden_size=p.d_model,
            num_attention_heads=p.n_head,
            num_key_value_heads=p.n_head,
            intermediate_size=p.llama_intermediate,
            max_position_embeddings=p.seq_len,
            rms_norm_eps=1e-5,
            attention_dropout=0.0,
            tie_word_embeddings=False,
            **ids,
        )
    raise ValueError(f"unknown arch {arch!r} (choose from {', '.join(ARCHS)})")


def build_model(arch: str, size: str = "tiny", **overrides) -> torch.nn.Module:
    """A freshly initialised causal LM (fp32, on the current default device; seed torch first for a
    reproducible init). Uses PyTorch SDPA attention."""
    from transformers import AutoModelForCausalLM

    config = build_config(arch, size, **overrides)
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation="sdpa", dtype=torch.float32, trust_remote_code=False
    )
    return model


def count_params(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def preset_param_count(arch: str, size: str = "tiny", **overrides) -> int:
    """Parameter count of a preset, built on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        return count_params(build_model(arch, size, **overrides))
