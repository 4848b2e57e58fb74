"""extramerge.eval.cloze: the shared-context path reuses the KV cache through transformers' current Cache
API (no deprecation warning) and scores exactly as a plain no-cache forward of every context + candidate."""

import inspect
import logging
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from _ckpt_factory import byte_gpt2, cycle_docs, train_briefly  # noqa: E402

from extramerge.eval import build_cloze, cloze_accuracy  # noqa: E402
from extramerge.lm.tokenizer import EOS_ID, build_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _reference_scores(model, tok, items) -> list[list[float]]:
    """Summed log-prob of each candidate's tokens, one full forward per context + candidate, no cache (the
    context's trailing whitespace moves to the candidate, as lm-eval splits them)."""
    out = []
    for it in items:
        ctx = tok.encode(it.context.rstrip())
        row = []
        for c in it.candidates:
            whole = tok.encode(it.context + c)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([whole[:-1]]), use_cache=False).logits[0]
            lp = logits.float().log_softmax(-1)
            row.append(sum(float(lp[p - 1, whole[p]]) for p in range(len(ctx), len(whole))))
        out.append(row)
    return out


class _TransformersLog(logging.Handler):
    """Collects what transformers logs (its deprecation notices are log records as well as warnings)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _models():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    docs = cycle_docs(10)
    gpt2 = train_briefly(byte_gpt2(seed=0, n_positions=128), tok, docs[:6], steps=50)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)  # fmt: skip
    return tok, docs[6:], {"gpt2": gpt2, "llama": LlamaForCausalLM(cfg).eval()}


def test_shared_context_cloze_uses_the_current_cache_api_and_matches_no_cache_scores():
    from transformers.cache_utils import Cache
    from transformers.utils import logging as hf_logging

    tok, held, models = _models()
    items = build_cloze(held, n_items=12, n_candidates=4, context_bytes=40, seed=0)
    for name, model in models.items():
        calls: list[dict] = []
        hook = model.register_forward_pre_hook(
            lambda m, a, kw, calls=calls: calls.append(dict(kw)), with_kwargs=True
        )
        handler = _TransformersLog()
        hf_logger = hf_logging.get_logger("transformers")
        hf_logger.addHandler(handler)
        once = getattr(hf_logging, "warning_once", None)
        if hasattr(once, "cache_clear"):
            once.cache_clear()  # a notice logged once earlier in this process would be logged again
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = cloze_accuracy(model, tok, items, share_context=True)
        finally:
            hook.remove()
            hf_logger.removeHandler(handler)
        deprecations = [
            f"{w.category.__name__}: {w.message}"
            for w in caught
            if issubclass(w.category, FutureWarning | DeprecationWarning)
        ]
        assert deprecations == [], name
        assert not [m for m in handler.messages if "deprecat" in m.lower()], name
        # the shared path really ran: each item's candidates continued from a Cache object
        keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        passed = [k for kw in calls for k, v in kw.items() if isinstance(v, Cache)]
        assert passed == [keyword] * len(items), name

        ref = _reference_scores(model, tok, items)
        assert sum(got.scores, []) == pytest.approx(sum(ref, []), abs=1e-4), name
        ref_preds = [max(range(len(r)), key=lambda j, r=r: (r[j], -j)) for r in ref]
        assert got.predictions == ref_preds, name
        assert got.accuracy == sum(p == it.label for p, it in zip(ref_preds, items, strict=True)) / len(items)
        batched = cloze_accuracy(model, tok, items, share_context=False)
        assert batched.predictions == got.predictions and batched.accuracy == got.accuracy, name
    assert 0 < cloze_accuracy(models["gpt2"], tok, items).accuracy < 1  # a trained model: not trivial
