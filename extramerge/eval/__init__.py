"""Held-out evaluation of causal language models: loss, bits per byte and a LAMBADA-style cloze.

    texts = load_texts("data/val.jsonl")
    blocks = token_blocks(texts, tokenizer, seq_len=256)        # tokenize once ...
    for state in weight_sets:                                    # ... evaluate many weight sets
        load_weights(model, state)                               # as from_pretrained would
        r = evaluate_loss(model, tokenizer, None, blocks=blocks)  # r.loss, r.bits_per_byte
    items = build_cloze(texts, n_items=200, seed=0)              # fixed item set (save_cloze/load_cloze)
    c = cloze_accuracy(model, tokenizer, items)                  # c.accuracy ± c.stderr vs c.chance
    evaluate_model("runs/gpt2/step_004000", "data/val.jsonl", cloze_items=200)  # all of it, one dict

Modules: ``data`` (texts, token blocks; the loss convention is in ``loss``), ``model`` (loading model
folders, or weights into a model, as ``from_pretrained`` does), ``loss``, ``cloze_items`` (building the
items), ``cloze`` (scoring them), ``report``
(``evaluate_model``), ``lmeval`` (the optional lm-evaluation-harness bridge) and ``checkpoints``
(checkpoints in any format the merge engine reads, loaded into one model ``extramerge.study.models`` builds:
``extramerge eval --config/--model-factory``); the last two are not imported here.
"""

from __future__ import annotations

from .cloze import ClozeResult, cloze_accuracy
from .cloze_items import ClozeItem, build_cloze, is_cloze_file, load_cloze, save_cloze
from .data import PAD, TokenBlocks, document_index, load_texts, token_blocks
from .loss import LossResult, evaluate_loss
from .model import (
    DEFAULT_SEQ_LEN,
    check_model_folder,
    load_model,
    load_tokenizer,
    load_weights,
    max_positions,
    packed_inputs,
    seq_len_of,
    tokenizer_files,
    tokenizer_fingerprint,
)
from .report import evaluate_model

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
    "load_tokenizer",
    "load_weights",
    "max_positions",
    "seq_len_of",
    "packed_inputs",
    "DEFAULT_SEQ_LEN",
    "evaluate_model",
    "tokenizer_files",
    "tokenizer_fingerprint",
]
