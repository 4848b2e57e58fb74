"""extramerge.methods: one registry entry per merge method, with the parameters it declares, drives the API's
keywords and checks and the CLI's choices and flags."""

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
from _ckpt_factory import load_state, make_safetensors_files

from extramerge import api, cli, methods
from extramerge.methods import REGISTRY, Method, Param


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
    knobs = methods.all_params()
    assert list(knobs) == ["window", "decay", "offset", "alpha", "gram", "ahead", "shape", "sigma_rel",
                           "gamma", "weights"]  # fmt: skip
    for m in REGISTRY.values():
        assert all(knobs[p.name] is p for p in m.params), m.name
    flags = {a.dest: a for a in _merge_parser()._actions if a.option_strings}
    for name, p in knobs.items():  # one flag per knob, spelled, typed and documented as declared
        a = flags[name]
        assert (a.option_strings, a.type, a.default, a.metavar, a.help) == ([p.flag], p.type, p.default,
                                                                             p.metavar, p.help)  # fmt: skip
    assert flags["sigma_rel"].option_strings == ["--sigma-rel"] and flags["ahead"].default == 0.0


def test_a_knob_a_method_does_not_take_is_refused_by_its_flag():
    ck = _fake(8)
    values = dict(window=2, offset=2, alpha=0.5, decay=0.5, weights=[1 / 8] * 8, ahead=1.0, gram="g.npz")
    values |= dict(shape="cosine", sigma_rel=0.05, gamma=6.94)
    for m in REGISTRY.values():
        for knob in set(methods.all_params()) - m.knobs:
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

    monkeypatch.setattr(api, "gram_for", fake_gram_for)
    ck = _fake(8)
    cases = [("sma", {}), ("ema", {}), ("wma", {}), ("trend", {}), ("custom", {"weights": [1 / 8] * 8})]
    cases += [("extra", {}), ("extra", {"alpha": "match"}), ("extra", {"alpha": "geometric"}), ("pc1", {})]
    for name, knobs in cases:
        calls.clear()
        api.plan(ck, name, **knobs)
        full = {p.name: p.default for p in REGISTRY[name].params} | knobs
        assert len(calls) == int(REGISTRY[name].needs_gram(full)), (name, knobs)
    assert REGISTRY["pc1"].needs_gram({}) and not REGISTRY["sma"].needs_gram({})


def test_a_builder_that_reads_an_undeclared_gram_fails_loudly(monkeypatch):
    def sneaky(n, knobs, ckpts, gram):
        gram()
        return np.full(n, 1 / n), {}, []

    monkeypatch.setitem(REGISTRY, "sneaky", Method("sneaky", (), sneaky, "reads the Gram matrix"))
    with pytest.raises(RuntimeError, match="registry entry says it does not"):
        api.plan(_fake(3), "sneaky")


def test_adding_a_method_is_one_entry(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(REGISTRY, "newest", Method("newest", (), _newest, "the newest checkpoint"))
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


LEAN = Param("lean", float, 0.5, help="lean: weight L on the newest checkpoint, 1 − L on the one before")


def _lean(n, knobs, ckpts, gram):
    SEEN.append(knobs["lean"])
    w = np.zeros(n)
    w[-2:] = [1 - knobs["lean"], knobs["lean"]]
    return w, {"lean": knobs["lean"]}, []


SEEN: list = []


def test_adding_a_method_with_a_new_knob_is_one_entry(tmp_path, monkeypatch, capsys):
    # the entry declares its parameter; the API keyword, the CLI flag and the checks follow from it
    monkeypatch.setitem(REGISTRY, "lean", Method("lean", (LEAN,), _lean, "leans on the newest"))
    SEEN.clear()
    merge_help = " ".join(_merge_parser().format_help().split())
    assert "--lean LEAN lean: weight L on the newest checkpoint, 1 − L on the one before" in merge_help
    assert "lean: leans on the newest" in merge_help

    files = [str(f) for f in make_safetensors_files(tmp_path / "in", n=3, with_int=False)]
    out = tmp_path / "cli.safetensors"
    assert cli.main(["merge", *files, "--method", "lean", "--lean", "0.75", "-o", str(out), "--quiet"]) == 0
    assert SEEN == [0.75]  # parsed by the declared type
    assert json.loads(out.with_suffix(".merge.json").read_text())["weights"] == [0, 0.25, 0.75]
    api.merge(files, method="lean", lean=0.25, output=tmp_path / "api.safetensors", progress=False)
    assert SEEN == [0.75, 0.25]
    got, a, b = load_state(tmp_path / "api.safetensors"), load_state(files[1]), load_state(files[2])
    for k in got:
        np.testing.assert_allclose(got[k].numpy(), 0.75 * a[k].numpy() + 0.25 * b[k].numpy(), rtol=1e-6)
    assert api.plan(_fake(3), "lean").params == {"lean": 0.5}  # left out: its declared default

    # given to another method, it is refused as every knob is, by the API and by the CLI
    refused = "--lean (lean) does not apply to method 'sma' (only to lean)"
    with pytest.raises(ValueError, match=re.escape(refused)):
        api.plan(_fake(3), "sma", lean=0.9)
    capsys.readouterr()
    x = tmp_path / "x"
    assert cli.main(["merge", *files, "--method", "sma", "--lean", "0.9", "-o", str(x), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert refused in err and len(err.splitlines()) == 1 and not x.exists()


def test_a_knob_two_methods_declare_differently_or_no_method_declares_is_refused(monkeypatch):
    other = Param("window", float, help="another window", metavar="W")
    monkeypatch.setitem(REGISTRY, "odd", Method("odd", (other,), _newest, "declares window its own way"))
    with pytest.raises(ValueError, match="method 'odd' declares knob 'window' unlike another method"):
        methods.all_params()
    monkeypatch.delitem(REGISTRY, "odd")
    with pytest.raises(TypeError, match="unknown merge knob 'windw'"):
        api.plan(_fake(3), "sma", windw=2)


def test_a_knob_at_its_default_counts_as_not_given():
    # --ahead defaults to 0 for every method (the CLI passes it always): 0 is not "given" to sma
    assert api.plan(_fake(4), "sma", ahead=0.0).weights.tolist() == [0.25] * 4
    with pytest.raises(ValueError, match="--ahead \\(ahead\\) does not apply to method 'sma'"):
        api.plan(_fake(4), "sma", ahead=1.0)
