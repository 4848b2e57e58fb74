"""Byte-level tokenizer: 256 byte tokens (id = byte value) plus ``<|endoftext|>`` (id 256).

Saved as a Hugging Face ``PreTrainedTokenizerFast`` (a ``tokenizer.json``: BPE with no merges over the
GPT-2 byte-to-unicode alphabet), so every checkpoint folder opens with ``AutoTokenizer`` in transformers and
lm-eval. Token count equals UTF-8 byte count, which makes bits per byte = loss / ln 2 exactly.
"""

from __future__ import annotations

import numpy as np

EOS_TOKEN = "<|endoftext|>"
EOS_ID = 256
VOCAB_SIZE = 257


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map (the ByteLevel pre-tokenizer's alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` whose ids are the UTF-8 bytes of the text; EOS = BOS = pad = 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    b2u = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=1 << 30,
    )
    assert len(out) == VOCAB_SIZE and out.eos_token_id == EOS_ID
    return out


def encode(text: str) -> np.ndarray:
    """Token ids of ``text``: its UTF-8 bytes as uint16, as the tokenizer gives for text without specials."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
