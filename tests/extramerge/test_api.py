"""extramerge.api: method → weight vector resolution (plan) and the end-to-end Python API."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from extramerge import api
from extramerge import trajectory as T
from rivervalley import analysis as A
from rivervalley import weights as W


def _fake(n, steps=None):
    steps = steps or [100 * (i + 1) for i in range(n)]
    return [SimpleNamespace(path=f"/ckpts/step_{s}", step=s) for s in steps]


def _gram_data(X, ckpts) -> T.GramData:
    G = A.gram(X - X[-1])
    return T.GramData(G, ["w"], G[None], np.array([X.shape[1]]), np.array([float(X[-1] @ X[-1])]), -1,
                      paths=[c.path for c in ckpts], steps=[c.step for c in ckpts])  # fmt: skip


def test_defaults_per_method():
    n, ck = 8, _fake(8)
    np.testing.assert_allclose(api.plan(ck, "sma").weights, np.full(n, 1 / n))
    np.testing.assert_allclose(api.plan(ck, "wma").weights, W.wma(n, n))
    p = api.plan(ck, "ema")
    assert p.params["decay"] == pytest.approx(1 - 2 / (n + 1))
    assert W.lag(p.weights) == pytest.approx(W.lag(W.sma(n, n)), rel=0.2)
    p = api.plan(ck, "extra")
    assert (p.params["window"], p.params["offset"], p.params["alpha"]) == (4, 4, 3 / 8)
    assert W.lag(p.weights) == pytest.approx(0, abs=1e-12)  # α_match: zero lag
    np.testing.assert_allclose(api.plan(ck, "trend").weights, W.trend(n, n))
    p = api.plan(ck, "extra", window=3, alpha=0.25)
    assert (p.params["offset"], p.params["alpha_rule"]) == (5, "given")
    p = api.plan(ck, "custom", weights=[0] * 7 + [1])
    assert p.weights[-1] == 1 and p.params == {}


def test_record_states_the_method_and_weights():
    ck = _fake(4)
    rec = api.plan(ck, "extra", window=2, offset=2).record()
    assert rec["method"] == "extra" and rec["alpha"] == pytest.approx(0.25)
    assert rec["weights"] == pytest.approx([-0.125, -0.125, 0.625, 0.625])
    assert rec["alpha_estimates"] == {"alpha_match": 0.25} and rec["lag_checkpoints"] == pytest.approx(0)


def test_pc1_plan_on_exact_line_lands_ahead():
    rng = np.random.default_rng(0)
    n, h = 6, 2.5
    a, b = rng.normal(size=10), rng.normal(size=10)
    X = a + b * np.arange(n)[:, None]
    ck = _fake(n)
    w = api.plan(ck, "pc1", window=3, ahead=h, gram=_gram_data(X, ck)).weights
    np.testing.assert_allclose(w @ X, a + b * (n - 1 + h), atol=1e-9)


def test_alpha_geometric_uses_the_gram():
    rng = np.random.default_rng(1)
    n = 8
    X = np.arange(n)[:, None] * rng.normal(size=50) + 3.0 * rng.normal(size=(n, 50))
    ck = _fake(n)
    p = api.plan(ck, "extra", alpha="geometric", gram=_gram_data(X, ck))
    assert p.params["alpha_rule"] == "geometric"
    assert p.params["alpha"] == p.params["alpha_estimates"]["alpha_geometric"] < 3 / 8
    assert "river" in p.params


@pytest.mark.parametrize(
    "method, kw, match",
    [
        ("extra", dict(window=4, offset=4), "needs K \\+ d = 8 checkpoints, got 6"),
        ("extra", dict(window=6), "offset d=0 cannot extrapolate"),
        ("extra", dict(alpha="banana"), "alpha must be a number"),
        ("custom", dict(weights=[0.5, 0.5]), "got 2 weights for 6 checkpoints"),
        ("custom", {}, "needs weights"),
        ("sma", dict(window=7), "at least 7 checkpoints"),
        ("sma", dict(decay=0.9), "--decay .* does not apply to method 'sma'"),
        ("ema", dict(ahead=1.0), "--ahead"),
        ("ema", dict(decay=1.5), "decay must lie in"),
        ("nope", {}, "unknown method"),
    ],
)
def test_plan_errors_are_one_clear_line(method, kw, match):
    with pytest.raises(ValueError, match=match) as e:
        api.plan(_fake(6), method, **kw)
    assert "\n" not in str(e.value)


def test_custom_weights_not_summing_to_one_warn():
    with pytest.warns(UserWarning, match="sum to 2"):
        p = api.plan(_fake(2), "custom", weights=[1, 1])
    assert p.notes and p.weights.sum() == 2


def test_gram_for_other_checkpoints_is_refused():
    ck = _fake(4)
    X = np.arange(4)[:, None] * np.ones(3)
    with pytest.raises(ValueError, match="other checkpoints"):
        api.plan(_fake(4, [1, 2, 3, 5]), "pc1", gram=_gram_data(X, ck))


def test_parse_size():
    assert api.parse_size("5GB") == 5 * 10**9
    assert api.parse_size("500mb") == 500 * 10**6
    assert api.parse_size("1.5GiB") == int(1.5 * 2**30)
    assert api.parse_size(1234) == 1234
    for bad in ("five", "0MB", "-1GB", "5XB"):
        with pytest.raises(ValueError):
            api.parse_size(bad)


def test_public_api_end_to_end(tmp_path):
    from _ckpt_factory import make_safetensors_files

    import extramerge

    paths = make_safetensors_files(tmp_path / "run", n=5, seed=1)
    rep = extramerge.analyze(paths, windows=(1, 2), output=tmp_path / "rep", progress=False)
    assert rep["n_checkpoints"] == 5 and (tmp_path / "rep" / "gram.npz").exists()
    s = extramerge.merge(paths, method="extra", alpha="geometric", output=tmp_path / "m", progress=False)
    assert not s.dry_run and s.n_checkpoints == 5
    rec = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert rec["alpha_rule"] == "geometric" and rec["alpha"] == rec["alpha_estimates"]["alpha_geometric"]
    assert rec["notes"] == ["Gram matrix computed by an extra read pass"]
    s = extramerge.merge(paths, method="pc1", gram=tmp_path / "rep" / "gram.npz", output=tmp_path / "p",
                         dry_run=True, progress=False)  # fmt: skip
    assert s.dry_run and not (tmp_path / "p").exists()
