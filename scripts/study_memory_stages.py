"""Resident memory of the study's evaluator stage by stage (a sampler thread records the peak within each
stage): build, first load, then merges measured one after another. For finding where a streamed study's
memory goes; the benchmark itself is benchmarks/bench_study_memory.py, whose checkpoints this reads.

    python scripts/study_memory_stages.py [N_CHECKPOINTS] [--threads 2] [--data .bench/data/study-gpt2-124m]

Compare allocator settings with the environment, e.g. MALLOC_MMAP_THRESHOLD_=262144 (glibc).
"""

import argparse
import json
import sys
import threading
import time
from pathlib import Path


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("n", type=int, nargs="?", default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=Path(".bench/data/study-gpt2-124m"))
    a = p.parse_args()
    peak, stage = [0.0, "start"], ["imports"]

    def sample():
        while True:
            r = rss_mib()
            if r > peak[0]:
                peak[:] = [r, stage[0]]
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()

    def mark(name):
        print(f"{name:14s} rss {rss_mib():7.0f} MiB, peak {peak[0]:7.0f} MiB (in {peak[1]})", flush=True)
        stage[0] = name

    import numpy as np
    import torch

    from extramerge.study.evaluator import Evaluator
    from extramerge.study.inputs import read_checkpoints

    torch.set_num_threads(a.threads)
    mark("imports")
    paths = sorted(str(x) for x in a.data.glob("step_*"))[: a.n]
    ckpts, infos = read_checkpoints(paths)
    ev = Evaluator(ckpts, list(infos), str(a.data), stream=True)
    mark("evaluator")
    ev.add_half("calib", [json.loads(line)["text"] for line in open(a.data / "calib.jsonl")])
    n = len(paths)
    rng = np.random.default_rng(0)
    for k in range(6):
        ev.measure(rng.dirichlet(np.ones(n)) if k else np.eye(n)[-1], "calib")
        mark(f"measure {k + 1}")
    print(f"plan: {ev.plan['bytes'] / 2**20:.0f} MiB ({ev.plan['mode']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
