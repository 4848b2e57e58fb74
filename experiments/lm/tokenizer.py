"""Moved to ``extramerge.lm.tokenizer`` (the byte-level tokenizer); this name re-exports it."""

from extramerge.lm.tokenizer import EOS_ID, EOS_TOKEN, VOCAB_SIZE, build_tokenizer, encode

__all__ = ["EOS_ID", "EOS_TOKEN", "VOCAB_SIZE", "build_tokenizer", "encode"]
