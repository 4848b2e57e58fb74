"""rivervalley.testing.check_affine_merge / check_exact_on_lines: they pass every proper merge the package
builds, return its weights, and catch the classic bugs with a message that names the broken guarantee."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rivervalley import weights as W
from rivervalley.testing import check_affine_merge, check_exact_on_lines, state_dict_merge
from rivervalley.testing.strategies import checkpoint_sets, merges

FAST = settings(max_examples=40, deadline=None)


def applies(w):
    return lambda x: W.apply(w, x)


@FAST
@given(merge=merges(), backend=st.sampled_from(["numpy", "torch"]))
def test_recovers_the_weights_of_every_merge(merge, backend):
    got = check_affine_merge(applies(merge.weights), merge.n, expected=merge.weights, backend=backend)
    np.testing.assert_allclose(got, merge.weights, rtol=0, atol=1e-8)


@FAST
@given(merge=merges(max_n=8), p=st.integers(1, 6))
def test_few_coordinates_take_several_calls(merge, p):
    calls = []

    def fn(x):
        calls.append(x.shape)
        return W.apply(merge.weights, x)

    check_affine_merge(fn, merge.n, p, expected=merge.weights)
    assert all(shape == (merge.n, p) for shape in calls)


def test_float32_torch_merge_passes_at_float32_tolerance():
    w = W.extra(8, 4, 2, 0.5)
    fn = lambda x: W.apply(w, x)  # noqa: E731
    got = check_affine_merge(fn, 8, expected=w, backend="torch", dtype=torch.float32)
    np.testing.assert_allclose(got, w, atol=1e-5)
    with pytest.raises(AssertionError, match="differ from the expected"):
        check_affine_merge(fn, 8, expected=W.extra(8, 4, 2, 0.52), backend="torch", dtype=torch.float32)


# ----------------------------------------------------------------------------------- the classic bugs


def ema_from_first(x, beta=0.8):
    m = x[0]
    for theta in x[1:]:
        m = beta * m + (1 - beta) * theta
    return m


def ema_bias_corrected(x, beta=0.8):
    m = 0 * x[0]
    for theta in x:
        m = beta * m + (1 - beta) * theta
    return m / (1 - beta ** len(x))


def test_bias_corrected_ema_is_affine_but_not_the_ema_it_claims():
    check_affine_merge(ema_from_first, 8, expected=W.ema(8, 0.8))
    w = check_affine_merge(ema_bias_corrected, 8)  # affine: its weights sum to 1
    assert w.sum() == pytest.approx(1.0)
    with pytest.raises(AssertionError, match=r"times 1\.2016 except at checkpoint 1 .*bias-corrected EMA"):
        check_affine_merge(ema_bias_corrected, 8, expected=W.ema(8, 0.8))


def test_window_off_by_one_is_named():
    with pytest.raises(AssertionError, match=r"checkpoints 4–7 of 8, expected checkpoints 5–8.*off-by-one"):
        check_affine_merge(lambda x: x[-5:-1].mean(0), 8, expected=W.sma(8, 4))


def test_weights_not_summing_to_one_fail_translation():
    with pytest.raises(AssertionError, match=r"not translation-equivariant.*sum to 1\.25, not 1"):
        check_affine_merge(lambda x: x[-5:].sum(0) / 4, 8)


def test_wrong_alpha_is_caught_with_both_vectors():
    def extra(x, K=4, d=2, alpha=0.7):  # claims α = 0.5
        now, before = x[-K:].mean(0), x[-K - d : -d].mean(0)
        return now + alpha * (now - before)

    with pytest.raises(AssertionError, match=r"differ from the expected ones by up to 0\.05.*trails"):
        check_affine_merge(extra, 8, expected=W.extra(8, 4, 2, 0.5))


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda x: np.median(x, axis=0), "not linear"),
        (lambda x: x.mean(0) + 0.01, "not linear"),
        (lambda x: x.mean(0) / np.linalg.norm(x.mean(0)), "not linear"),
        (lambda x: np.concatenate([x[-1, :3], x[-2, 3:]]), "not the same weights for every coordinate"),
        (lambda x: x.mean(), "returned shape"),
        (lambda x: x.mean(0) * np.nan, "NaN or inf"),
        (lambda x: 1 / 0, "raised ZeroDivisionError"),
    ],
)
def test_non_merges_are_refused(fn, message):
    with pytest.raises(AssertionError, match=message):
        check_affine_merge(fn, 6)


def test_in_place_modification_of_the_input_is_caught():
    def foreach_in_place(x):
        rows = list(x.unbind(0))
        torch._foreach_mul_(rows, 0.5)  # scales the caller's checkpoints
        return torch.stack(rows).sum(0)

    with pytest.raises(AssertionError, match="modified its input in place"):
        check_affine_merge(foreach_in_place, 4, backend="torch")


def test_expected_of_the_wrong_length_is_a_usage_error():
    with pytest.raises(ValueError, match="one weight per checkpoint"):
        check_affine_merge(lambda x: x[-1], 4, expected=[1.0])


# ------------------------------------------------------------------------------------------- lines


@FAST
@given(merge=merges(max_n=10))
def test_every_merge_lands_on_the_line_where_its_lag_says(merge):
    place = check_exact_on_lines(applies(merge.weights), merge.n)
    assert place == pytest.approx(merge.n - W.lag(merge.weights), abs=1e-7)


@FAST
@given(K=st.integers(1, 6), d=st.integers(1, 6))
def test_alpha_match_returns_the_newest_checkpoint(K, d):
    n = K + d
    check_exact_on_lines(applies(W.extra(n, K, d, (K - 1) / (2 * d))), n, at=n)


def test_trend_extrapolates_along_uneven_steps():
    steps = [100, 200, 400, 500, 800]
    w = W.trend(5, 4, ahead=150, steps=steps)
    assert check_exact_on_lines(applies(w), 5, steps=steps, at=950) == pytest.approx(950)


def test_lines_catch_a_lagging_merge_and_one_that_leaves_the_line():
    with pytest.raises(
        AssertionError, match=r"lands at position 6\.5 .*not at 8 where it should: 1\.5 behind"
    ):
        check_exact_on_lines(applies(W.sma(8, 4)), 8, at=8)
    with pytest.raises(AssertionError, match="leaves the line"):
        check_exact_on_lines(lambda x: x[-1] * np.abs(x[-1]).mean() / np.abs(x[-2]).mean(), 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_merges_pass_yet_a_wrong_alpha_is_still_caught(dtype):
    w = W.extra(8, 4, 2, 0.5)
    for seed in range(5):
        check_affine_merge(applies(w), 8, expected=w, backend="torch", dtype=dtype, seed=seed)
        check_exact_on_lines(applies(w), 8, at=7.5, backend="torch", dtype=dtype, seed=seed)
    with pytest.raises(AssertionError, match="differ from the expected"):
        check_affine_merge(applies(W.extra(8, 4, 2, 0.6)), 8, expected=w, backend="torch", dtype=dtype)
    with pytest.raises(ValueError, match="numpy dtype"):
        check_affine_merge(applies(w), 8, dtype="float17")
    with pytest.raises(ValueError, match="torch dtype"):
        check_affine_merge(applies(w), 8, dtype="float17", backend="torch")


# ------------------------------------------------------------------------------------ state dicts


def ema_state_dicts(states, beta=0.8):
    """User-style merge code: a list of state dicts (oldest first) in, one state dict out; buffers from
    the newest checkpoint."""
    out = {k: v.clone() for k, v in states[0].items()}
    for sd in states[1:]:
        for k, v in sd.items():
            out[k] = beta * out[k] + (1 - beta) * v if v.is_floating_point() else v
    return out


@settings(max_examples=15, deadline=None)
@given(states=checkpoint_sets(dtypes=("float32", "float64")))
def test_state_dict_merges_are_checked_through_the_adapter(states):
    fn = state_dict_merge(ema_state_dicts, states[0])
    n = len(states)
    check_affine_merge(fn, n, p=fn.p, expected=W.ema(n, 0.8), backend="torch")


def test_state_dict_adapter_catches_in_place_updates_and_missing_tensors():
    template = {"w": torch.zeros(3, 2), "b": torch.zeros(2), "step": torch.tensor(7)}

    def in_place(states):
        out = states[-1]
        for sd in states[:-1]:
            for k in ("w", "b"):
                out[k].add_(sd[k])  # accumulates into the newest checkpoint's own tensors
        return out

    with pytest.raises(AssertionError, match="modified its input in place"):
        check_affine_merge(state_dict_merge(in_place, template), 4, p=8, backend="torch")
    with pytest.raises(AssertionError, match="lacks"):
        check_affine_merge(state_dict_merge(lambda s: {"w": s[-1]["w"]}, template), 4, p=8, backend="torch")
    with pytest.raises(ValueError, match="no floating tensors"):
        state_dict_merge(in_place, {"step": torch.tensor(1)})
