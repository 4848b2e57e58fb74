"""Held-out loss and bits per byte of a causal language model over packed token blocks.

Loss convention. The documents are tokenized without special tokens and laid out as one stream
``EOS d1 EOS d2 EOS ... dn EOS``: every document is preceded and terminated by the tokenizer's EOS. Every
token of the stream after the first is predicted exactly once: the stream is cut into blocks of
``seq_len + 1`` tokens that overlap by one (block b holds tokens b·L .. b·L+L), so a block's inputs are its
first L tokens and its labels its last L. The last block is right-padded; its padded label positions are
masked (causal attention keeps the padding from influencing real positions). A token's context is
therefore what precedes it within its block, as in training on packed sequences.

    loss          = Σ NLL / number of predicted tokens                 (nats per token)
    bits_per_byte = Σ NLL / ln 2 / Σ_docs (UTF-8 bytes of the doc + 1)

The "+ 1" counts each document's EOS terminator as one byte of scored text (it is a predicted token).
For a byte-level tokenizer (one token per UTF-8 byte) tokens == bytes and bits_per_byte = loss / ln 2.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from .data import PAD, TokenBlocks, token_blocks
from .model import autocast, max_positions, packed_inputs, resolve_device, seq_len_of

__all__ = ["LossResult", "evaluate_loss", "token_nll", "hf_logits"]

NLL_CHUNK_BYTES = 32 << 20  # float32 logits per cross-entropy call (it takes as much again)


def hf_logits(model, input_ids):
    """The logits of every position of a transformers causal LM, without a KV cache."""
    return model(input_ids=input_ids, use_cache=False).logits


def token_nll(logits, labels):
    """The NLL (float64, float32 on MPS; nats) of every label position, PAD positions 0: the cross-entropy
    of the float32 logits, taken over a few rows at a time so that its float copy and log-softmax never
    hold more than ``NLL_CHUNK_BYTES`` (one call over a 1024 x 50k block would take 400 MB beside the
    logits). Each row's value is the one a single call gives."""
    import torch
    import torch.nn.functional as F

    flat = logits.reshape(-1, logits.shape[-1])
    lab = labels.reshape(-1)
    f64 = logits.device.type != "mps"  # MPS has no float64
    out = torch.empty(lab.shape[0], dtype=torch.float64 if f64 else torch.float32, device=logits.device)
    rows = max(1, NLL_CHUNK_BYTES // (4 * flat.shape[1]))
    for i in range(0, flat.shape[0], rows):
        out[i : i + rows] = F.cross_entropy(
            flat[i : i + rows].float(), lab[i : i + rows], ignore_index=PAD, reduction="none"
        )
    return out


@dataclass
class LossResult:
    """Held-out loss. ``loss``: mean NLL in nats per predicted token; ``bits_per_byte``: total NLL / ln 2 /
    ``bytes`` (UTF-8 bytes of the documents + 1 per EOS terminator); ``tokens``: predicted tokens;
    ``seconds``: wall time of the call (tokenization included unless ``blocks`` were given)."""

    loss: float
    bits_per_byte: float
    tokens: int
    bytes: int
    seconds: float
    tokens_per_s: float
    nats: float = 0.0

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_loss(
    model,
    tokenizer,
    texts: Sequence[str] | str | os.PathLike | None,
    *,
    seq_len: int | None = None,
    batch_size: int = 16,
    device=None,
    blocks: TokenBlocks | tuple | None = None,
    forward=None,
) -> LossResult:
    """Mean held-out NLL of a causal LM (see the module docstring for the exact convention).

    ``seq_len`` defaults to ``seq_len_of(model)``. Pass ``blocks`` from ``token_blocks`` to skip
    tokenization (then ``texts`` may be None): the fast path when many weight sets are loaded into the
    same model. Runs under ``torch.inference_mode`` in eval mode (the model's training flag is restored
    afterwards), with bf16 autocast on CUDA; NLL sums are accumulated in float64. ``device``: where to
    run (the model is moved there); default the model's device. ``forward``: input_ids [B, T] → the
    logits of every position [B, T, vocab], for a model that is not transformers' (default
    :func:`hf_logits`).
    """
    import torch

    t0 = time.perf_counter()
    limit = max_positions(model)
    if blocks is None:
        if texts is None:
            raise ValueError("give texts or blocks")
        blocks = token_blocks(texts, tokenizer, seq_len_of(model, seq_len))
    else:
        blocks = TokenBlocks(*blocks)
        if seq_len is not None and seq_len != blocks.seq_len:
            raise ValueError(f"seq_len={seq_len} but the given blocks have seq_len {blocks.seq_len}")
    ids = blocks.ids
    L = blocks.seq_len
    if limit is not None and L > limit:
        raise ValueError(f"seq_len {L} exceeds the model's maximum of {limit} positions")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = resolve_device(model, device)
    was_training = model.training
    model.eval()
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    total = torch.zeros((), dtype=acc_dtype, device=device)
    try:
        with torch.inference_mode(), autocast(device), packed_inputs():
            for i in range(0, ids.shape[0], batch_size):
                b = ids[i : i + batch_size].to(device, non_blocking=True)
                labels = b[:, 1:]
                inputs = b[:, :-1].clamp_min(0)  # PAD only trails the last block: harmless under causality
                logits = forward(inputs) if forward is not None else hf_logits(model, inputs)
                total += token_nll(logits, labels).to(acc_dtype).sum()
        nats = float(total.item())  # .item() waits for the device
    finally:
        model.train(was_training)
    n_tokens = blocks.n_tokens
    seconds = time.perf_counter() - t0
    return LossResult(
        loss=nats / n_tokens,
        bits_per_byte=nats / math.log(2) / blocks.n_bytes,
        tokens=n_tokens,
        bytes=int(blocks.n_bytes),
        seconds=seconds,
        tokens_per_s=n_tokens / seconds if seconds > 0 else float("inf"),
        nats=nats,
    )
