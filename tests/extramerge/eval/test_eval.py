"""extramerge.eval (held-out loss, bits/byte, cloze) and `extramerge eval`, on tiny byte-level GPT-2s."""

import json
import math
import random
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from _ckpt_factory import byte_gpt2, cycle_docs, save_model, train_briefly  # noqa: E402

from extramerge import eval as E  # noqa: E402
from extramerge.cli import main  # noqa: E402
from extramerge.lm.tokenizer import EOS_ID, build_tokenizer  # noqa: E402

TEXTS = [
    "The river winds through the valley, and the valley keeps the river. " * 3,
    "Averaging checkpoints damps the noise; extrapolating removes the lag. Déjà vu: ünïcödé bytes.",
    "short",
    "<|endoftext|> is only text here, not a separator.",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model():
    return byte_gpt2()


def _stream(texts):
    ids = [EOS_ID]
    for t in texts:
        ids += list(t.encode("utf-8")) + [EOS_ID]
    return torch.tensor(ids)


# ------------------------------------------------------------------------------------------------ texts


def test_load_texts_formats_and_errors(tmp_path):
    j = tmp_path / "val.jsonl"
    j.write_text('{"text": "one"}\n\n{"text": "two é", "meta": 1}\n{"text": "   "}\n', encoding="utf-8")
    assert E.load_texts(j) == ["one", "two é"]
    t = tmp_path / "doc.txt"
    t.write_text("a whole\n\nfile\n")
    assert E.load_texts(t) == ["a whole\n\nfile\n"]
    d = tmp_path / "docs"
    d.mkdir()
    (d / "b.txt").write_text("bee")
    (d / "a.txt").write_text("ay")
    (d / "skip.md").write_text("no")
    assert E.load_texts(d) == ["ay", "bee"]
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    for name, pattern in [
        ("missing.jsonl", "no such file"),
        ("empty.txt", "empty"),
        ("bad.jsonl", r"bad\.jsonl:2: .*\"text\""),
        ("latin1.txt", "not UTF-8"),
    ]:
        with pytest.raises(ValueError, match=pattern) as e:
            E.load_texts(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------- blocks


def test_token_blocks_predict_every_token_once(tok):
    blocks = E.token_blocks(TEXTS, tok, 16)
    ids, n_bytes = blocks  # unpacks as a pair
    stream = _stream(TEXTS)
    assert ids.shape[1] == 17 and ids.dtype == torch.long
    assert n_bytes == sum(len(t.encode()) for t in TEXTS) + len(TEXTS) == len(stream) - 1
    assert torch.equal(ids[1:, 0], ids[:-1, -1])  # rows overlap by one token
    labels = ids[:, 1:].reshape(-1)
    assert torch.equal(labels[labels != E.PAD], stream[1:])  # every token after the first, once
    assert (ids[:-1] != E.PAD).all() and blocks.n_tokens == len(stream) - 1
    # special-token text inside a document is split into ordinary bytes, never a separator
    assert (stream == EOS_ID).sum() == len(TEXTS) + 1
    assert torch.equal(E.token_blocks(TEXTS, tok, 16).ids, ids)  # deterministic
    with pytest.raises(ValueError, match="seq_len"):
        E.token_blocks(TEXTS, tok, 0)


# ------------------------------------------------------------------------------------------------- loss


def test_loss_matches_manual_reference(model, tok):
    stream = _stream(TEXTS[:3])
    assert len(stream) <= 512
    big = byte_gpt2(n_positions=512)
    with torch.no_grad():  # one forward over the whole sequence
        ref = F.cross_entropy(big(stream[None, :-1]).logits[0], stream[1:], reduction="sum").item()
    r = E.evaluate_loss(big, tok, TEXTS[:3], batch_size=4)  # seq_len = n_positions: one block
    assert r.tokens == len(stream) - 1
    assert r.loss == pytest.approx(ref / r.tokens, rel=1e-6)

    # short blocks: the reference is a forward per chunk, each token predicted from its chunk only
    L = 16
    with torch.no_grad():
        chunks = [stream[i : i + L + 1] for i in range(0, len(stream) - 1, L)]
        assert len(chunks[-1]) < L + 1  # a partial last block
        ref = sum(
            F.cross_entropy(model(c[None, :-1]).logits[0], c[1:], reduction="sum") for c in chunks
        ).item()
    r = E.evaluate_loss(model, tok, TEXTS[:3], seq_len=L, batch_size=3)
    assert r.loss == pytest.approx(ref / (len(stream) - 1), rel=1e-6)
    assert r.nats == pytest.approx(ref, rel=1e-6)


def test_bits_per_byte_is_loss_over_ln2_for_byte_tokens(model, tok):
    r = E.evaluate_loss(model, tok, TEXTS, seq_len=32)
    assert r.tokens == r.bytes == sum(len(t.encode()) + 1 for t in TEXTS)  # é, ü: 2 bytes, 2 tokens
    assert r.bits_per_byte == pytest.approx(r.loss / math.log(2), rel=1e-12)
    assert r.tokens_per_s > 0 and r.seconds > 0 and r.perplexity == pytest.approx(math.exp(r.loss))


def test_loss_deterministic_blocks_reuse_and_mode_restored(model, tok):
    a = E.evaluate_loss(model, tok, TEXTS, seq_len=24, batch_size=2)
    b = E.evaluate_loss(model, tok, TEXTS, seq_len=24, batch_size=2)
    blocks = E.token_blocks(TEXTS, tok, 24)
    c = E.evaluate_loss(model, tok, None, blocks=blocks, batch_size=2)
    d = E.evaluate_loss(model, tok, None, blocks=tuple(blocks), batch_size=2)
    assert a.nats == b.nats == c.nats == d.nats and a.tokens == c.tokens and a.bytes == c.bytes
    # batch size changes nothing but rounding
    assert E.evaluate_loss(model, tok, None, blocks=blocks, batch_size=7).loss == pytest.approx(
        a.loss, rel=1e-6
    )
    # another weight set in the SAME model object, same blocks: what a study does
    other = byte_gpt2(seed=5)
    model2 = byte_gpt2()
    model2.load_state_dict(other.state_dict())
    assert E.evaluate_loss(model2, tok, None, blocks=blocks).nats == pytest.approx(
        E.evaluate_loss(other, tok, TEXTS, seq_len=24).nats, rel=1e-9
    )
    model.train()
    E.evaluate_loss(model, tok, None, blocks=blocks)
    assert model.training
    model.eval()
    with pytest.raises(ValueError, match="exceeds"):
        E.evaluate_loss(model, tok, TEXTS, seq_len=65)
    with pytest.raises(ValueError, match="seq_len"):
        E.evaluate_loss(model, tok, None, blocks=blocks, seq_len=16)


# ------------------------------------------------------------------------------------------------ cloze


def _prose(n_docs=6, n_words=400, seed=0):
    rnd = random.Random(seed)
    vocab = ["river", "valley", "checkpoint", "average", "noise", "gradient", "model", "loss", "merge",
             "window", "offset", "alpha", "theory", "tensor", "stream", "the", "and", "of", "a", "slowly",
             "quickly", "train", "step", "weights", "folder", "Paris", "Lambada", "cat's"]  # fmt: skip
    return [" ".join(rnd.choice(vocab) for _ in range(n_words)) + "." for _ in range(n_docs)]


def test_build_cloze_items_are_valid_and_deterministic(tmp_path):
    docs = _prose()
    items = E.build_cloze(docs, n_items=40, n_candidates=6, context_bytes=120, seed=3)
    assert len(items) == 40
    assert items == E.build_cloze(docs, n_items=40, n_candidates=6, context_bytes=120, seed=3)
    assert items != E.build_cloze(docs, n_items=40, n_candidates=6, context_bytes=120, seed=4)
    for it in items:
        assert (
            len(it.candidates) == 6 and len(set(it.candidates)) == 6 and it.candidates.count(it.target) == 1
        )
        assert len({c.lower() for c in it.candidates}) == 6
        assert it.candidates[it.label] == it.target
        assert re.fullmatch(r"[A-Za-z]{4,}", it.target)
        assert it.context.endswith(" ") and 60 <= len(it.context.encode()) <= 120
        # the context ends exactly where the target begins, and the target is a whole word
        hits = [m for d in docs for m in re.finditer(re.escape(it.context + it.target), d)]
        assert hits and all(not m.string[m.end() : m.end() + 1].isalpha() for m in hits)
        assert all(re.fullmatch(r"[A-Za-z]{3,}", c) for c in it.candidates)
        assert not it.context[0].isspace()
    # LAMBADA preference: targets that occur earlier in their context come first
    assert all(it.target.lower() in it.context.lower().split() for it in items)
    # capitalised targets get capitalised distractors
    for it in items:
        if it.target[0].isupper():
            assert all(c[0].isupper() for c in it.candidates)
    # save / load round trip, and a broken file names itself
    path = E.save_cloze(items, tmp_path / "items.jsonl")
    assert E.load_cloze(path) == items
    lines = path.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["candidates"] = [c for c in bad["candidates"] if c != bad["target"]]
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        E.load_cloze(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="nope.jsonl"):
        E.load_cloze(tmp_path / "nope.jsonl")


def test_build_cloze_falls_back_and_refuses_too_little_text():
    docs = _prose(n_docs=1, n_words=120)
    with pytest.warns(UserWarning, match="only"):
        items = E.build_cloze(docs, n_items=500, context_bytes=60)
    assert 0 < len(items) < 500
    with pytest.raises(ValueError, match="no cloze passages"):
        E.build_cloze(["tiny text with words"], context_bytes=300)
    with pytest.raises(ValueError, match="n_candidates"):
        E.build_cloze(docs, n_candidates=1)


def _manual_scores(model, item):
    """log P(candidate | context) by hand: one forward per candidate, bytes as tokens."""
    out = []
    for cand in item.candidates:
        ids = torch.tensor(list((item.context + cand).encode()))
        n = len(cand.encode())
        with torch.no_grad():
            lp = model(ids[None, :-1]).logits[0].log_softmax(-1)
        out.append(lp[-n:].gather(1, ids[-n:, None]).sum().item())
    return out


def test_cloze_accuracy_matches_hand_computed_ranking(tok):
    model = byte_gpt2(seed=1, n_positions=256)
    items = E.build_cloze(_prose(), n_items=6, n_candidates=5, context_bytes=100, seed=1)
    res = E.cloze_accuracy(model, tok, items, batch_size=4)
    assert res.n == 6 and res.chance == pytest.approx(0.2)
    correct = 0
    for it, scores, pred in zip(items, res.scores, res.predictions, strict=True):
        manual = _manual_scores(model, it)
        # our score also holds log P(' ' | context) (lm-eval moves the space): the same for every candidate
        shift = [a - b for a, b in zip(scores, manual, strict=True)]
        assert max(shift) - min(shift) < 1e-4
        best = max(range(len(manual)), key=lambda j: (manual[j], -j))
        runner_up = max(m for j, m in enumerate(manual) if j != best)
        assert pred == best or manual[best] - runner_up < 1e-4  # a near tie may go either way
        correct += pred == it.label
    assert res.accuracy == correct / 6
    assert res.stderr == pytest.approx(math.sqrt(res.accuracy * (1 - res.accuracy) / 5))
    for share in (True, False):  # shared-context KV cache and fully batched rows: the same numbers
        again = E.cloze_accuracy(model, tok, items, batch_size=7, share_context=share)
        assert sum(again.scores, []) == pytest.approx(sum(res.scores, []), abs=1e-4)


class _NoCache(torch.nn.Module):
    """A causal LM that returns logits only (no KV cache): the shared-context path must fall back."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=self.model(input_ids=input_ids, use_cache=False).logits)


def test_cloze_paths_agree_for_llama_and_cacheless_models(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)  # fmt: skip
    llama = LlamaForCausalLM(cfg).eval()
    items = E.build_cloze(_prose(), n_items=4, n_candidates=4, context_bytes=100, seed=4)
    ref = E.cloze_accuracy(llama, tok, items, share_context=False)
    for model in (llama, _NoCache(llama)):
        got = E.cloze_accuracy(model, tok, items, share_context=True)
        assert sum(got.scores, []) == pytest.approx(sum(ref.scores, []), abs=1e-4)
    # loss on LLaMA (max_position_embeddings) against one whole-sequence forward
    stream = _stream(TEXTS[:2])
    assert len(stream) <= 512  # one block
    with torch.no_grad():
        want = F.cross_entropy(llama(stream[None, :-1]).logits[0], stream[1:]).item()
    assert E.evaluate_loss(llama, tok, TEXTS[:2]).loss == pytest.approx(want, rel=1e-5)


def test_cloze_left_truncation_like_lm_eval(tok):
    model = byte_gpt2(seed=2, n_positions=256)
    items = E.build_cloze(_prose(), n_items=3, n_candidates=4, context_bytes=100, seed=2)
    res = E.cloze_accuracy(model, tok, items, max_length=40)  # every sequence is cut on the left
    for it, scores in zip(items, res.scores, strict=True):
        for cand, score in zip(it.candidates, scores, strict=True):
            ctx = it.context.rstrip(" ")
            ids = torch.tensor(list((ctx + " " + cand).encode())[-41:])
            n = len(cand) + 1
            with torch.no_grad():
                lp = model(ids[None, :-1]).logits[0].log_softmax(-1)
            assert score == pytest.approx(lp[-n:].gather(1, ids[-n:, None]).sum().item(), abs=1e-4)


def test_cloze_ties_go_to_the_first_candidate(tok):
    model = byte_gpt2()
    torch.nn.init.zeros_(model.lm_head.weight)  # tied to wte: every token equally likely
    item = E.ClozeItem("the same context ", "gamma", ("alpha", "gamma", "delta"))
    res = E.cloze_accuracy(model, tok, [item])
    assert res.predictions == [0] and res.accuracy == 0.0 and math.isnan(res.stderr)


def test_training_lowers_loss_and_beats_chance(tok):
    docs = cycle_docs(10)
    train, held = docs[:6], docs[6:]
    items = E.build_cloze(held, n_items=12, n_candidates=4, context_bytes=40, seed=0)
    model = byte_gpt2()
    before = E.evaluate_loss(model, tok, held)
    train_briefly(model, tok, train, steps=80)
    after = E.evaluate_loss(model, tok, held)
    cloze = E.cloze_accuracy(model, tok, items)
    assert after.loss < 0.5 * before.loss
    assert cloze.accuracy >= cloze.chance + 0.3, cloze


# ---------------------------------------------------------------------------------------- model folders


def test_evaluate_model_from_folder_and_bad_folders(tmp_path, tok):
    folder = save_model(byte_gpt2(), tok, tmp_path / "m")
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in _prose(n_docs=3, n_words=300)))
    r = E.evaluate_model(folder, data, cloze_items=10, seq_len=32)
    assert r["path"] == str(folder) and r["seq_len"] == 32 and r["tokens"] == r["bytes"]
    assert r["cloze"]["n"] == 10 and r["cloze"]["chance"] == 0.125
    assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2))
    json.dumps(r)  # JSON-ready
    model, t = E.load_model(folder)
    same = E.evaluate_model(model, E.load_texts(data), tokenizer=t, seq_len=32)
    assert same["loss"] == r["loss"] and same["cloze"] is None

    (tmp_path / "noconfig").mkdir()
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text("{}")
    notok = save_model(byte_gpt2(), tok, tmp_path / "notok")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (notok / f).unlink()
    for path, pattern in [
        (tmp_path / "absent", "no such"),
        (tmp_path / "noconfig", "config.json"),
        (noweights, "no model weights"),
        (notok, "no tokenizer"),
        (data, "not a model folder"),
    ]:
        with pytest.raises(ValueError, match=pattern) as e:
            E.evaluate_model(path, data)
        assert str(path) in str(e.value)


# ------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("evalrun")
    for k, step in enumerate((100, 200)):
        save_model(byte_gpt2(seed=k), tok, root / "run" / f"step_{step:06d}")
    data = root / "val.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in _prose(n_docs=4, n_words=300)))
    return root


def _cli(capsys, *argv):
    rc = main([str(x) for x in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_eval_model_and_run_folders(capsys, run_folder, tmp_path):
    run, data = run_folder / "run", run_folder / "val.jsonl"
    out_json = tmp_path / "res" / "eval.json"
    items = tmp_path / "items.jsonl"
    rc, out, err = _cli(capsys, "eval", run, run / "step_000200", "--data", data, "--cloze", "12",
                        "--seq-len", "32", "--json", out_json, "--save-cloze", items)  # fmt: skip
    assert rc == 0, err
    rows = [line for line in out.splitlines() if line.startswith(("run/", str(run)))]
    assert [r.split()[0] for r in rows] == ["run/step_000100", "run/step_000200", str(run / "step_000200")]
    assert all("±" in r for r in rows)
    rec = json.loads(out_json.read_text())
    assert [m["step"] for m in rec["models"]] == [100, 200, 200]
    assert rec["models"][1]["loss"] == rec["models"][2]["loss"]  # same folder, same numbers
    assert rec["models"][0]["loss"] != rec["models"][1]["loss"]
    assert rec["cloze"]["items"] == 12 and rec["models"][0]["cloze"]["n"] == 12
    assert not list(out_json.parent.glob(".*tmp*"))  # atomic: no temporary left behind

    # a saved item set gives the same cloze numbers; --cloze 0 turns the cloze off
    rc, out, _ = _cli(capsys, "eval", run / "step_000100", "--data", data, "--cloze", items,
                      "--seq-len", "32", "--json", tmp_path / "b.json")  # fmt: skip
    assert rc == 0
    again = json.loads((tmp_path / "b.json").read_text())["models"][0]
    assert again["cloze"]["accuracy"] == rec["models"][0]["cloze"]["accuracy"]
    rc, out, _ = _cli(capsys, "eval", run / "step_000100", "--data", data, "--cloze", "0", "--seq-len", "32")
    assert rc == 0 and " - " in out.splitlines()[-1] + " "


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("missing_data", "missing.jsonl: no such file"),
        ("empty_data", "empty.txt: no text"),
        ("not_model", "holds no checkpoints"),
        ("no_model", "absent: no such file"),
        ("bad_cloze", "nope.jsonl: no such file"),
    ],
)
def test_cli_eval_bad_inputs_exit_2_one_line(capsys, run_folder, tmp_path, case, pattern):
    run, data = run_folder / "run", run_folder / "val.jsonl"
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "plain").mkdir()
    args = {
        "missing_data": [run, "--data", tmp_path / "missing.jsonl"],
        "empty_data": [run, "--data", tmp_path / "empty.txt"],
        "not_model": [tmp_path / "plain", "--data", data],
        "no_model": [tmp_path / "absent", "--data", data],
        "bad_cloze": [run, "--data", data, "--cloze", tmp_path / "nope.jsonl"],
    }[case]
    out_json = tmp_path / "out.json"
    rc, out, err = _cli(capsys, "eval", *args, "--json", out_json)
    lines = [x for x in err.strip().splitlines() if x]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("extramerge: error: "), err
    assert re.search(pattern, lines[0]) and "Traceback" not in err
    assert not out_json.exists()
