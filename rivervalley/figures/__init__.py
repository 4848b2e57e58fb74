"""The paper figures, one module per figure; each writes a PNG and the data behind it (JSON) into one folder.

    rivervalley figures -o DIR                      # all of them
    python -m rivervalley.figures.NAME --out DIR [--quick] [--seed S]

Every figure module exposes ``make(out, *, quick=False, seed=0) -> list[Path]`` (the files it wrote).
Figure modules import matplotlib, so they are loaded only when a figure is made.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Callable
from pathlib import Path

FIGURES = ("sma_ema_response", "fve_vs_window", "pc_projection", "delta_loss_alpha", "decay_vs_average")

__all__ = ["FIGURES", "run_all", "script_main"]


def run_all(
    out, *, only=None, quick: bool = False, seed: int = 0, progress: Callable[[str], None] | None = None
):
    """Run every figure (or those in ``only``) into ``out``; returns {name: [paths]}."""
    made = {}
    for name in FIGURES:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        made[name] = importlib.import_module(f"{__name__}.{name}").make(out, quick=quick, seed=seed)
        if progress is not None:
            progress(f"figure {name}: {time.perf_counter() - t0:.1f} s")
    return made


def script_main(figure, argv=None) -> list[Path]:
    """The command line of one figure module: --out DIR [--quick] [--seed S]."""
    p = argparse.ArgumentParser(description=figure.__doc__.strip().splitlines()[0])
    p.add_argument("-o", "--out", default="out/figures", help="output folder (default out/figures)")
    p.add_argument("--quick", action="store_true", help="fewer seeds: a draft in a second or two")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = p.parse_args(argv)
    paths = figure.make(args.out, quick=args.quick, seed=args.seed)
    for path in paths:
        print(path)
    return paths
