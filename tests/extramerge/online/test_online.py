"""extramerge.online: every online merge against an independent reference (torch's AveragedModel, a plain
power-EMA loop, rivervalley.weights.apply, the offline extramerge.merge of the same snapshots)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from extramerge.io import open_checkpoint
from extramerge.online import Average, OnlineMerger, parse_spec
from rivervalley import weights as rvw

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.GELU(), torch.nn.Linear(4, 3))


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _train(model, merger, steps, every_ref=1, ref=None):
    """Random-walk the weights (an optimizer stand-in), updating the merger; returns the snapshots taken at
    the steps divisible by ``every_ref``."""
    snaps = []
    gen = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen) + 0.01)
        merger.update(step)
        if step % every_ref == 0:
            snaps.append(_flat(model))
            if ref is not None:
                ref.update_parameters(model)
    return torch.stack(snaps)


def _swapped_flat(model, merger, name):
    with merger.swapped(name):
        return _flat(model).clone()


@pytest.mark.parametrize("every", [1, 3])
def test_ema_equals_averaged_model(every):
    model = _model()
    merger = OnlineMerger(model, "ema:0.9", every=every)
    ref = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    _train(model, merger, 20, every_ref=every, ref=ref)
    assert torch.equal(_swapped_flat(model, merger, "ema"), _flat(ref.module))  # bit for bit
    assert merger.updates == 20 // every


def test_windows_and_extra_equal_weights_apply():
    model = _model()
    spec = "sma:3,extra:0.5@2,wma:4,ema:0.8,extra:1.5@3"
    merger = OnlineMerger(model, spec)
    traj = _train(model, merger, 12)
    n = len(traj)
    expected = {
        "sma": rvw.sma(n, 3),
        "extra0.5@2": rvw.extra(n, 3, 2, 0.5),
        "wma": rvw.wma(n, 4),
        "ema": rvw.ema(n, 0.8),
    }
    for name, w in expected.items():
        torch.testing.assert_close(
            _swapped_flat(model, merger, name), rvw.apply(w, traj), atol=1e-6, rtol=1e-6
        )
    # Extra-Merge of the EMA: M_t + α (M_t − M_{t−d}) with M the EMA weight vectors at n and n − 3
    e_now, e_before = rvw.ema(n, 0.8), np.r_[rvw.ema(n - 3, 0.8), np.zeros(3)]
    w_extra = 2.5 * e_now - 1.5 * e_before
    torch.testing.assert_close(
        _swapped_flat(model, merger, "extra1.5@3"), rvw.apply(w_extra, traj), atol=1e-6, rtol=1e-6
    )
    steps, w = merger.coefficients("extra0.5@2")
    assert steps == list(range(8, 13)) and np.allclose(w, rvw.extra(5, 3, 2, 0.5))


@pytest.mark.parametrize("as_callable", [False, True])
def test_custom_window_weights(as_callable):
    model = _model()
    w = rvw.ema(5, 0.7)
    merger = OnlineMerger(
        model, [Average("sma", 5, weights=(lambda k: rvw.ema(k, 0.7)) if as_callable else w)]
    )
    traj = _train(model, merger, 9)
    full = np.r_[np.zeros(4), w]
    torch.testing.assert_close(
        _swapped_flat(model, merger, "sma"), rvw.apply(full, traj), atol=1e-6, rtol=1e-6
    )


def test_power_ema_matches_its_definition_and_saves_snapshots(tmp_path):
    model = _model()
    merger = OnlineMerger(model, "pema:6.94", every=2, snapshot_every=4, snapshot_dir=tmp_path)
    traj = _train(model, merger, 12, every_ref=2)
    m = traj[0].clone()
    for t in range(2, len(traj) + 1):
        beta = (1 - 1 / t) ** 7.94
        m = beta * m + (1 - beta) * traj[t - 1]
    torch.testing.assert_close(_swapped_flat(model, merger, "pema"), m, atol=1e-6, rtol=1e-6)
    saved = sorted(p.name for p in (tmp_path / "pema").iterdir())
    assert saved == ["step_000004", "step_000008", "step_000012"]
    rec = json.loads((tmp_path / "pema" / "step_000008" / "merge.json").read_text())
    assert (rec["gamma"], rec["step"], rec["updates"], rec["method"]) == (6.94, 8, 4, "online-pema")
    ck = open_checkpoint(tmp_path / "pema" / "step_000012")
    got = torch.cat([ck.read(n).flatten() for n, _ in model.named_parameters()])
    torch.testing.assert_close(got, m, atol=1e-6, rtol=1e-6)


def test_swapped_restores_bit_for_bit_on_exception():
    model = _model()
    merger = OnlineMerger(model, "sma:2")
    _train(model, merger, 3)
    before = _flat(model).clone()
    with pytest.raises(RuntimeError, match="boom"), merger.swapped("sma"):
        assert not torch.equal(_flat(model), before)
        raise RuntimeError("boom")
    assert torch.equal(_flat(model), before)


def test_not_ready_and_unknown_names():
    model = _model()
    merger = OnlineMerger(model, "sma:4,extra:0.5@2")
    _train(model, merger, 4)
    assert merger.ready_names() == ["sma"]
    with pytest.raises(ValueError, match="extra needs 6 updates, has 4"), merger.swapped("extra"):
        pass
    with pytest.raises(ValueError, match="no online average named 'ema'"):
        merger.terms("ema")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "--online-merge: empty"),
        ("ema0.9", "is not KIND:VALUE"),
        ("ema:1.0", "decay must lie in"),
        ("ema:x", "'x' is not a number"),
        ("sma:0", "must be an integer >= 1"),
        ("extra:0.5@2", "needs an sma:K"),
        ("sma:4,extra:0.5", "write extra:ALPHA@D"),
        ("sma:4,sma:4", "listed twice"),
        ("pema:-1", "must be > 0"),
    ],
)
def test_spec_errors_name_the_flag(spec, message):
    with pytest.raises(ValueError, match=message) as e:
        parse_spec(spec, "--online-merge")
    assert str(e.value).startswith("--online-merge")


def test_spec_names_and_bases():
    items = parse_spec("ema:0.99,ema:0.999,sma:8,extra:0.5@4")
    assert [a.name for a in items] == ["ema0.99", "ema0.999", "sma", "extra"]
    assert items[3].base == 2


def test_memory_is_the_stores_only():
    model = _model()
    merger = OnlineMerger(model, "ema:0.9,sma:4,extra:0.5@2")
    p = merger.param_bytes()
    assert merger.nbytes() == {"ring": 6 * p, "ema:ema": p}  # ring of K + d = 6 snapshots, one EMA


def test_float32_store_and_state_round_trip():
    model = _model().to(torch.bfloat16)
    merger = OnlineMerger(model, "ema:0.9,sma:2,extra:1@1", dtype=torch.float32)
    _train(model, merger, 5)
    assert all(v.dtype == torch.float32 for v in merger.emas["ema"].value)
    clone = OnlineMerger(model, "ema:0.9,sma:2,extra:1@1", dtype=torch.float32)
    clone.load_state_dict(merger.state_dict())
    for name in merger.names:
        a = _swapped_flat(model, merger, name)
        b = _swapped_flat(model, clone, name)
        assert torch.equal(a, b)
    # both continue identically after the restore
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype))
    merger.update(6)
    clone.update(6)
    assert torch.equal(_swapped_flat(model, merger, "extra"), _swapped_flat(model, clone, "extra"))


def test_saved_extra_equals_offline_merge(tmp_path):
    """The online Extra-Merge saved as safetensors equals `extramerge.merge(method="extra")` of the same
    snapshots written as checkpoints."""
    from safetensors.torch import save_file

    from extramerge import api

    model = _model()
    merger = OnlineMerger(model, "sma:3,extra:0.5@2")
    gen = torch.Generator().manual_seed(2)
    paths = []
    for step in range(1, 8):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        merger.update(step)
        path = tmp_path / f"step_{step:04d}.safetensors"
        save_file({n: p.detach().clone() for n, p in model.named_parameters()}, path)
        paths.append(path)
    merger.save("extra", tmp_path / "online_extra.safetensors")
    api.merge(
        paths[-5:], method="extra", window=3, offset=2, alpha=0.5, output=tmp_path / "off", progress=False
    )
    online, offline = (
        open_checkpoint(tmp_path / "online_extra.safetensors"),
        open_checkpoint(tmp_path / "off"),
    )
    for n, _ in model.named_parameters():
        torch.testing.assert_close(online.read(n), offline.read(n), atol=1e-6, rtol=1e-6)
    rec = json.loads((tmp_path / "online_extra.merge.json").read_text())
    assert rec["tool"] == "extramerge" and rec["snapshot_steps"] == [3, 4, 5, 6, 7]
    assert np.allclose(rec["weights"], rvw.extra(5, 3, 2, 0.5))


def test_save_passes_the_format_through_dcp(tmp_path):
    from extramerge.io import FORMATS

    if "dcp" not in FORMATS:
        pytest.skip("the writer has no dcp format")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    model = _model()
    merger = OnlineMerger(model, "ema:0.5")
    _train(model, merger, 3)
    merger.save("ema", tmp_path / "ema_dcp", fmt="dcp")
    dcp_to_torch_save(tmp_path / "ema_dcp", tmp_path / "ema.pt")
    state = torch.load(tmp_path / "ema.pt", weights_only=True)
    want = dict(merger.merged("ema"))
    assert set(state) == set(want) and all(torch.equal(state[k], want[k]) for k in want)
    assert json.loads((tmp_path / "ema_dcp" / "merge.json").read_text())["method"] == "online-ema"


def test_power_ema_snapshots_feed_the_offline_posthoc_fit(tmp_path):
    """Online power-EMA snapshots (γ = 4 and 12) merged offline by ``--method posthoc-ema --gamma 7`` land on
    the power EMA with γ = 7 that the same run kept online, far closer than either stored profile."""
    from extramerge import api

    model = _model()
    merger = OnlineMerger(model, "pema:4,pema:12,pema:7", snapshot_every=20, snapshot_dir=tmp_path / "snap")
    _train(model, merger, 200)
    target = _swapped_flat(model, merger, "pema7")
    paths = sorted((tmp_path / "snap" / "pema4").iterdir()) + sorted((tmp_path / "snap" / "pema12").iterdir())
    out = tmp_path / "posthoc.safetensors"
    api.merge(paths, method="posthoc-ema", gamma=7.0, output=out, progress=False)
    ck = open_checkpoint(out)
    got = torch.cat([ck.read(n).flatten() for n, _ in model.named_parameters()])
    err = (got - target).norm()
    spread = (_swapped_flat(model, merger, "pema4") - _swapped_flat(model, merger, "pema12")).norm()
    assert err < 0.05 * spread, (err, spread)
    rec = json.loads(out.with_name("posthoc.merge.json").read_text())
    assert rec["snapshots"] == "ema" and rec["fit_residual"] < 0.05
