"""Held-out text for evaluation: reading .txt/.jsonl documents and laying them out as packed token blocks
(``token_blocks``), with the document each scored token belongs to (``document_index``).

The text readers here (``text_files``, ``read_text_file``, ``jsonl_texts``) are the package's one way to
read documents from untrusted files and folders; the trainer's corpus reader (``extramerge.lm.data``) uses
them too: only regular files inside the folder (a link leaving it, a FIFO or a device is refused before
anything is read), at most ``TEXT_LIMIT`` bytes from a file or a folder, JSON lines bounded and strict."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from rivervalley.common.formatting import format_bytes

from ..io import CheckpointError, safety

__all__ = [
    "PAD",
    "TEXT_LIMIT",
    "TokenBlocks",
    "load_texts",
    "as_texts",
    "text_files",
    "read_text_file",
    "jsonl_texts",
    "token_blocks",
    "document_index",
]

PAD = -100  # marks padded positions in TokenBlocks.ids (also cross_entropy's ignore_index)
TEXT_LIMIT = 2**30  # bytes of text read from one file, or from one folder in all: it is all held in memory


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
        files = text_files(p, (".txt",))
        if not files:
            raise ValueError(f"{p}: folder holds no .txt files")
        texts = [read_text_file(f) for f in files]
    elif p.suffix == ".jsonl":
        texts = [t for _, t in jsonl_texts(p)]
    else:
        texts = [read_text_file(p)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"{p}: no text (empty file)")
    return texts


def text_files(
    folder: str | os.PathLike, suffixes: tuple[str, ...], *, recursive: bool = False
) -> list[Path]:
    """The files of ``folder`` (and of its subfolders when ``recursive``) whose names end in one of
    ``suffixes`` (any case), sorted by path; hidden names are skipped and links to folders not followed.

    Each must be a regular file whose real path stays inside ``folder``, and together they hold at most
    ``TEXT_LIMIT`` bytes: otherwise CheckpointError naming the file, before any of them is read."""
    root = Path(folder)
    found = []
    for where, dirs, names in os.walk(root, onerror=_walk_error):
        dirs[:] = [d for d in dirs if not d.startswith(".")] if recursive else []
        found += [Path(where, n) for n in names if not n.startswith(".") and n.lower().endswith(suffixes)]
    total = 0
    for f in sorted(found):
        if not safety.inside(f, root):
            raise CheckpointError(f"{f}: a link that leaves the folder {root}; refusing to read it")
        total += safety.regular(f).st_size  # a FIFO or device is refused here, never opened
        if total > TEXT_LIMIT:
            raise CheckpointError(f"{root}: its text files hold more than {format_bytes(TEXT_LIMIT)}")
    return sorted(found)


def _walk_error(e: OSError) -> None:
    raise CheckpointError(f"{e.filename}: cannot read ({e.strerror or type(e).__name__})")


def read_text_file(path: str | os.PathLike, *, errors: str = "strict") -> str:
    """The UTF-8 text of a regular file of at most ``TEXT_LIMIT`` bytes (a FIFO or /dev/zero is refused,
    never read forever); ``errors="replace"`` replaces bytes that are not UTF-8 instead of refusing."""
    p = Path(path)
    too_large = CheckpointError(f"{p}: larger than {format_bytes(TEXT_LIMIT)}; refusing to read it")
    with os.fdopen(safety.open_regular(p), "rb") as f:
        if os.fstat(f.fileno()).st_size > TEXT_LIMIT:  # a sparse 3 GiB file is refused unread
            raise too_large
        raw = f.read(TEXT_LIMIT + 1)  # a file growing meanwhile is still read no further
    if len(raw) > TEXT_LIMIT:
        raise too_large
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{p}: not UTF-8 text (byte {e.start})") from None


def jsonl_texts(path: str | os.PathLike) -> list[tuple[int, str]]:
    """(line number, text) of each line of a .jsonl file whose ``"text"`` is not blank; every line must be
    a JSON object with a string ``"text"`` (read by ``safety.jsonl``: bounded lines, strict JSON), and the
    texts hold at most ``TEXT_LIMIT`` characters in all. CheckpointError naming file:line otherwise."""
    p = Path(path)
    out, total = [], 0
    for lineno, obj in safety.jsonl(p):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise CheckpointError(f'{p}:{lineno}: expected an object with a string "text" field')
        total += len(obj["text"])
        if total > TEXT_LIMIT:
            raise CheckpointError(f"{p}:{lineno}: more than {format_bytes(TEXT_LIMIT)} of text; refusing it")
        if obj["text"].strip():
            out.append((lineno, obj["text"]))
    return out


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
