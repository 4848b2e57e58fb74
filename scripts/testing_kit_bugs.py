"""The messages rivervalley.testing gives for classic bugs in hand-written merge code (quoted in the README).

Usage: python scripts/testing_kit_bugs.py
Each bug is a plausible user implementation checked against the weight vector it claims; the script
prints the AssertionError each check raises and exits non-zero if any bug goes unnoticed.
"""

from __future__ import annotations

import sys

import torch

from rivervalley import weights
from rivervalley.testing import BendingRiver, check_affine_merge, check_extrapolation_limits


def ema_bias_corrected(x, beta=0.9):  # Adam-style: starts at zero and divides by 1 − β^n
    m = torch.zeros_like(x[0])
    for theta in x:
        m.mul_(beta).add_(theta, alpha=1 - beta)
    return m / (1 - beta ** len(x))


def sma_window_off_by_one(x, K=4):  # x[-K-1:-1]: the window ends one checkpoint early
    return x[-K - 1 : -1].mean(0)


def sma_divides_by_wrong_count(x, K=4):  # sums K + 1 checkpoints, divides by K
    return x[-K - 1 :].sum(0) / K


def extra_merge_offset_off_by_one(x, K=4, d=2, alpha=0.5):  # the older window is taken d + 1 back
    now, before = x[-K:].mean(0), x[-K - d - 1 : -d - 1].mean(0)
    return now + alpha * (now - before)


def extra_merge_match_integer_division(x, K=4, d=2):  # α_match = (K − 1)/(2d), written with //
    alpha = (K - 1) // (2 * d)
    now, before = x[-K:].mean(0), x[-K - d : -d].mean(0)
    return now + alpha * (now - before)


SMA4 = weights.sma(8, 4)
BUGS = [
    ("bias-corrected EMA, claimed weights.ema(8, 0.9)", ema_bias_corrected, weights.ema(8, 0.9)),
    ("SMA window off by one, claimed weights.sma(8, 4)", sma_window_off_by_one, SMA4),
    ("SMA dividing by the wrong count, claimed weights.sma(8, 4)", sma_divides_by_wrong_count, SMA4),
    ("Extra-Merge offset off by one, claimed weights.extra(8, 4, 2, 0.5)", extra_merge_offset_off_by_one,
     weights.extra(8, 4, 2, 0.5)),
    ("Extra-Merge with alpha_match by integer division, claimed weights.extra(8, 4, 2, 0.75)",
     extra_merge_match_integer_division, weights.extra(8, 4, 2, 0.75)),
]  # fmt: skip


def main() -> int:
    missed = 0
    for title, fn, claimed in BUGS:
        print(f"## {title}")
        try:
            check_affine_merge(fn, 8, backend="torch", expected=claimed)
        except AssertionError as exc:
            print(f"AssertionError: {exc}\n")
        else:
            print("NOT CAUGHT\n")
            missed += 1
    print("## Extra-Merge with alpha = 3 on a sine-shaped river (BendingRiver())")
    try:
        check_extrapolation_limits(lambda a: weights.extra(12, 4, 4, a), BendingRiver(), alpha=3.0)
    except AssertionError as exc:
        print(f"AssertionError: {exc}")
    else:
        print("NOT CAUGHT")
        missed += 1
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
