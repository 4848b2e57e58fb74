"""extramerge.methods: one registry entry per merge method drives the API's checks and the CLI's choices."""

from types import SimpleNamespace

import numpy as np
import pytest
from _ckpt_factory import load_state, make_safetensors_files

from extramerge import api, cli, methods
from extramerge.methods import REGISTRY, Method


def _fake(n):
    return [SimpleNamespace(path=f"/ckpts/step_{100 * (i + 1)}", step=100 * (i + 1)) for i in range(n)]


def _newest(n, knobs, ckpts, gram):
    w = np.zeros(n)
    w[-1] = 1.0
    return w, {}, ["the newest checkpoint"]


def _merge_parser():
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    return sub.choices["merge"]


def _merge_choices() -> list[str]:
    return list(next(a for a in _merge_parser()._actions if a.dest == "method").choices)


def test_cli_choices_and_api_names_come_from_the_registry():
    assert _merge_choices() == list(REGISTRY) == list(api.METHODS)
    assert set(REGISTRY) == {"sma", "ema", "wma", "extra", "trend", "pc1", "decay", "posthoc-ema", "custom"}
    for m in REGISTRY.values():
        assert m.knobs <= set(methods.KNOBS), m.name


def test_a_knob_a_method_does_not_take_is_refused_by_its_flag():
    ck = _fake(8)
    values = dict(window=2, offset=2, alpha=0.5, decay=0.5, weights=[1 / 8] * 8, ahead=1.0, gram="g.npz")
    values |= dict(shape="cosine", sigma_rel=0.05, gamma=6.94)
    for m in REGISTRY.values():
        for knob in set(methods.KNOBS) - m.knobs:
            flag = "--" + knob.replace("_", "-")
            with pytest.raises(ValueError, match=f"{flag} \\({knob}\\) does not apply to method '{m.name}'"):
                api.plan(ck, m.name, **{knob: values[knob]})


def test_the_gram_matrix_is_computed_exactly_when_the_entry_says(monkeypatch):
    calls = []
    X = np.random.default_rng(0).normal(size=(8, 5)).cumsum(0)

    def fake_gram_for(ckpts, gram, progress):
        calls.append(1)
        from rivervalley import analysis as A

        G = A.gram(X - X[-1])
        return SimpleNamespace(gram=G), "given"

    monkeypatch.setattr(methods, "gram_for", fake_gram_for)
    ck = _fake(8)
    cases = [("sma", {}), ("ema", {}), ("wma", {}), ("trend", {}), ("custom", {"weights": [1 / 8] * 8})]
    cases += [("extra", {}), ("extra", {"alpha": "match"}), ("extra", {"alpha": "geometric"}), ("pc1", {})]
    for name, knobs in cases:
        calls.clear()
        api.plan(ck, name, **knobs)
        full = dict.fromkeys(methods.KNOBS) | knobs
        assert len(calls) == int(REGISTRY[name].needs_gram(full)), (name, knobs)
    assert REGISTRY["pc1"].needs_gram({}) and not REGISTRY["sma"].needs_gram({})


def test_a_builder_that_reads_an_undeclared_gram_fails_loudly(monkeypatch):
    def sneaky(n, knobs, ckpts, gram):
        gram()
        return np.full(n, 1 / n), {}, []

    monkeypatch.setitem(REGISTRY, "sneaky", Method("sneaky", frozenset(), sneaky, "reads the Gram matrix"))
    with pytest.raises(RuntimeError, match="registry entry says it does not"):
        api.plan(_fake(3), "sneaky")


def test_adding_a_method_is_one_entry(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(REGISTRY, "newest", Method("newest", frozenset(), _newest, "the newest checkpoint"))
    assert "newest" in _merge_choices()
    p = api.plan(_fake(4), "newest")
    assert p.weights.tolist() == [0, 0, 0, 1] and p.notes == ["the newest checkpoint"]
    with pytest.raises(ValueError, match="--window \\(window\\) does not apply to method 'newest'"):
        api.plan(_fake(4), "newest", window=2)

    files = make_safetensors_files(tmp_path / "in", n=3, with_int=False)
    out = tmp_path / "merged.safetensors"
    assert cli.main(["merge", *map(str, files), "--method", "newest", "-o", str(out), "--quiet"]) == 0
    got, want = load_state(out), load_state(files[-1])
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k].numpy(), want[k].numpy()), k
    merge_help = " ".join(_merge_parser().format_help().split())
    assert "newest: the newest checkpoint" in merge_help
