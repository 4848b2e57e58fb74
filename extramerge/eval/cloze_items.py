"""Cloze items: building LAMBADA-style multiple-choice questions from held-out documents, and saving
them to / loading them from a JSONL file so that every model is asked the same questions."""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import outputs, safety
from .data import as_texts

__all__ = ["ClozeItem", "build_cloze", "save_cloze", "load_cloze", "is_cloze_file"]


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
    texts = as_texts(texts)
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
    model folders) are never written onto (see extramerge.io.outputs.check_file)."""
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
