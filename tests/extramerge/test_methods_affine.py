"""extramerge's merge methods, run end to end on real safetensors files, checked with rivervalley.testing:
each is the affine merge whose weight vector it claims (the rivervalley.weights builder, and the weights
it records in the output's metadata); the data-dependent ones (alpha='geometric', pc1) are flagged as not
linear, while still applying exactly the weights they record for the data at hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import extramerge
from rivervalley import weights as W
from rivervalley.testing import check_affine_merge, check_exact_on_lines

N = 8


class FileMerge:
    """fn([N, p]) -> [p]: writes each row as a float64 safetensors checkpoint, merges with extramerge,
    reads the result back; remembers the weights each call recorded."""

    def __init__(self, tmp_path, **knobs):
        self.tmp, self.knobs, self.calls, self.recorded = tmp_path, knobs, 0, []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        folder = self.tmp / f"call{self.calls}"
        folder.mkdir()
        paths = []
        for j, row in enumerate(x, start=1):
            paths.append(folder / f"step_{j:04d}.safetensors")
            save_file({"theta": torch.from_numpy(np.array(row, dtype=np.float64))}, str(paths[-1]))
        out = folder / "merged.safetensors"
        extramerge.merge(paths, output=out, progress=False, **self.knobs)
        with safe_open(str(out), "pt") as f:
            self.recorded.append(np.array([float(v) for v in f.metadata()["extramerge.weights"].split(",")]))
        return load_file(str(out))["theta"].numpy()


CLAIMS = [
    (dict(method="sma", window=4), W.sma(N, 4)),
    (dict(method="wma", window=5), W.wma(N, 5)),
    (dict(method="ema", decay=0.7), W.ema(N, 0.7)),
    (dict(method="ema"), W.ema(N, 1 - 2 / (N + 1))),
    (dict(method="extra", window=4, offset=2, alpha=0.5), W.extra(N, 4, 2, 0.5)),
    (dict(method="extra", window=3, offset=4, alpha="match"), W.extra(N, 3, 4, (3 - 1) / (2 * 4))),
    (dict(method="trend", window=6, ahead=2.0), W.trend(N, 6, ahead=2.0)),
    (
        dict(method="custom", weights=[0.1, -0.2, 0, 0, 0.3, 0.3, 0.2, 0.3]),
        [0.1, -0.2, 0, 0, 0.3, 0.3, 0.2, 0.3],
    ),
]


@pytest.mark.parametrize("knobs, claimed", CLAIMS, ids=[str(k) for k, _ in CLAIMS])
def test_each_method_is_the_affine_merge_it_claims(tmp_path, knobs, claimed):
    fn = FileMerge(tmp_path, **knobs)
    got = check_affine_merge(fn, N, p=6, expected=claimed, rtol=1e-9)
    for recorded in fn.recorded:
        np.testing.assert_allclose(recorded, claimed, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got, claimed, atol=1e-8)


def test_alpha_match_lands_on_the_newest_checkpoint_of_a_line(tmp_path):
    fn = FileMerge(tmp_path, method="extra", window=4, offset=4, alpha="match")
    assert check_exact_on_lines(fn, N, p=6, at=N) == pytest.approx(N)


@pytest.mark.parametrize(
    "knobs", [dict(method="extra", window=4, offset=4, alpha="geometric"), dict(method="pc1")]
)
def test_data_dependent_methods_are_not_linear_but_apply_what_they_record(tmp_path, knobs):
    fn = FileMerge(tmp_path, **knobs)
    with pytest.raises(AssertionError, match="not linear"):
        check_affine_merge(fn, N, p=6)
    x = np.random.default_rng(1).standard_normal((N, 6)) + np.arange(N)[:, None]  # a drifting trajectory
    merged = fn(x)
    np.testing.assert_allclose(merged, fn.recorded[-1] @ x, rtol=1e-12, atol=1e-12)
    assert fn.recorded[-1].sum() == pytest.approx(1.0)
