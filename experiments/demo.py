"""The README's main command: ``python -m experiments.demo [-o out/demo] [--fast]``.

Runs a list of stages into one output folder and says where the results are. Today there is one stage,
the toy study (simulate, the full validation grid, every figure; about a minute on two cores); the LM study
will be appended to ``STAGES``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from experiments import toy_study


@dataclass
class Stage:
    name: str
    folder: str
    run: Callable[..., bool]  # (out: Path, fast: bool) -> passed


def _toy(out: Path, fast: bool) -> bool:
    return toy_study.run(out, fast=fast)["report"].passed


STAGES: list[Stage] = [Stage("toy study (simulate, validate, figures)", "toy", _toy)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run the demo: every stage into one output folder.")
    p.add_argument("-o", "--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--fast", action="store_true", help="fast validation grid and quick figures")
    args = p.parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    results = []
    for i, stage in enumerate(STAGES, 1):
        print(
            f"[demo] stage {i}/{len(STAGES)}: {stage.name} -> {out / stage.folder}",
            file=sys.stderr,
            flush=True,
        )
        t = time.perf_counter()
        passed = stage.run(out / stage.folder, args.fast)
        results.append((stage, passed, time.perf_counter() - t))
    print(f"\n== demo done in {time.perf_counter() - t0:.1f} s; results in {out}/ ==")
    for stage, passed, dt in results:
        print(f"  {stage.name}: {'ok' if passed else 'FAILED'} ({dt:.1f} s) -> {out / stage.folder}")
    return 0 if all(p for _, p, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
