"""Held-out evaluation of causal LMs: a re-export of ``extramerge.eval`` (where the code now lives), kept
so that ``extramerge.evaluate`` imports keep working."""

from __future__ import annotations

from .eval import (
    PAD,
    ClozeItem,
    ClozeResult,
    LossResult,
    TokenBlocks,
    build_cloze,
    check_model_folder,
    cloze_accuracy,
    document_index,
    evaluate_loss,
    evaluate_model,
    is_cloze_file,
    load_cloze,
    load_model,
    load_texts,
    max_positions,
    save_cloze,
    token_blocks,
    tokenizer_files,
    tokenizer_fingerprint,
)

__all__ = [
    "PAD",
    "TokenBlocks",
    "LossResult",
    "ClozeItem",
    "ClozeResult",
    "load_texts",
    "token_blocks",
    "document_index",
    "evaluate_loss",
    "build_cloze",
    "cloze_accuracy",
    "save_cloze",
    "load_cloze",
    "is_cloze_file",
    "check_model_folder",
    "load_model",
    "max_positions",
    "evaluate_model",
    "tokenizer_files",
    "tokenizer_fingerprint",
]
