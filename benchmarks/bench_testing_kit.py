"""Wall time of each rivervalley.testing check with its default settings, against the 1 s budget of a check
in a normal test suite (issue: "each under a second by default").

Usage: python -m benchmarks.bench_testing_kit [--repeats 5] [--out results/benchmarks/testing_kit.txt]
Each check runs once to warm up (imports, the native kernel), then ``--repeats`` times; the median is
reported. The merges are the README's: a hand-written EMA, a torch._foreach Extra-Merge, and weight vectors.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from rivervalley import weights
from rivervalley.testing import (
    BendingRiver,
    RiverValley,
    check_affine_merge,
    check_exact_on_lines,
    check_expected_gain,
    check_extrapolation_limits,
)

BUDGET_S = 1.0
LINEAR = RiverValley(slope=0.3, lr=0.5, interval=2, curvatures=(1.0, 0.2, 1.8))
CURVED = RiverValley(
    slope=1.0, lr=0.5, interval=2, curvatures=(1.0, 0.2), noise=0.3, river_curvature=0.05, river_noise=0.3,
    e0=-10.0,
)  # fmt: skip


def ema(ckpts, beta=0.9):
    m = ckpts[0].clone()
    for theta in ckpts[1:]:
        m.mul_(beta).add_(theta, alpha=1 - beta)
    return m


def extra_merge(x, K=4, d=2, alpha=0.5):
    def sma(group):
        acc = [torch.zeros_like(t) for t in group[0]]
        for params in group:
            torch._foreach_add_(acc, params, alpha=1 / K)
        return acc

    now, before = sma([[row] for row in x[-K:]]), sma([[row] for row in x[-K - d : -d]])
    torch._foreach_add_(now, torch._foreach_sub(now, before), alpha=alpha)
    return now[0]


CASES = [
    ("check_affine_merge(EMA, n=8, torch)",
     lambda: check_affine_merge(ema, 8, backend="torch", expected=weights.ema(8, 0.9))),
    ("check_affine_merge(Extra-Merge _foreach, n=16)",
     lambda: check_affine_merge(extra_merge, 16, backend="torch", expected=weights.extra(16, 4, 2, 0.5))),
    ("check_exact_on_lines(Extra-Merge _foreach, n=16)",
     lambda: check_exact_on_lines(extra_merge, 16, backend="torch")),
    ("check_expected_gain(weights, n=16, linear river)",
     lambda: check_expected_gain(weights.extra(16, 4, 2, 0.5), LINEAR)),
    ("check_expected_gain(EMA function, n=8)",
     lambda: check_expected_gain(ema, LINEAR, n=8, backend="torch")),
    ("check_expected_gain(weights, n=16, curved river)",
     lambda: check_expected_gain(weights.extra(16, 4, 4, 2.0), CURVED)),
    ("check_extrapolation_limits(Extra-Merge, curved river)",
     lambda: check_extrapolation_limits(lambda a: weights.extra(12, 4, 4, a), CURVED)),
    ("check_extrapolation_limits(Extra-Merge, bending river)",
     lambda: check_extrapolation_limits(lambda a: weights.extra(12, 4, 4, a), BendingRiver())),
]  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per check (median reported)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    lines = [
        f"rivervalley.testing checks, default settings, median of {args.repeats} "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)",
        f"{'check':56}{'median s':>10}{'/ 1 s budget':>14}",
    ]
    worst = 0.0
    for name, run in CASES:
        run()  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        worst = max(worst, med)
        lines.append(f"{name:56}{med:>10.3f}{med / BUDGET_S:>14.2f}")
    lines.append(f"slowest: {worst:.3f} s ({'within' if worst < BUDGET_S else 'OVER'} the 1 s budget)")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if worst < BUDGET_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
