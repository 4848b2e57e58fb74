"""Byte-level language-model data: corpora, a deterministic train/val/test split, and ``.npy`` token files.

Corpora (``load_corpus(spec)``):

- ``pydoc`` (default): the 79 help topics of ``pydoc_data.topics`` (465 KB, ships with Python, no download).
- ``gensim-wiki``: the English Wikipedia dump excerpt bundled in the gensim wheel's test data (~100 articles,
  wiki markup stripped, ~3 MB of text). Needs ``pip install gensim`` (28 MB); gensim itself is not imported.
- ``gcide``: the Collaborative International Dictionary of English (Debian's ``dict-gcide``, 40 MB of text).
  Fetch it once with ``scripts/get_gcide.sh [DEST]``; the loader reads ``$RIVERVALLEY_GCIDE`` (a folder
  holding ``gcide.txt``, or the file itself), else ``~/.cache/rivervalley/gcide/gcide.txt``.
- a PATH: a text file (one document), a ``.jsonl`` file (one document per line, its string ``"text"``
  field), or a folder (every ``.txt``/``.md``/``.jsonl`` file below it, sorted by relative path; hidden
  names skipped, links to folders not followed). Read as eval reads ``--data`` (``extramerge.eval.data``):
  regular files inside the folder only (a link leaving it is refused), at most 1 GiB in all, strict JSON.

Split rule (``split_pieces``, ``assign_splits``). Each document is cut into *pieces* at paragraph
boundaries (blank lines): paragraphs are packed greedily into a piece until it holds at least ``target`` bytes
(2 KB) or the next paragraph would push it past ``max_bytes`` (4 KB); a paragraph longer than ``max_bytes`` is
cut at line breaks, then at spaces. Pieces are then ordered by the SHA-256 of their text (a stable hash, not
Python's ``hash()``); walking that order, a piece goes to train while the bytes before it are below
``f_train`` of the corpus, to val while below ``f_train + f_val``, else to test (default fractions
0.90/0.05/0.05). So the fractions hold to within one piece, even for pydoc's 250 pieces, and the split
depends only on the set of pieces: the same corpus always gives the same split, in any document order.

Files (``prepare(spec, out_dir)``): ``{train,val,test}.npy`` (uint16 token ids = UTF-8 bytes; every piece is
followed by ``EOS_ID`` 256, in corpus order), ``{val,test}.jsonl`` (``{"text": piece}`` per line, for held-out
evaluation and cloze), and ``meta.json`` (corpus, sizes, fractions, content hash). ``.npy`` rather than
``.bin`` so that extramerge never mistakes token files for torch checkpoints. Load with ``load_split``
(memory-mapped).
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from extramerge.eval.data import jsonl_texts, read_text_file, text_files
from extramerge.io import publish, safety
from rivervalley.common.publish import publishing

from .tokenizer import EOS_ID, encode

__all__ = [
    "Document",
    "CORPORA",
    "SPLITS",
    "DEFAULT_FRACTIONS",
    "load_corpus",
    "split_pieces",
    "assign_splits",
    "prepare",
    "load_split",
    "load_meta",
    "gcide_path",
]

CORPORA = ("pydoc", "gensim-wiki", "gcide")
SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.90, 0.05, 0.05)
PIECE_TARGET = 2048
PIECE_MAX = 4096
TEXT_SUFFIXES = (".txt", ".md")
GENSIM_WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
GCIDE_ENV = "RIVERVALLEY_GCIDE"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Document:
    name: str
    text: str


# ------------------------------------------------------------------------------------------------ corpora


def load_corpus(spec: str = "pydoc") -> list[Document]:
    """Documents of a corpus: ``pydoc``, ``gensim-wiki``, ``gcide`` or a PATH (see the module docstring).

    Raises ValueError (one line naming the corpus or path) when it is missing or holds no text.
    """
    spec = str(spec)
    if spec == "pydoc":
        docs = _pydoc()
    elif spec == "gensim-wiki":
        docs = _gensim_wiki()
    elif spec == "gcide":
        docs = _gcide()
    else:
        docs = _path_corpus(Path(spec).expanduser())
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ValueError(f"{spec}: corpus is empty (no text)")
    return docs


def _pydoc() -> list[Document]:
    from pydoc_data.topics import topics

    return [Document(f"pydoc/{name}", topics[name]) for name in sorted(topics)]


def _gensim_wiki_file() -> Path:
    spec = importlib.util.find_spec("gensim")  # finds the package without importing it (importing is slow)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("gensim-wiki: gensim is not installed; run `pip install gensim` (28 MB from PyPI)")
    for root in spec.submodule_search_locations:
        path = Path(root) / "test" / "test_data" / GENSIM_WIKI
        if path.is_file():
            return path
    raise ValueError(f"gensim-wiki: {GENSIM_WIKI} is not in the installed gensim's test/test_data folder")


def _gensim_wiki() -> list[Document]:
    docs = []
    with bz2.open(_gensim_wiki_file()) as f:
        for _, elem in ET.iterparse(f):
            if _tag(elem) != "page":
                continue
            fields = {_tag(e): e for e in elem.iter()}
            title = (fields["title"].text or "") if "title" in fields else ""
            ns = (fields["ns"].text or "") if "ns" in fields else "0"
            text = (fields["text"].text or "") if "text" in fields else ""
            elem.clear()
            if ns.strip() != "0" or "redirect" in fields or text.lstrip().upper().startswith("#REDIRECT"):
                continue
            body = strip_wiki_markup(text)
            if body:
                docs.append(Document(f"wiki/{title}", f"{title}\n\n{body}"))
    return docs


def _tag(elem) -> str:
    return elem.tag.rsplit("}", 1)[-1]


_WIKI_BLOCKS = re.compile(
    r"<(ref|math|gallery|timeline|score|syntaxhighlight|source|imagemap|chem)\b[^>]*?(?<!/)>.*?</\1\s*>",
    re.S | re.I,
)
_WIKI_INNER_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_WIKI_INNER_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_WIKI_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_WIKI_DROP_LINK = re.compile(r"^\s*(file|image|category|media|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)


def strip_wiki_markup(text: str) -> str:
    """Plain text of MediaWiki markup: templates, tables, references, files and categories removed; links,
    headings and list items reduced to their text. Good enough for language-model data, not a parser."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = _WIKI_BLOCKS.sub("", text)
    text = re.sub(r"<ref\b[^>]*/>", "", text, flags=re.I)
    text = _until_fixed(_WIKI_INNER_TEMPLATE, "", text)
    text = _until_fixed(_WIKI_INNER_TABLE, "", text)
    text = _until_fixed(_WIKI_INNER_LINK, _wiki_link_text, text)
    text = re.sub(r"\[(?:https?:)?//\S+\s+([^\]]*)\]", r"\1", text)  # [http://x label] -> label
    text = re.sub(r"\[(?:https?:)?//\S+\]", "", text)
    text = re.sub(r"<[^<>\n]+>", "", text)  # remaining HTML tags, content kept
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^(=+)\s*(.*?)\s*\1\s*$", r"\2", text, flags=re.M)
    text = re.sub(r"^[*#:;]+\s*", "- ", text, flags=re.M)
    text = re.sub(r"__[A-Z]+__", "", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _until_fixed(pattern: re.Pattern, repl, text: str) -> str:
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _wiki_link_text(m: re.Match) -> str:
    inner = m.group(1)
    if _WIKI_DROP_LINK.match(inner):
        return ""
    return inner.rsplit("|", 1)[-1]


def gcide_path() -> Path:
    """Where the GCIDE text is looked for: ``$RIVERVALLEY_GCIDE`` (folder or file) or the default cache."""
    env = os.environ.get(GCIDE_ENV)
    if env:
        p = Path(env).expanduser()
        return p / "gcide.txt" if p.is_dir() or not p.suffix else p
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "rivervalley" / "gcide" / "gcide.txt"


def _gcide() -> list[Document]:
    path = gcide_path()
    if not path.is_file():
        raise ValueError(
            f"gcide: {path} not found; run `bash scripts/get_gcide.sh {path.parent}` "
            f"(or set {GCIDE_ENV} to where it was fetched)"
        )
    # A few bytes of the 1913 text are Windows-1252, not UTF-8: replace them rather than fail.
    text = read_text_file(path, errors="replace")
    start = re.search(r"^ *Begin file \d+ of \d+", text, flags=re.M)  # skip the dictd 00-database header
    return [Document("gcide", text[start.start() :] if start else text)]


def _path_corpus(path: Path) -> list[Document]:
    """Read with eval's text readers: regular files inside the folder only, bounded, strict JSON lines."""
    if not path.exists():
        raise ValueError(
            f"{path}: no such file or folder (a corpus is {', '.join(CORPORA)}, or a path to text files)"
        )
    if not path.is_dir():
        return _file_documents(path, path.name)
    files = text_files(path, (*TEXT_SUFFIXES, ".jsonl"), recursive=True)
    if not files:
        raise ValueError(f"{path}: corpus folder holds no .txt, .md or .jsonl files")
    docs = []
    for f in files:
        docs.extend(_file_documents(f, f.relative_to(path).as_posix()))
    return docs


def _file_documents(path: Path, name: str) -> list[Document]:
    if path.suffix.lower() != ".jsonl":
        return [Document(name, read_text_file(path, errors="replace"))]
    return [Document(f"{name}:{i}", text) for i, text in jsonl_texts(path)]


# ------------------------------------------------------------------------------------------------- split


def split_pieces(text: str, *, target: int = PIECE_TARGET, max_bytes: int = PIECE_MAX) -> list[str]:
    """Cut a document into pieces at paragraph boundaries: greedy packing of paragraphs (joined by a blank
    line) until a piece reaches ``target`` bytes or the next paragraph would make it exceed ``max_bytes``."""
    paras = []
    for p in re.split(r"\n[ \t]*\n", text):
        p = p.strip("\n").rstrip()
        if p.strip():
            paras.extend(_cut_long(p, max_bytes))
    return _pack(paras, "\n\n", max_bytes, target)


def _pack(parts: list[str], sep: str, max_bytes: int, target: float = float("inf")) -> list[str]:
    """Greedy packing: join consecutive parts with ``sep`` until the joined text reaches ``target`` bytes or
    the next part would push it past ``max_bytes`` (a single oversized part stays on its own)."""
    out, cur, size = [], [], 0
    gap = len(sep.encode("utf-8"))
    for part in parts:
        n = len(part.encode("utf-8"))
        if cur and (size >= target or size + gap + n > max_bytes):
            out.append(sep.join(cur))
            cur, size = [], 0
        size += n + (gap if cur else 0)
        cur.append(part)
    if cur:
        out.append(sep.join(cur))
    return out


def _cut_long(para: str, max_bytes: int) -> list[str]:
    """A paragraph longer than ``max_bytes``: cut at line breaks, then at spaces, then anywhere."""
    if len(para.encode("utf-8")) <= max_bytes:
        return [para]
    chunks = [chunk for line in para.split("\n") for chunk in _cut_line(line, max_bytes)]
    return [c for c in _pack(chunks, "\n", max_bytes) if c.strip()]


def _cut_line(line: str, max_bytes: int) -> list[str]:
    out = []
    while len(line.encode("utf-8")) > max_bytes:
        head = line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
        cut = head.rfind(" ")
        cut = cut if cut > 0 else len(head)
        out.append(line[:cut])
        line = line[cut:].lstrip(" ")
    out.append(line)
    return out


def _check_fractions(fractions) -> tuple[float, float, float]:
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or min(fr) < 0 or fr[0] <= 0 or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be 3 numbers >= 0 (train > 0) summing to 1, got {fractions!r}")
    return fr


def assign_splits(pieces: list[str], fractions=DEFAULT_FRACTIONS) -> list[str]:
    """``'train'``, ``'val'`` or ``'test'`` for each piece: pieces ordered by ``sha256(text)``; a piece goes
    to train while the bytes before it (in that order) are ``< f_train · total``, to val while
    ``< (f_train + f_val) · total``, else to test."""
    f_train, f_val, _ = _check_fractions(fractions)
    sizes = [len(p.encode("utf-8")) for p in pieces]
    order = sorted(range(len(pieces)), key=lambda i: (hashlib.sha256(pieces[i].encode("utf-8")).digest(), i))
    total = float(sum(sizes))
    out = [""] * len(pieces)
    before = 0
    for i in order:
        out[i] = (
            "train" if before < f_train * total else "val" if before < (f_train + f_val) * total else "test"
        )
        before += sizes[i]
    return out


# ------------------------------------------------------------------------------------------------- files


def prepare(
    spec: str = "pydoc",
    out_dir: str | os.PathLike = "data",
    *,
    fractions=DEFAULT_FRACTIONS,
    min_tokens: int = 1,
    overwrite: bool = False,
) -> Path:
    """Tokenise a corpus into ``out_dir/{train,val,test}.npy``, ``{val,test}.jsonl`` and ``meta.json``.

    ``min_tokens``: train and val must each hold at least this many tokens (the trainer passes
    ``seq_len + 1``, one window), else ValueError. An existing ``out_dir`` with the same content hash is
    reused as it is; one with different content raises unless ``overwrite``. Written to a temporary folder
    beside ``out_dir`` and renamed into place, so a reader never sees half a dataset.
    """
    fractions = _check_fractions(fractions)
    out_dir = Path(out_dir)
    docs = load_corpus(spec)
    pieces = [piece for doc in docs for piece in split_pieces(doc.text)]
    by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for piece, split in zip(pieces, assign_splits(pieces, fractions), strict=True):
        by_split[split].append(piece)
    arrays = {s: _join(by_split[s]) for s in SPLITS}
    for s in ("train", "val"):
        if arrays[s].size < min_tokens:
            raise ValueError(
                f"{spec}: the {s} split has {arrays[s].size} tokens, fewer than one batch window needs "
                f"({min_tokens}); use a larger corpus"
            )
    digest = hashlib.sha256()
    for s in SPLITS:
        digest.update(s.encode())
        digest.update(arrays[s].tobytes())
    meta = {
        "format_version": _FORMAT_VERSION,
        "corpus": str(spec) if spec in CORPORA else str(Path(spec).expanduser().resolve()),
        "documents": len(docs),
        "pieces": {s: len(by_split[s]) for s in SPLITS},
        "bytes": {s: int(arrays[s].size - len(by_split[s])) for s in SPLITS},
        "tokens": {s: int(arrays[s].size) for s in SPLITS},
        "fractions": dict(zip(SPLITS, fractions, strict=True)),
        "split_rule": "~2-4 KB pieces at paragraph breaks, ordered by sha256, cut at byte fractions",
        "piece_bytes": {"target": PIECE_TARGET, "max": PIECE_MAX},
        "separator": f"EOS {EOS_ID} after every piece",
        "dtype": "uint16",
        "content_hash": digest.hexdigest()[:16],
    }
    if (out_dir / "meta.json").is_file():
        old = load_meta(out_dir)
        if (
            isinstance(old, dict)
            and old.get("content_hash") == meta["content_hash"]
            and all((out_dir / f"{s}.npy").is_file() for s in SPLITS)
        ):
            return out_dir
        if not overwrite:
            raise ValueError(f"{out_dir}: holds a different prepared dataset; remove it or pass overwrite")
    elif out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"{out_dir}: exists, is not empty and is not a prepared dataset")
    _write_atomic(out_dir, arrays, by_split, meta)
    return out_dir


def _join(pieces: list[str]) -> np.ndarray:
    parts = []
    eos = np.array([EOS_ID], dtype=np.uint16)
    for p in pieces:
        parts += [encode(p), eos]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def _write_atomic(out_dir: Path, arrays: dict, by_split: dict, meta: dict) -> None:
    with publishing(out_dir, force=True, commit=publish) as tmp:
        for s in SPLITS:
            np.save(tmp / f"{s}.npy", arrays[s])
        for s in ("val", "test"):
            with open(tmp / f"{s}.jsonl", "w", encoding="utf-8") as f:
                for p in by_split[s]:
                    f.write(json.dumps({"text": p}, ensure_ascii=False) + "\n")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_split(data_dir: str | os.PathLike, split: str = "train") -> np.ndarray:
    """Token ids of one split, memory-mapped read-only (uint16)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(data_dir) / f"{split}.npy"
    if not path.is_file():
        raise ValueError(f"{path}: no such file (run prepare first)")
    return np.load(path, mmap_mode="r")


def load_meta(data_dir: str | os.PathLike) -> dict:
    return safety.load_json(Path(data_dir) / "meta.json")  # a regular file, bounded, strict JSON
