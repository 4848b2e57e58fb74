"""One model's whole evaluation as a JSON-ready dict: held-out loss, bits per byte and, optionally, cloze
accuracy (what ``extramerge eval`` prints and writes for each model)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from .cloze import cloze_accuracy
from .cloze_items import ClozeItem, build_cloze
from .data import TokenBlocks, as_texts
from .loss import evaluate_loss
from .model import load_model, seq_len_of

__all__ = ["evaluate_model"]


def evaluate_model(
    model_or_path,
    data: Sequence[str] | str | os.PathLike,
    *,
    tokenizer=None,
    cloze_items: int | Sequence[ClozeItem] | str | os.PathLike | None = None,
    n_candidates: int = 8,
    seq_len: int | None = None,
    batch_size: int = 16,
    cloze_batch_size: int = 32,
    device=None,
    dtype=None,
    blocks: TokenBlocks | None = None,
    seed: int = 0,
    forward=None,
    max_length: int | None = None,
) -> dict:
    """Loss, bits per byte and (optionally) cloze accuracy of one model, as a JSON-ready dict.

    ``model_or_path``: a model object (then ``tokenizer`` is required) or a local HF folder (loaded with
    ``load_model``). ``data``: held-out texts or a path for ``load_texts``. ``cloze_items``: None (no
    cloze), an int N (``build_cloze(data, n_items=N, n_candidates=..., seed=...)``), a JSONL path from
    ``save_cloze``, or items. ``blocks``: precomputed ``token_blocks`` (skips tokenization). ``forward``
    (input_ids → logits of every position) and ``max_length`` (the longest cloze sequence, default the
    model's maximum): for a model that is not transformers' (see ``evaluate_loss``, ``cloze_accuracy``).

    Keys: name, path, loss, bits_per_byte, perplexity, tokens, bytes, seq_len, loss_seconds, tokens_per_s,
    load_seconds, device, and cloze (None or {accuracy, n, chance, stderr, seconds, items_per_s}).
    """
    t0 = time.perf_counter()
    path = None
    if isinstance(model_or_path, str | os.PathLike):
        path = Path(model_or_path)
        model, tok = load_model(path, device=device, dtype=dtype)
        tokenizer = tokenizer or tok
    else:
        model = model_or_path
        if tokenizer is None:
            raise ValueError("a model object needs its tokenizer: pass tokenizer=")
    load_s = time.perf_counter() - t0
    texts = None if blocks is not None and not isinstance(cloze_items, int) else as_texts(data)
    loss = evaluate_loss(
        model,
        tokenizer,
        texts,
        seq_len=seq_len,
        batch_size=batch_size,
        device=device,
        blocks=blocks,
        forward=forward,
    )
    cloze = None
    if cloze_items is not None and not (isinstance(cloze_items, int) and cloze_items == 0):
        if isinstance(cloze_items, int):
            cloze_items = build_cloze(texts, n_items=cloze_items, n_candidates=n_candidates, seed=seed)
        c = cloze_accuracy(
            model,
            tokenizer,
            cloze_items,
            batch_size=cloze_batch_size,
            device=device,
            max_length=max_length,
            forward=forward,
        )
        cloze = {**c.to_dict(), "items_per_s": c.items_per_s}
    dev = next(model.parameters()).device
    return {
        "name": path.name if path is not None else type(model).__name__,
        "path": str(path) if path is not None else None,
        "loss": loss.loss,
        "bits_per_byte": loss.bits_per_byte,
        "perplexity": loss.perplexity,
        "tokens": loss.tokens,
        "bytes": loss.bytes,
        "seq_len": TokenBlocks(*blocks).seq_len if blocks is not None else seq_len_of(model, seq_len),
        "loss_seconds": loss.seconds,
        "tokens_per_s": loss.tokens_per_s,
        "load_seconds": load_s,
        "device": str(dev),
        "cloze": cloze,
    }
