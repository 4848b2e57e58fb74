"""extramerge.eval.lmeval: local lm-eval tasks from our held-out split, lm-eval agreeing with our scoring."""

import json
import math
import sys

import pytest

pytest.importorskip("transformers")

from _ckpt_factory import byte_gpt2, cycle_docs, save_model, train_briefly  # noqa: E402

from extramerge import eval as E  # noqa: E402
from extramerge.eval import lmeval as L  # noqa: E402
from extramerge.lm.tokenizer import build_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_write_task_files(tmp_path):
    items = [
        E.ClozeItem("the river keeps the ", "valley", ("river", "valley", "stream")),
        E.ClozeItem("two spaces  ", "gamma", ("gamma", "delta")),
    ]
    assert L.write_task(items, tmp_path) == "extramerge_cloze"
    assert L.write_task(["doc one", "doc two"], tmp_path, name="held_ppl") == "held_ppl"
    rows = [json.loads(x) for x in (tmp_path / "extramerge_cloze.jsonl").read_text().splitlines()]
    assert rows[0] == {
        "query": "the river keeps the",
        "choices": [" river", " valley", " stream"],
        "label": 1,
    }
    assert rows[1]["query"] == "two spaces" and rows[1]["choices"] == ["  gamma", "  delta"]
    yaml = (tmp_path / "extramerge_cloze.yaml").read_text()
    for line in ("task: extramerge_cloze", "dataset_path: json", "output_type: multiple_choice",
                 "doc_to_choice: choices", 'target_delimiter: ""', "  - metric: acc"):  # fmt: skip
        assert line in yaml.splitlines(), line
    assert str((tmp_path / "extramerge_cloze.jsonl").resolve()) in yaml
    ppl = (tmp_path / "held_ppl.yaml").read_text()
    assert "output_type: loglikelihood_rolling" in ppl and "doc_to_target: text" in ppl
    assert L._tasks_in(tmp_path) == ["extramerge_cloze", "held_ppl"]
    with pytest.raises(ValueError, match="ClozeItem"):
        L.write_task([items[0], "text"], tmp_path)
    with pytest.raises(ValueError, match="nothing"):
        L.write_task([], tmp_path)


def test_missing_lm_eval_is_one_line_with_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'lm-eval\[hf\]'") as e:
        L.require_lm_eval()
    assert "\n" not in str(e.value)


def test_run_lm_eval_agrees_with_cloze_accuracy(tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    tok = build_tokenizer()
    docs = cycle_docs(10)
    train, held = docs[:6], docs[6:]
    # a model trained a little on the cycle text, so that the accuracy is neither 0 nor 1 by construction
    model = train_briefly(byte_gpt2(seed=0, n_positions=128), tok, train, steps=50)
    folder = save_model(model, tok, tmp_path / "model")

    items = E.build_cloze(held, n_items=12, n_candidates=4, context_bytes=40, seed=0)
    ours = E.cloze_accuracy(model, tok, items)
    assert 0 < ours.accuracy < 1
    tasks = tmp_path / "tasks"
    L.write_task(items, tasks)
    L.write_task(held, tasks)
    res = L.run_lm_eval(folder, tasks, batch_size=8, log_samples=True)
    acc = res["results"]["extramerge_cloze"]["acc"]
    assert acc == pytest.approx(ours.accuracy, abs=1e-12) and res["n_samples"]["extramerge_cloze"] == len(
        items
    )
    # per-candidate log-likelihoods agree too (same context/continuation split, same truncation)
    samples = sorted(res["samples"]["extramerge_cloze"], key=lambda s: s["doc_id"])
    for s, scores in zip(samples, ours.scores, strict=True):
        theirs = [r[0][0] for r in s["resps"]]
        assert theirs == pytest.approx(scores, abs=1e-3)
    # rolling perplexity: per document, no EOS predicted, so close to ours but not identical
    bpb = res["results"]["extramerge_ppl"]["bits_per_byte"]
    mine = E.evaluate_loss(model, tok, held).bits_per_byte
    assert math.isfinite(bpb) and bpb == pytest.approx(mine, rel=0.1)


def test_lm_eval_is_told_never_to_run_the_folders_code(tmp_path, monkeypatch):
    """Issue 21 item 1: lm-eval's ``hf`` model gets ``trust_remote_code=False`` whatever its own default."""
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    folder = save_model(byte_gpt2(), build_tokenizer(), tmp_path / "model")
    L.write_task(["a held-out document"], tmp_path / "tasks")
    seen = {}

    def fake_evaluate(**kwargs):
        seen.update(kwargs["model_args"])
        return {"results": {}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_evaluate)
    monkeypatch.setattr(L, "_task_manager", lambda cls, task_dir: None)
    L.run_lm_eval(folder, tmp_path / "tasks")
    assert seen["trust_remote_code"] is False and seen["pretrained"] == str(folder.resolve())
