"""Held-out evaluation of causal language models: loss, bits per byte and a LAMBADA-style cloze.

    texts = load_texts("data/val.jsonl")
    blocks = token_blocks(texts, tokenizer, seq_len=256)        # tokenize once ...
    for state in weight_sets:                                    # ... evaluate many weight sets
        model.load_state_dict(state)
        r = evaluate_loss(model, tokenizer, None, blocks=blocks)  # r.loss, r.bits_per_byte
    items = build_cloze(texts, n_items=200, seed=0)              # fixed item set (save_cloze/load_cloze)
    c = cloze_accuracy(model, tokenizer, items)                  # c.accuracy ± c.stderr vs c.chance
    evaluate_model("runs/gpt2/step_004000", "data/val.jsonl", cloze_items=200)  # all of it, one dict

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

import contextlib
import hashlib
import json
import math
import os
import re
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import outputs, safety

__all__ = [
    "PAD",
    "TokenBlocks",
    "LossResult",
    "ClozeItem",
    "ClozeResult",
    "load_texts",
    "token_blocks",
    "evaluate_loss",
    "build_cloze",
    "cloze_accuracy",
    "save_cloze",
    "load_cloze",
    "check_model_folder",
    "load_model",
    "max_positions",
    "evaluate_model",
    "tokenizer_fingerprint",
]

PAD = -100  # marks padded positions in TokenBlocks.ids (also cross_entropy's ignore_index)
_WEIGHT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_NAMES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_TOKENIZER_FILES = (*_TOKENIZER_NAMES, "merges.txt", "special_tokens_map.json", "added_tokens.json")


# ---------------------------------------------------------------------------------------------- texts


def load_texts(path: str | os.PathLike) -> list[str]:
    """Held-out documents from ``path``.

    * ``.jsonl``: one JSON object per line with a string field ``"text"``; each line is one document.
    * any other file (``.txt``, ``.md``, ...): the whole file (UTF-8) is ONE document (no splitting).
    * a folder: each ``*.txt`` file in it (sorted by name) is one document.

    Documents that are empty or whitespace only are dropped. Raises ValueError naming the file when it is
    missing, unreadable, not UTF-8, malformed (JSON line without a string "text") or holds no text.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: no such file or folder")
    if p.is_dir():
        safety.folder_files(p)  # a .txt link leaving the data folder is refused
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix == ".txt")
        if not files:
            raise ValueError(f"{p}: folder holds no .txt files")
        texts = [t for f in files for t in _read_text_file(f)]
    elif p.suffix == ".jsonl":
        texts = _read_jsonl(p)
    else:
        texts = _read_text_file(p)
    if not texts:
        raise ValueError(f"{p}: no text (empty file)")
    return texts


def _read(p: Path) -> str:
    return safety.read_text(p)


def _read_text_file(p: Path) -> list[str]:
    text = _read(p)
    return [text] if text.strip() else []


def _read_jsonl(p: Path) -> list[str]:
    texts = []
    for lineno, obj in safety.jsonl(p):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f'{p}:{lineno}: expected an object with a string "text" field')
        if obj["text"].strip():
            texts.append(obj["text"])
    return texts


def _as_texts(texts: Sequence[str] | str | os.PathLike) -> list[str]:
    if isinstance(texts, str | os.PathLike):
        return load_texts(texts)
    texts = list(texts)
    if not texts:
        raise ValueError("no texts given")
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be strings")
    return texts


# --------------------------------------------------------------------------------------------- blocks


class TokenBlocks(NamedTuple):
    """Tokenized held-out text, ready for ``evaluate_loss(..., blocks=)``; unpacks as ``(ids, n_bytes)``.

    ``ids``: int64 tensor [n_blocks, seq_len + 1]; consecutive rows overlap by one token; positions past
    the end of the stream (last row only) hold ``PAD`` (-100). ``n_bytes``: UTF-8 bytes of the scored text
    (documents + one per EOS terminator).
    """

    ids: Any
    n_bytes: int

    @property
    def seq_len(self) -> int:
        return int(self.ids.shape[1]) - 1

    @property
    def n_tokens(self) -> int:
        """Number of predicted (scored) tokens."""
        return int((self.ids[:, 1:] != PAD).sum())


def _encode_plain(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text with no special tokens added, and special-token strings inside the text
    split into ordinary tokens (``split_special_tokens=True``) when the tokenizer supports it."""
    try:
        enc = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)
    except TypeError:  # pragma: no cover - tokenizers without split_special_tokens
        enc = tokenizer(texts, add_special_tokens=False)
    return enc["input_ids"]


def token_blocks(texts: Sequence[str] | str | os.PathLike, tokenizer, seq_len: int) -> TokenBlocks:
    """Tokenize ``texts`` (or a path for ``load_texts``) into overlapping evaluation blocks.

    Stream = ``EOS d1 EOS d2 ... EOS dn EOS``; block b = stream[b·L : b·L + L + 1] (L = ``seq_len``),
    so every stream token after the first is a label exactly once. The last block is padded with ``PAD``.
    Deterministic: same texts and tokenizer → identical tensor.
    """
    import torch

    texts = _as_texts(texts)
    if not isinstance(seq_len, int | np.integer) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    seq_len = int(seq_len)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no EOS token (needed to separate documents)")
    docs = _encode_plain(tokenizer, texts)
    total = 1 + sum(len(d) + 1 for d in docs)
    n_pred = total - 1
    n_blocks = -(-n_pred // seq_len)
    stream = np.full(n_blocks * seq_len + 1, PAD, dtype=np.int64)
    stream[0] = eos
    pos = 1
    for d in docs:
        stream[pos : pos + len(d)] = d
        pos += len(d)
        stream[pos] = eos
        pos += 1
    ids = torch.from_numpy(stream).unfold(0, seq_len + 1, seq_len).contiguous()
    n_bytes = sum(len(t.encode("utf-8")) for t in texts) + len(texts)
    return TokenBlocks(ids, n_bytes)


def document_index(texts: Sequence[str], tokenizer, seq_len: int):
    """For ``token_blocks(texts, tokenizer, seq_len)``: the document each label belongs to, int64
    [n_blocks, seq_len] (a document's EOS terminator is its own; padding is −1). Used to sum the NLL per
    document, for standard errors clustered by document."""
    import torch

    texts = _as_texts(texts)
    docs = _encode_plain(tokenizer, texts)
    labels = np.concatenate([np.full(len(d) + 1, i, dtype=np.int64) for i, d in enumerate(docs)])
    n_blocks = -(-labels.size // seq_len)
    out = np.full(n_blocks * seq_len, -1, dtype=np.int64)
    out[: labels.size] = labels
    return torch.from_numpy(out.reshape(n_blocks, seq_len))


# ----------------------------------------------------------------------------------------------- loss


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


def max_positions(model) -> int | None:
    """Longest sequence the model accepts: config ``n_positions``, ``max_position_embeddings`` or
    ``n_ctx`` (the order lm-eval uses); None when the config states none."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _resolve_device(model, device):
    import torch

    if device is None:
        try:
            return next(model.parameters()).device
        except StopIteration:  # pragma: no cover
            return torch.device("cpu")
    device = torch.device(device)
    model.to(device)
    return device


def _autocast(device):
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate_loss(
    model,
    tokenizer,
    texts: Sequence[str] | str | os.PathLike | None,
    *,
    seq_len: int | None = None,
    batch_size: int = 16,
    device=None,
    blocks: TokenBlocks | tuple | None = None,
) -> LossResult:
    """Mean held-out NLL of a causal LM (see the module docstring for the exact convention).

    ``seq_len`` defaults to the model's maximum positions. Pass ``blocks`` from ``token_blocks`` to skip
    tokenization (then ``texts`` may be None): the fast path when many weight sets are loaded into the
    same model. Runs under ``torch.inference_mode`` in eval mode (the model's training flag is restored
    afterwards), with bf16 autocast on CUDA; NLL sums are accumulated in float64. ``device``: where to
    run (the model is moved there); default the model's device.
    """
    import torch
    import torch.nn.functional as F

    t0 = time.perf_counter()
    limit = max_positions(model)
    if blocks is None:
        if texts is None:
            raise ValueError("give texts or blocks")
        seq_len = seq_len or limit
        if seq_len is None:
            raise ValueError("the model config states no maximum length: pass seq_len")
        blocks = token_blocks(texts, tokenizer, seq_len)
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
    device = _resolve_device(model, device)
    was_training = model.training
    model.eval()
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    total = torch.zeros((), dtype=acc_dtype, device=device)
    try:
        with torch.inference_mode(), _autocast(device):
            for i in range(0, ids.shape[0], batch_size):
                b = ids[i : i + batch_size].to(device, non_blocking=True)
                labels = b[:, 1:]
                inputs = b[:, :-1].clamp_min(0)  # PAD only trails the last block: harmless under causality
                logits = model(input_ids=inputs, use_cache=False).logits
                nll = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(),
                    labels.reshape(-1),
                    ignore_index=PAD,
                    reduction="sum",
                )
                total += nll.to(acc_dtype)
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


# ---------------------------------------------------------------------------------------------- cloze


@dataclass(frozen=True)
class ClozeItem:
    """One cloze question: pick the word that continues ``context``.

    ``context`` ends just before the target (in a held-out document ``context + target`` is followed by a
    non-letter); ``candidates`` are distinct and contain ``target`` once, at index ``label``.
    """

    context: str
    target: str
    candidates: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "candidates", tuple(self.candidates))
        if self.candidates.count(self.target) != 1 or len(set(self.candidates)) != len(self.candidates):
            raise ValueError(
                f"cloze item for {self.target!r}: candidates must be distinct and hold the target"
            )

    @property
    def label(self) -> int:
        return self.candidates.index(self.target)

    def to_dict(self) -> dict:
        return {"context": self.context, "target": self.target, "candidates": list(self.candidates),
                "label": self.label}  # fmt: skip


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


_TARGET = re.compile(r"(?<= )[A-Za-z]+(?![A-Za-z0-9_'’\-])")
_WORDS = re.compile(r"[A-Za-z]+")
_VOCAB_WORD = re.compile(r"(?<![A-Za-z0-9_'’\-])[A-Za-z]{3,}(?![A-Za-z0-9_'’\-])")


def _case_like(word: str, target: str) -> str:
    if target.isupper():
        return word.upper()
    if target[0].isupper():
        return word.capitalize()
    return word


def build_cloze(
    texts: Sequence[str] | str | os.PathLike,
    *,
    n_items: int = 200,
    n_candidates: int = 8,
    context_bytes: int = 300,
    min_context_bytes: int | None = None,
    min_word_len: int = 4,
    seed: int = 0,
) -> list[ClozeItem]:
    """LAMBADA-style multiple-choice cloze items from held-out documents; deterministic for a seed.

    Target: a word of ≥ ``min_word_len`` ASCII letters, preceded by a space and followed by a non-letter
    (punctuation, space, end), so it is a whole word. Context: the ≤ ``context_bytes`` UTF-8 bytes of the
    same document before the target, starting at a word boundary, ending with the space before the target;
    at least ``min_context_bytes`` (default context_bytes // 2). As in LAMBADA, targets that also occur
    (case-insensitively) earlier in their context are preferred; other targets fill up when too few exist.
    Passages of chosen items do not overlap. Distractors: ``n_candidates − 1`` distinct words of ≥ 3
    letters from the held-out vocabulary (words seen at least twice when there are enough), drawn
    uniformly among words of the target's length (the band widens by one letter at a time only when it
    holds too few words: summed log-likelihood favours short candidates, so equal lengths keep it fair),
    never equal to the target ignoring case, given the target's capitalisation. The target's position among
    the candidates is random. Returns fewer than ``n_items`` items (with a warning) when the text is short.
    """
    texts = _as_texts(texts)
    if n_items < 1:
        raise ValueError(f"n_items must be positive, got {n_items}")
    if n_candidates < 2:
        raise ValueError(f"n_candidates must be at least 2, got {n_candidates}")
    if context_bytes < 1:
        raise ValueError(f"context_bytes must be positive, got {context_bytes}")
    min_ctx = context_bytes // 2 if min_context_bytes is None else min_context_bytes
    rng = np.random.default_rng(seed)

    # One pass: eligible targets (doc, start, end, repeated-in-context flag) and vocabulary counts.
    vocab: Counter[str] = Counter()
    elig: list[tuple[int, int, int]] = []
    repeated: list[bool] = []
    for d, text in enumerate(texts):
        vocab.update(m.group(0).lower() for m in _VOCAB_WORD.finditer(text))
        last: dict[str, int] = {}
        targets = {m.start(): m.end() for m in _TARGET.finditer(text)}
        for m in _WORDS.finditer(text):
            s, w = m.start(), m.group(0).lower()
            e = targets.get(s)
            if e == m.end() and e - s >= min_word_len and s >= min_ctx // 4:
                elig.append((d, s, e))
                repeated.append(last.get(w, -(10**18)) >= s - context_bytes)
            last[w] = s
    rep = np.flatnonzero(np.array(repeated, dtype=bool))
    rest = np.flatnonzero(~np.array(repeated, dtype=bool))
    order = np.concatenate([rng.permutation(rep), rng.permutation(rest)]).astype(np.int64)

    chosen: list[tuple[str, str]] = []
    spans: dict[int, list[tuple[int, int]]] = {}
    seen: set[tuple[str, str]] = set()
    for k in order:
        if len(chosen) == n_items:
            break
        d, s, e = elig[int(k)]
        text = texts[d]
        ctx = _context_before(text, s, context_bytes)
        if len(ctx.encode("utf-8")) < min_ctx or not ctx.endswith(" "):
            continue
        cs = s - len(ctx)
        if any(cs < b and a < e for a, b in spans.get(d, ())):
            continue
        key = (ctx, text[s:e])
        if key in seen:
            continue
        seen.add(key)
        spans.setdefault(d, []).append((cs, e))
        chosen.append(key)
    if not chosen:
        raise ValueError(
            f"no cloze passages in the held-out text: need words of ≥ {min_word_len} letters after "
            f"≥ {min_ctx} bytes of context"
        )
    if len(chosen) < n_items:
        warnings.warn(f"only {len(chosen)} cloze items could be built (asked for {n_items})", stacklevel=2)

    words = [w for w, c in vocab.items() if c >= 2]
    if len(words) < 4 * n_candidates:
        words = list(vocab)
    if len(words) < n_candidates:
        raise ValueError(
            f"held-out vocabulary too small for {n_candidates} candidates ({len(words)} distinct words)"
        )
    words.sort(key=lambda w: (len(w), w))
    index = {w: i for i, w in enumerate(words)}
    lens = np.array([len(w) for w in words])
    want = n_candidates - 1  # widen the length band only as far as needed

    items = []
    for ctx, target in chosen:
        n, t = len(target), index.get(target.lower(), -1)
        width = 0
        while True:
            lo = int(np.searchsorted(lens, n - width, "left"))
            hi = int(np.searchsorted(lens, n + width, "right"))
            size = hi - lo - (lo <= t < hi)
            if size >= want or size == len(words) - (t >= 0):
                break
            width += 1
        picks = lo + rng.choice(size, size=n_candidates - 1, replace=False)
        picks = [int(i) + (lo <= t <= i) for i in picks]  # skip over the target's own slot
        cands = [_case_like(words[i], target) for i in picks]
        cands.insert(int(rng.integers(0, n_candidates)), target)
        items.append(ClozeItem(ctx, target, tuple(cands)))
    return items


def _context_before(text: str, start: int, context_bytes: int) -> str:
    """The last ≤ context_bytes UTF-8 bytes of text[:start], cut to start at a word boundary."""
    lo = max(0, start - context_bytes)
    ctx = text[lo:start]
    raw = ctx.encode("utf-8")
    cut = lo > 0
    if len(raw) > context_bytes:
        ctx = raw[-context_bytes:].decode("utf-8", errors="ignore")
        cut = True
    if cut and ctx and not text[start - len(ctx) - 1].isspace():
        m = re.search(r"\s", ctx)
        ctx = ctx[m.end() :] if m else ""
    return ctx.lstrip() if cut else ctx


def save_cloze(
    items: Sequence[ClozeItem], path: str | os.PathLike, *, force: bool = False, inputs=()
) -> Path:
    """Write items as JSONL ({"context", "target", "candidates", "label"} per line), atomically. An
    existing file is replaced only with ``force`` and only if it is a cloze item file; ``inputs`` (data,
    model folders) are never written onto (see extramerge.outputs.check_file)."""
    text = "".join(json.dumps(it.to_dict(), ensure_ascii=False) + "\n" for it in items)
    return outputs.write_file(path, text, force=force, own=is_cloze_file, inputs=inputs)


def is_cloze_file(path: Path) -> bool:
    """Whether ``path`` holds cloze items as ``save_cloze`` writes them (what --force may replace)."""
    try:
        return bool(load_cloze(path))
    except ValueError:
        return False


def load_cloze(path: str | os.PathLike) -> list[ClozeItem]:
    """Items written by ``save_cloze``; ValueError naming the file (and line) on a missing/bad file."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: no such file")
    items = []
    for lineno, obj in safety.jsonl(p):
        try:
            item = ClozeItem(obj["context"], obj["target"], tuple(obj["candidates"]))
            if not all(isinstance(x, str) for x in (item.context, item.target, *item.candidates)):
                raise TypeError("not strings")
            if "label" in obj and obj["label"] != item.label:
                raise ValueError("label does not point at the target")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{p}:{lineno}: not a cloze item ({type(e).__name__}: {e})") from None
        items.append(item)
    if not items:
        raise ValueError(f"{p}: no cloze items (empty file)")
    return items


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
) -> ClozeResult:
    """Multiple-choice cloze accuracy: each candidate is scored by the summed log-likelihood of its tokens
    given the context; prediction = argmax (first on ties); accuracy = fraction predicting the target.

    Scoring follows lm-eval's ``loglikelihood`` exactly (so ``acc`` of the task from
    ``extramerge.lmeval.write_task`` agrees): trailing whitespace of the context is moved to the
    continuation (this adds the same log P(' ' | context) to every candidate: the ranking is unchanged),
    the tokenizer's default special tokens are used, and sequences longer than ``max_length`` + 1 (default
    the model's maximum positions) are cut on the left.

    Two equivalent evaluation paths (same numbers up to float rounding): batched, where every
    context + candidate sequence is a row (sorted by length, right-padded, ``batch_size`` rows per
    forward); and shared-context, where an item's context runs once and its candidates continue from the
    KV cache (≈ n_candidates times less compute for short candidates, but two small forwards per item).
    ``share_context`` None picks shared on CPU, batched elsewhere; items whose longest sequence would be
    cut on the left always take the batched path.
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
    max_length = max_length or max_positions(model) or 2048
    device = _resolve_device(model, device)
    if share_context is None:
        share_context = device.type == "cpu"

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
        with torch.inference_mode(), _autocast(device):
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
            for (i, j), v in zip(batched, _score_batched(model, seqs, batch_size, device), strict=True):
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


def _score_batched(model, seqs: list[tuple[list[int], int]], batch_size: int, device) -> list[float]:
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
        logits = model(input_ids=full[:, :-1].clamp_min(0), use_cache=False).logits
        lp = logits[mask].float().log_softmax(-1).gather(1, full[:, 1:][mask][:, None])[:, 0]
        per_row = torch.zeros(len(idx), dtype=torch.float64, device=device)
        per_row.index_add_(0, mask.nonzero()[:, 0], lp.double())
        out[torch.tensor(idx)] = per_row.cpu()
    return out.tolist()


def _score_shared(model, ctx: list[int], conts: list[list[int]], device) -> list[float] | None:
    """Summed log-prob of each continuation after one shared context pass (KV cache repeated per row);
    None when the model returns no cache that can be repeated along the batch."""
    import torch

    out = model(input_ids=torch.tensor([ctx], device=device), use_cache=True)
    cache = getattr(out, "past_key_values", None)
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
        cache.batch_repeat_interleave(k)
        logits = model(input_ids=toks[:, :-1], past_key_values=cache, use_cache=True).logits
        lp = logits[mask].float().log_softmax(-1).gather(1, toks[:, 1:][mask][:, None])[:, 0]
        scores = scores.index_add(0, mask.nonzero()[:, 0], lp.double())
    return scores.cpu().tolist()


# ---------------------------------------------------------------------------------------------- models


def _tokenizer_folder(folder: Path) -> Path | None:
    """The model folder itself, else its parent (a run folder holding one tokenizer for all steps)."""
    for f in (folder, folder.parent):
        if any((f / n).is_file() for n in _TOKENIZER_NAMES):
            return f
    return None


def check_model_folder(path: str | os.PathLike, *, tokenizer: bool = True) -> Path:
    """Check that ``path`` is a Hugging Face causal-LM folder (config.json + weights + tokenizer files,
    the tokenizer possibly in the parent folder) without loading it; ValueError naming the path."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: no such file or folder")
    if not p.is_dir():
        raise ValueError(f"{p}: not a model folder (expected a folder with config.json and weights)")
    if not (p / "config.json").is_file():
        raise ValueError(f"{p}: not a Hugging Face model folder (no config.json)")
    if not any((p / n).is_file() for n in _WEIGHT_NAMES):
        raise ValueError(f"{p}: no model weights (expected model.safetensors or pytorch_model.bin)")
    if tokenizer and _tokenizer_folder(p) is None:
        raise ValueError(f"{p}: no tokenizer (expected tokenizer.json or tokenizer_config.json)")
    safety.folder_files(p)  # no links leaving the folder, no FIFOs, before transformers opens anything
    if tokenizer and _tokenizer_folder(p) != p:
        safety.folder_files(p.parent, _TOKENIZER_FILES)
    return p


def tokenizer_files(path: str | os.PathLike) -> list[Path]:
    """The tokenizer files a model folder uses (in it, or in its run folder)."""
    folder = _tokenizer_folder(Path(path))
    return [] if folder is None else [folder / n for n in _TOKENIZER_FILES if (folder / n).is_file()]


def tokenizer_fingerprint(path: str | os.PathLike) -> str | None:
    """Hash of the tokenizer files of a model folder (equal hashes → identical token blocks)."""
    files = tokenizer_files(path)
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def load_model(path: str | os.PathLike, *, device=None, dtype=None):
    """``(model, tokenizer)`` from a local HF folder via AutoModelForCausalLM / AutoTokenizer
    (``local_files_only=True``); the tokenizer may sit in the parent folder. ValueError naming the path
    when the folder is not a loadable causal LM."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    p = check_model_folder(path)
    hf_logging.disable_progress_bar()
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        tok = AutoTokenizer.from_pretrained(_tokenizer_folder(p), local_files_only=True)
    except Exception as e:
        raise ValueError(f"{p}: cannot load the tokenizer ({type(e).__name__}: {_first_line(e)})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(p, **kwargs)
    except Exception as e:
        raise ValueError(f"{p}: cannot load the model ({type(e).__name__}: {_first_line(e)})") from None
    if device is not None:
        model.to(device)
    model.eval()
    return model, tok


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


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
) -> dict:
    """Loss, bits per byte and (optionally) cloze accuracy of one model, as a JSON-ready dict.

    ``model_or_path``: a model object (then ``tokenizer`` is required) or a local HF folder (loaded with
    ``load_model``). ``data``: held-out texts or a path for ``load_texts``. ``cloze_items``: None (no
    cloze), an int N (``build_cloze(data, n_items=N, n_candidates=..., seed=...)``), a JSONL path from
    ``save_cloze``, or items. ``blocks``: precomputed ``token_blocks`` (skips tokenization).

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
    texts = None if blocks is not None and not isinstance(cloze_items, int) else _as_texts(data)
    loss = evaluate_loss(
        model, tokenizer, texts, seq_len=seq_len, batch_size=batch_size, device=device, blocks=blocks
    )
    cloze = None
    if cloze_items is not None and not (isinstance(cloze_items, int) and cloze_items == 0):
        if isinstance(cloze_items, int):
            cloze_items = build_cloze(texts, n_items=cloze_items, n_candidates=n_candidates, seed=seed)
        c = cloze_accuracy(model, tokenizer, cloze_items, batch_size=cloze_batch_size, device=device)
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
        "seq_len": seq_len or (TokenBlocks(*blocks).seq_len if blocks is not None else max_positions(model)),
        "loss_seconds": loss.seconds,
        "tokens_per_s": loss.tokens_per_s,
        "load_seconds": load_s,
        "device": str(dev),
        "cloze": cloze,
    }
