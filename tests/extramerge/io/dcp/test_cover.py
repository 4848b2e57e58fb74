"""Issue 21 item 7: the DCP chunk-cover check is a sweep of signed faces (``extramerge.io.dcp.cover``),
O(n log n) where the old pairwise sweep was quadratic (40 000 chunks sharing one dim-0 interval: ~11
minutes). Checked against a brute-force count of every element on random covers, overlapping and gapped."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from extramerge.io.dcp.cover import overlapping, uncovered


def _count(shape, boxes) -> np.ndarray:
    c = np.zeros(shape, dtype=np.int64)
    for lo, hi in boxes:
        c[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] += 1
    return c


def _grid(shape, splits) -> list:
    """The boxes of a grid: dimension k cut at the sorted positions splits[k]."""
    edges = [[0, *s, d] for s, d in zip(splits, shape, strict=True)]
    return [
        (
            tuple(e[i] for e, i in zip(edges, idx, strict=True)),
            tuple(e[i + 1] for e, i in zip(edges, idx, strict=True)),
        )
        for idx in itertools.product(*(range(len(e) - 1) for e in edges))
    ]


def _bricks(rng, shape) -> list:
    """A cover that is no grid: rows of dim 0 cut into slabs, each cut differently along dim 1, and so on."""
    if len(shape) == 1:
        cuts = sorted(rng.sample(range(1, shape[0]), rng.randint(0, min(3, shape[0] - 1))))
        return [((a,), (b,)) for a, b in itertools.pairwise([0, *cuts, shape[0]])]
    cuts = sorted(rng.sample(range(1, shape[0]), rng.randint(0, min(3, shape[0] - 1))))
    out = []
    for a, b in itertools.pairwise([0, *cuts, shape[0]]):
        out += [((a, *lo), (b, *hi)) for lo, hi in _bricks(rng, shape[1:])]
    return out


@pytest.mark.parametrize("seed", range(40))
def test_agrees_with_counting_every_element(seed):
    rng = random.Random(seed)
    shape = tuple(rng.randint(1, 6) for _ in range(rng.randint(1, 4)))
    boxes = _bricks(rng, shape)
    assert uncovered(shape, boxes) is None
    # drop, duplicate or shift one box: now some element is covered 0 or 2 times
    k = rng.randrange(len(boxes))
    lo, hi = boxes[k]
    broken = {
        0: boxes[:k] + boxes[k + 1 :],
        1: [*boxes, boxes[k]],
        2: boxes[:k]
        + [(tuple(max(0, a - 1) for a in lo), tuple(max(1, b - 1) for b in hi))]
        + boxes[k + 1 :],
    }[seed % 3]
    bad = (_count(shape, broken) != 1).any()
    point = uncovered(shape, broken)
    assert (point is not None) == bool(bad), (shape, boxes, broken)


def test_names_the_overlapping_pair():
    boxes = [((0, 0), (10, 8)), ((6, 0), (12, 8)), ((12, 0), (16, 8))]
    point = uncovered((16, 8), boxes)
    assert point == (6, 0)
    assert overlapping(point, boxes) == [0, 1]
    gapped = [((0, 0), (4, 8)), ((5, 0), (16, 8))]
    assert uncovered((16, 8), gapped) == (4, 0) and overlapping((4, 0), gapped) == []


def test_a_grid_of_chunks_and_many_chunks_on_one_interval():
    assert uncovered((8, 6, 4), _grid((8, 6, 4), [[2, 5], [3], [1, 2, 3]])) is None
    n = 40_000  # all share dim-0 interval [0, 4): the old sweep compared them pairwise (~11 minutes)
    boxes = [((0, i), (4, i + 1)) for i in range(n)]
    assert uncovered((4, n), boxes) is None  # timed in benchmarks/bench_dcp_read.py --cover
    assert uncovered((4, n), [*boxes[:-1], ((0, n - 2), (4, n - 1))]) == (0, n - 2)


def test_refuses_instead_of_running_on():
    boxes = [((0, i), (1, i + 1)) for i in range(100)]
    with pytest.raises(ValueError, match="too many faces"):
        uncovered((1, 100), boxes, work=10)
