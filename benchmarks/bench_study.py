"""Time `extramerge study` (full and --quick) on a 16-checkpoint tiny run, on this machine's cores.

    python -m benchmarks.bench_study [RUN] [--threads 2]     (default RUN: runs/regime/const-s12, made by
                                                               bash scripts/regime_map_train.sh)

Targets (the study issue): the full study under 3 minutes on 2 cores; --quick at most a third of it.
Writes results/benchmarks/study.txt and study.json (which scripts/regime_map_targets.py reads).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from extramerge.cli import main as extramerge


def _time(run: Path, out: Path, threads: int, quick: bool) -> float:
    argv = ["study", str(run), "--calib", str(run / "data/val.jsonl"), "--test", str(run / "data/test.jsonl")]
    argv += ["-o", str(out), "--threads", str(threads), "--quiet"] + (["--quick"] if quick else [])
    t0 = time.perf_counter()
    rc = extramerge(argv)
    if rc != 0:
        raise SystemExit(f"bench_study: extramerge study failed ({rc})")
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?", default="runs/regime/const-s12")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    a = p.parse_args()
    run = Path(a.run)
    n = len(list(run.glob("step_*")))
    with tempfile.TemporaryDirectory() as tmp:
        full = _time(run, Path(tmp) / "full", a.threads, False)
        quick = _time(run, Path(tmp) / "quick", a.threads, True)
    text = (
        f"extramerge study of {run.name} ({n} checkpoints), {a.threads} threads:\n"
        f"  full  {full:6.1f} s   (target < 180 s: {'met' if full < 180 else 'missed'})\n"
        f"  quick {quick:6.1f} s = {quick / full:.2f} of the full study (target <= 0.33: "
        f"{'met' if quick <= full / 3 else 'missed'})\n"
        f"`python -m benchmarks.bench_study {a.run} --threads {a.threads}`\n"
    )
    print(text)
    Path("results/benchmarks/study.txt").write_text(text)
    record = {"run": run.name, "checkpoints": n, "threads": a.threads, "full_s": full, "quick_s": quick}
    Path("results/benchmarks/study.json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
