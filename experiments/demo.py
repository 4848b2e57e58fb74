"""The README's main command: ``python -m experiments.demo [-o out/demo] [--fast]``.

Runs a list of stages into one output folder and says where the results are:

1. the toy study (simulate, the full validation grid, every figure; well under a minute on two cores);
2. the LM study: train the tiny byte-level GPT-2 on the embedded corpus (Python's ``pydoc_data.topics``)
   with AdamW at a constant learning rate, checkpoints over the last 30%, then ``experiments.lm.study`` on
   them (rank-1 fractions, measured last / SMA / EMA / WMA / Extra-Merge / trend / pc1 on held-out loss and
   cloze accuracy, predicted versus measured α* and gain); it prints the table. A few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from experiments import toy_study
from rivervalley.common.publish import claim_folder, mark


@dataclass
class Stage:
    name: str
    folder: str
    run: Callable[..., bool]  # (out: Path, fast: bool) -> passed


def _toy(out: Path, fast: bool) -> bool:
    return toy_study.run(out, fast=fast)["report"].passed


# The demo's LM run: tiny GPT-2 (0.8M parameters), AdamW, constant lr after warmup (the stable phase where
# checkpoints oscillate across the valley while drifting down the river), 16 checkpoints from step 420.
LM_DEMO = dict(
    arch="gpt2",
    size="tiny",
    optimizer="adamw",
    schedule="constant",
    lr=2e-3,
    warmup=50,
    steps=600,
    ckpt_every=12,
    ckpt_from=420,
    batch_size=16,
)
# --fast (the tests): a 2-layer, 32-wide model on 32-token windows, seconds instead of minutes.
LM_DEMO_FAST = {
    **LM_DEMO,
    **dict(n_layer=2, d_model=32, n_head=2, seq_len=32, batch_size=8, steps=80, ckpt_every=5, ckpt_from=40),
    "warmup": 10,
    "lr": 3e-3,
    "threads": 1,
}


def _lm(out: Path, fast: bool) -> bool:
    from experiments.lm import study
    from extramerge.lm.config import TrainConfig
    from extramerge.lm.train import train

    run = out / "run"
    if run.exists():  # the demo's own run from an earlier call: train afresh
        shutil.rmtree(run)
    train(TrainConfig(out=str(run), **(LM_DEMO_FAST if fast else LM_DEMO), progress=True))
    argv = ["--run", str(run), "-o", str(out / "study"), "--force", "--quiet"]
    if fast:
        argv += ["--threads", "1"]
    return study.main(argv) == 0


STAGES: list[Stage] = [
    Stage("toy study (simulate, validate, figures)", "toy", _toy),
    Stage("LM study (tiny GPT-2 on pydoc, AdamW; which merge to ship, predicted vs measured)", "lm", _lm),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run the demo: every stage into one output folder.")
    p.add_argument("-o", "--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--fast", action="store_true", help="fast validation grid and quick figures")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(
            f"experiments.demo: error: {out}: exists and is not a folder (-o takes a folder)", file=sys.stderr
        )
        return 2
    try:  # the demo replaces its own earlier output, and never writes into a folder of someone else's
        claim_folder(out, True, "the demo")
        out.mkdir(parents=True, exist_ok=True)
        mark(out, {"tool": "rivervalley", "command": "demo"})
    except (ValueError, OSError) as e:
        print(f"experiments.demo: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results = []
    for i, stage in enumerate(STAGES, 1):
        print(
            f"[demo] stage {i}/{len(STAGES)}: {stage.name} -> {out / stage.folder}",
            file=sys.stderr,
            flush=True,
        )
        t = time.perf_counter()
        try:
            passed = stage.run(out / stage.folder, args.fast)
        except (ValueError, OSError) as e:  # one line per failed stage; the other stages still run
            print(
                f"[demo] stage {stage.name} failed: {str(e).splitlines()[0] if str(e) else e!r}",
                file=sys.stderr,
            )
            passed = False
        results.append((stage, passed, time.perf_counter() - t))
    print(f"\n== demo done in {time.perf_counter() - t0:.1f} s; results in {out}/ ==")
    for stage, passed, dt in results:
        print(f"  {stage.name}: {'ok' if passed else 'FAILED'} ({dt:.1f} s) -> {out / stage.folder}")
    return 0 if all(p for _, p, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
