"""Held-out text for evaluation: reading .txt/.jsonl documents and laying them out as packed token blocks
(``token_blocks``), with the document each scored token belongs to (``document_index``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..io import safety

__all__ = ["PAD", "TokenBlocks", "load_texts", "as_texts", "token_blocks", "document_index"]

PAD = -100  # marks padded positions in TokenBlocks.ids (also cross_entropy's ignore_index)


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


def as_texts(texts: Sequence[str] | str | os.PathLike) -> list[str]:
    """``texts`` as a non-empty list of strings; a path is read with ``load_texts``."""
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

    texts = as_texts(texts)
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

    texts = as_texts(texts)
    docs = _encode_plain(tokenizer, texts)
    labels = np.concatenate([np.full(len(d) + 1, i, dtype=np.int64) for i, d in enumerate(docs)])
    n_blocks = -(-labels.size // seq_len)
    out = np.full(n_blocks * seq_len, -1, dtype=np.int64)
    out[: labels.size] = labels
    return torch.from_numpy(out.reshape(n_blocks, seq_len))
