"""Moved to ``extramerge.lm.data`` (corpora, the split, token files); this name re-exports it."""

from extramerge.lm.data import (
    CORPORA,
    DEFAULT_FRACTIONS,
    GCIDE_ENV,
    PIECE_MAX,
    PIECE_TARGET,
    SPLITS,
    Document,
    assign_splits,
    gcide_path,
    load_corpus,
    load_meta,
    load_split,
    prepare,
    split_pieces,
    strip_wiki_markup,
)

__all__ = [
    "Document",
    "CORPORA",
    "SPLITS",
    "DEFAULT_FRACTIONS",
    "PIECE_TARGET",
    "PIECE_MAX",
    "GCIDE_ENV",
    "load_corpus",
    "split_pieces",
    "assign_splits",
    "prepare",
    "load_split",
    "load_meta",
    "gcide_path",
    "strip_wiki_markup",
]
