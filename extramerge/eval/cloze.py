"""Cloze accuracy: each candidate of a cloze item scored by the summed log-likelihood of its tokens given
the context, the way lm-eval's ``loglikelihood`` scores a multiple-choice task."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial

import numpy as np

from .cloze_items import ClozeItem, load_cloze
from .data import PAD
from .loss import hf_logits
from .model import autocast, packed_inputs, resolve_device, seq_len_of

__all__ = ["ClozeResult", "cloze_accuracy"]


@dataclass
class ClozeResult:
    """Cloze accuracy. ``stderr`` = sqrt(acc·(1 − acc) / (n − 1)) (the sample standard error lm-eval
    reports as acc_stderr; NaN for n = 1); ``chance`` = 1 / candidates; ``scores[i][j]``: summed
    log-likelihood of candidate j of item i; ``predictions[i]``: argmax (first on ties)."""

    accuracy: float
    n: int
    chance: float
    stderr: float
    seconds: float
    predictions: list[int] = field(default_factory=list, repr=False)
    scores: list[list[float]] = field(default_factory=list, repr=False)

    @property
    def items_per_s(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self, *, details: bool = False) -> dict:
        d = asdict(self)
        if not details:
            d.pop("predictions")
            d.pop("scores")
        return d


def _encode_item(tokenizer, context: str, candidates: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per candidate, by lm-eval's rule: trailing whitespace of the context
    moves to the continuation (so BPE tokenizers see ' word'); the whole string (stripped context +
    trailing whitespace + candidate) is encoded and split after the stripped context's tokens. The stripped
    context is encoded once per item; its ids are shared by the pairs."""
    stripped = context.rstrip()
    ctx = tokenizer.encode(stripped)
    pairs = []
    for c in candidates:
        whole = tokenizer.encode(stripped + context[len(stripped) :] + c)
        pairs.append((ctx, whole[len(ctx) :]))
    return pairs


def cloze_accuracy(
    model,
    tokenizer,
    items: Sequence[ClozeItem] | str | os.PathLike,
    *,
    batch_size: int = 32,
    device=None,
    max_length: int | None = None,
    share_context: bool | None = None,
    forward=None,
) -> ClozeResult:
    """Multiple-choice cloze accuracy: each candidate is scored by the summed log-likelihood of its tokens
    given the context; prediction = argmax (first on ties); accuracy = fraction predicting the target.

    Scoring follows lm-eval's ``loglikelihood`` exactly (so ``acc`` of the task from
    ``extramerge.eval.lmeval.write_task`` agrees): trailing whitespace of the context is moved to the
    continuation (this adds the same log P(' ' | context) to every candidate: the ranking is unchanged),
    the tokenizer's default special tokens are used, and sequences longer than ``max_length`` + 1 (default
    ``seq_len_of(model)``: the model's maximum positions, else 1024) are cut on the left.

    Two equivalent evaluation paths (same numbers up to float rounding): batched, where every
    context + candidate sequence is a row (sorted by length, right-padded, ``batch_size`` rows per
    forward); and shared-context, where an item's context runs once and its candidates continue from the
    KV cache, passed back as a transformers Cache object (``cache=``, or ``past_key_values=`` before
    transformers renamed it) (≈ n_candidates times less compute for short candidates, but two small
    forwards per item).
    ``share_context`` None picks shared on CPU, batched elsewhere; items whose longest sequence would be
    cut on the left always take the batched path. ``forward``: input_ids [B, T] → the logits of every
    position, for a model that is not transformers' (a ``--model-factory`` one): every item then takes the
    batched path (such a model has no KV cache to share).
    """
    import torch

    t0 = time.perf_counter()
    if isinstance(items, str | os.PathLike):
        items = load_cloze(items)
    items = list(items)
    if not items:
        raise ValueError("no cloze items given")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    max_length = seq_len_of(model, max_length)
    device = resolve_device(model, device)
    if share_context is None:
        share_context = device.type == "cpu"
    share_context = share_context and forward is None
    forward = forward if forward is not None else partial(hf_logits, model)

    # (context ids, continuation ids) per candidate, items in order
    pairs = [_encode_item(tokenizer, it.context, it.candidates) for it in items]
    for it, row in zip(items, pairs, strict=True):
        for c, (_, cont) in zip(it.candidates, row, strict=True):
            if not cont:
                raise ValueError(f"candidate {c!r} encodes to no tokens")
    scores: list[list[float]] = [[0.0] * len(it.candidates) for it in items]
    batched: list[tuple[int, int]] = []  # (item, candidate) scored by the batched path
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(device), packed_inputs():
            for i, row in enumerate(pairs):
                ctx = row[0][0]
                fits = len(ctx) + max(len(cont) for _, cont in row) <= max_length + 1
                shared = None
                if share_context and fits and len(ctx) > 0:
                    shared = _score_shared(model, ctx, [cont for _, cont in row], device)
                    share_context = shared is not None  # a model without a repeatable KV cache: batch all
                if shared is not None:
                    scores[i] = shared
                else:
                    batched.extend((i, j) for j in range(len(row)))
            seqs = []
            for i, j in batched:
                ctx, cont = pairs[i][j]
                full = (ctx + cont)[-(max_length + 1) :]
                seqs.append((full, min(len(cont), len(full) - 1)))
            for (i, j), v in zip(batched, _score_batched(forward, seqs, batch_size, device), strict=True):
                scores[i][j] = v
    finally:
        model.train(was_training)
    preds = [int(np.argmax(row)) for row in scores]  # the first maximum on ties
    correct = sum(p == it.label for p, it in zip(preds, items, strict=True))
    n = len(items)
    acc = correct / n
    chance = float(np.mean([1 / len(it.candidates) for it in items]))  # 1 / n_candidates
    return ClozeResult(
        accuracy=acc,
        n=n,
        chance=chance,
        stderr=math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else float("nan"),
        seconds=time.perf_counter() - t0,
        predictions=preds,
        scores=scores,
    )


def _score_batched(forward, seqs: list[tuple[list[int], int]], batch_size: int, device) -> list[float]:
    """Summed log-prob of the last n tokens of each sequence; rows sorted by length, right-padded."""
    import torch

    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out = torch.zeros(len(seqs), dtype=torch.float64)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        width = max(len(seqs[j][0]) for j in idx)
        full = torch.full((len(idx), width), PAD, dtype=torch.long)
        mask = torch.zeros(len(idx), width - 1, dtype=torch.bool)
        for r, j in enumerate(idx):
            toks, n_cont = seqs[j]
            full[r, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            mask[r, len(toks) - 1 - n_cont : len(toks) - 1] = True  # positions predicting the continuation
        full, mask = full.to(device), mask.to(device)
        logits = forward(full[:, :-1].clamp_min(0))
        lp = logits[mask].float().log_softmax(-1).gather(1, full[:, 1:][mask][:, None])[:, 0]
        per_row = torch.zeros(len(idx), dtype=torch.float64, device=device)
        per_row.index_add_(0, mask.nonzero()[:, 0], lp.double())
        out[torch.tensor(idx)] = per_row.cpu()
    return out.tolist()


def _returned_cache(out):
    """The KV cache a forward returned, and the keyword that passes it back in: ``cache`` (the current
    transformers API; ``past_key_values`` as a keyword or an output attribute is deprecated there) or
    ``past_key_values`` (older transformers, whose outputs name the field so). (None, None) when the output
    holds no cache field (a model that returns logits only)."""
    fields = getattr(type(out), "__dataclass_fields__", {})
    for name in ("cache", "past_key_values"):
        if name in fields:
            return getattr(out, name), name
    return None, None


def _score_shared(model, ctx: list[int], conts: list[list[int]], device) -> list[float] | None:
    """Summed log-prob of each continuation after one shared context pass (KV cache repeated per row);
    None when the model returns no cache that can be repeated along the batch (a Cache object with
    ``batch_repeat_interleave``, e.g. transformers' DynamicCache)."""
    import torch

    out = model(input_ids=torch.tensor([ctx], device=device), use_cache=True)
    cache, keyword = _returned_cache(out)
    width = max(len(c) for c in conts)
    if width > 1 and not hasattr(cache, "batch_repeat_interleave"):
        return None
    first = out.logits[0, -1].float().log_softmax(-1)  # predicts every continuation's first token
    scores = first[torch.tensor([c[0] for c in conts], device=device)].double()
    if width > 1:
        k = len(conts)
        toks = torch.zeros(k, width, dtype=torch.long)
        mask = torch.zeros(k, width - 1, dtype=torch.bool)
        for r, c in enumerate(conts):
            toks[r, : len(c)] = torch.tensor(c, dtype=torch.long)
            mask[r, : len(c) - 1] = True
        toks, mask = toks.to(device), mask.to(device)
        cache.batch_repeat_interleave(k)  # positions continue from cache.get_seq_length()
        logits = model(input_ids=toks[:, :-1], use_cache=True, **{keyword: cache}).logits
        lp = logits[mask].float().log_softmax(-1).gather(1, toks[:, 1:][mask][:, None])[:, 0]
        scores = scores.index_add(0, mask.nonzero()[:, 0], lp.double())
    return scores.cpu().tolist()
