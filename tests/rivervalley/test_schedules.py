import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rivervalley.schedules import as_schedule, constant, cosine, get_schedule, wsd


def test_constant_scalar_and_vector():
    f = constant(0.3)
    assert f(0) == 0.3 and f(10**6) == 0.3
    np.testing.assert_array_equal(f(np.arange(5)), np.full(5, 0.3))
    assert f.is_constant and f.peak == 0.3


def test_cosine_endpoints_midpoint_and_warmup():
    f = cosine(1.0, 100, final_lr=0.1)
    assert f(0) == pytest.approx(1.0)
    assert f(50) == pytest.approx(0.55)
    assert f(100) == pytest.approx(0.1) and f(1000) == pytest.approx(0.1)
    g = cosine(1.0, 110, warmup=10)
    assert g(0) == pytest.approx(0.1) and g(9) == pytest.approx(1.0) and g(10) == pytest.approx(1.0)
    assert g(60) == pytest.approx(0.5)
    lrs = g(np.arange(10, 111))
    assert np.all(np.diff(lrs) <= 1e-15)


def test_wsd_linear_matches_theory_decay():
    """THEORY §f: η_t = η(1 − t/T_d) over the decay, t counted from its start."""
    eta, total, td = 0.5, 1000, 200
    f = wsd(eta, total, decay_steps=td)
    assert f(799) == eta and f(800) == eta
    t = np.arange(0, td + 1)
    np.testing.assert_allclose(f(800 + t), eta * (1 - t / td), rtol=0, atol=1e-15)
    assert (
        wsd(eta, total, decay_fraction=0.2)(np.arange(total + 1)).tolist() == f(np.arange(total + 1)).tolist()
    )


@pytest.mark.parametrize(
    "shape,factor",
    [
        ("linear", lambda p: 1 - p),
        ("cosine", lambda p: 0.5 * (1 + math.cos(math.pi * p))),
        ("1-sqrt", lambda p: 1 - math.sqrt(p)),
    ],
)
def test_wsd_shapes(shape, factor):
    f = wsd(2.0, 100, decay_steps=40, shape=shape, final_lr=0.5, warmup=5)
    assert f(0) == pytest.approx(0.4)
    for step in (60, 70, 85, 100):
        p = (step - 60) / 40
        assert f(step) == pytest.approx(0.5 + 1.5 * factor(p))
    assert f(100) == pytest.approx(0.5)


def test_get_schedule_by_name():
    assert get_schedule("constant", 0.1)(7) == 0.1
    assert get_schedule("cosine", 1.0, 10)(10) == pytest.approx(0.0)
    assert get_schedule("wsd", 1.0, 10, decay_steps=5, shape="cosine")(5) == 1.0
    assert as_schedule(0.2)(3) == 0.2
    assert as_schedule(lambda s: 0.1 * s)(3) == pytest.approx(0.3)


@pytest.mark.parametrize(
    "build,name",
    [
        (lambda: constant(-1.0), "lr"),
        (lambda: constant(float("nan")), "lr"),
        (lambda: cosine(1.0, 0), "total_steps"),
        (lambda: cosine(1.0, 10, warmup=10), "warmup"),
        (lambda: cosine(1.0, 10, final_lr=2.0), "final_lr"),
        (lambda: wsd(1.0, 10, decay_fraction=1.5), "decay_fraction"),
        (lambda: wsd(1.0, 10, decay_steps=20), "decay_steps"),
        (lambda: wsd(1.0, 10, shape="exp"), "shape"),
        (lambda: get_schedule("step", 1.0, 10), "name"),
        (lambda: get_schedule("cosine", 1.0), "total_steps"),
        (lambda: constant(1.0)(-1), "step"),
    ],
)
def test_bad_arguments_name_the_parameter(build, name):
    with pytest.raises(ValueError, match=name):
        build()


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    kind=st.sampled_from(["cosine", "wsd-linear", "wsd-cosine", "wsd-1-sqrt"]),
    total=st.integers(2, 500),
    warm_frac=st.floats(0, 0.5),
    final_frac=st.floats(0, 1),
)
def test_schedules_stay_in_range_and_vectorise(kind, total, warm_frac, final_frac):
    lr = 0.7
    warmup = int(warm_frac * (total - 1))
    if kind == "cosine":
        f = cosine(lr, total, warmup=warmup, final_lr=final_frac * lr)
    else:
        f = wsd(lr, total, warmup=warmup, decay_fraction=0.3, shape=kind[4:], final_lr=final_frac * lr)
    final = final_frac * lr
    steps = np.arange(total + 3)
    vec = f(steps)
    assert np.all(vec[warmup:] >= final * (1 - 1e-12) - 1e-15)
    assert np.all(vec <= lr * (1 + 1e-12))
    assert np.all((vec > 0) | (vec == final))
    np.testing.assert_array_equal(vec, [f(int(s)) for s in steps])
    assert f(total) == pytest.approx(final_frac * lr)
