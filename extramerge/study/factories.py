"""Model factories for ``extramerge study --model-factory module:function``: checkpoints that are not
Hugging Face folders (nanoGPT ``.pt`` files, ...) are evaluated with a model the factory builds.

A factory is ``function(ckpt) -> torch.nn.Module``. ``ckpt`` is the newest checkpoint as the merge engine
opened it (:class:`extramerge.io.Checkpoint`): ``ckpt.path``, ``ckpt.format`` ('torch', 'dcp', ...),
``ckpt.infos`` (tensor name → ``TensorInfo`` with ``.shape``), ``ckpt.extras`` (the non-tensor entries of a
training checkpoint: nanoGPT's ``model_args``, ``iter_num``, ``config``, read with
``torch.load(weights_only=True)``) and ``ckpt.config`` (an HF folder's config.json, else None). The study
loads each merge into the module with its own tensor names (``strict``: every parameter and persistent
buffer, nothing else; a checkpoint's tied duplicate such as nanoGPT's ``lm_head.weight`` counts as given),
calls ``module(input_ids)`` and takes the logits of every position: a tensor, the first element of a tuple
or ``.logits``. The context length is read from the module: ``config``, ``model_args`` or the module
itself, as ``n_positions``, ``max_position_embeddings``, ``n_ctx``, ``block_size`` or ``max_seq_len``.

``nanogpt``: karpathy/nanoGPT's ``GPT`` (model.py), rebuilt from the ``model_args`` of the checkpoint.
Checkpoints saved with ``save_pretrained`` (this package's own models among them) need no factory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPTConfig", "GPT", "nanogpt"]


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no ``bias=False`` in older versions)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, mask_buffer: bool = False):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        if mask_buffer:  # nanoGPT without flash attention saves its causal mask as a buffer named 'bias'
            n = config.block_size
            self.register_buffer("bias", torch.tril(torch.ones(n, n)).view(1, 1, n, n))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, mask_buffer: bool = False):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, mask_buffer)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's GPT, same parameter names and math; ``forward(idx)`` returns the logits of every position
    [B, T, vocab] (nanoGPT's own returns only the last position's when no targets are given)."""

    def __init__(self, config: GPTConfig, mask_buffer: bool = False):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, mask_buffer) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx):
        t = idx.size(1)
        if t > self.config.block_size:
            raise ValueError(f"sequence of length {t}, block size is only {self.config.block_size}")
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def nanogpt(ckpt) -> GPT:
    """The factory for nanoGPT checkpoints (``torch.save({'model': ..., 'model_args': {...}, ...})``):
    ``GPT(GPTConfig(**model_args))`` in float32; ``model_args`` as nanoGPT's train.py stores it
    (n_layer, n_head, n_embd, block_size, bias, vocab_size, dropout)."""
    args = getattr(ckpt, "extras", {}).get("model_args")
    if not isinstance(args, dict):
        raise ValueError(f"{ckpt.path}: no 'model_args' dict in the checkpoint (not a nanoGPT checkpoint)")
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(str(k) for k in args if k not in known)
    if unknown:
        raise ValueError(f"{ckpt.path}: model_args has fields nanoGPT's GPTConfig does not: {unknown[:3]}")
    cfg = GPTConfig(**{k: args[k] for k in args})
    mask = any(n.endswith(".attn.bias") and len(i.shape) == 4 for n, i in ckpt.infos.items())
    return GPT(cfg, mask_buffer=mask).float()
