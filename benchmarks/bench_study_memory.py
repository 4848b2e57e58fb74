"""Peak memory of `extramerge study` on checkpoints larger than memory allows to stack: 16 checkpoints of a
GPT-2-124M-shaped model (random weights, written once by save_pretrained under .bench/data/), streamed.

    python -m benchmarks.bench_study_memory [--checkpoints 16] [--threads 2] [--data .bench/data]

A few short documents per half keep it to minutes: the cost measured is memory, not evaluation. Prints the
child process's peak RSS against one checkpoint's size (target: ≤ 2.5x), the --dry-run projection beside it,
and the wall time; writes results/benchmarks/study_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

TARGET = 2.5  # peak RSS / one checkpoint (the issue's)


def make_run(root: Path, n: int) -> list[Path]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from extramerge.lm.tokenizer import build_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    done = root / "done.json"
    paths = [root / f"step_{100 * (i + 1):06d}" for i in range(n)]
    if done.is_file() and json.loads(done.read_text()).get("n") == n:
        return paths
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())  # 124M: 12 layers x 768, 50257 tokens, 1024 positions
    build_tokenizer().save_pretrained(root)  # byte-level ids < 257 < GPT-2's 50257 rows
    drift = {k: torch.randn_like(v) * 1e-3 for k, v in model.state_dict().items() if v.is_floating_point()}
    for p in paths:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if k in drift:
                    v.add_(drift[k] + torch.randn_like(v) * 1e-3)
        model.save_pretrained(p)
    done.write_text(json.dumps({"n": n}))
    return paths


def _docs(path: Path, n: int, words: int) -> Path:
    text = "the river runs down the valley and the walls rise on either side "
    path.write_text("".join(json.dumps({"text": f"{i} " + text * words}) + "\n" for i in range(n)))
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=Path(".bench/data/study-gpt2-124m"))
    p.add_argument("--out", type=Path, default=Path("results/benchmarks/study_memory.json"))
    a = p.parse_args()
    paths = make_run(a.data, a.checkpoints)
    one = sum(f.stat().st_size for f in paths[-1].glob("*.safetensors"))
    calib = _docs(a.data / "calib.jsonl", 4, 17)  # the least the study takes: 4 documents, 4 KiB a half
    test = _docs(a.data / "test.jsonl", 4, 17)
    out = a.data / "study"
    base = [sys.executable, "-m", "extramerge", "study", *map(str, paths), "--calib", str(calib), "--test"]
    base += [str(test), "-o", str(out), "--force", "--quiet", "--threads", str(a.threads), "--stream"]
    base += ["--offsets", "2", "--alphas", "0.5"]  # the fewest merges: memory, not the menu, is measured
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    dry = subprocess.run([*base, "--dry-run"], capture_output=True, text=True, env=env, check=True)
    t0 = time.perf_counter()
    subprocess.run([*base, "--quick"], check=True, env=env)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child: the study
    rep = json.loads((out / "study.json").read_text())
    res = {
        "checkpoints": a.checkpoints,
        "checkpoint_bytes": one,
        "peak_rss_bytes": peak,
        "ratio": peak / one,
        "target": TARGET,
        "met": peak / one <= TARGET,
        "projected_bytes": rep["memory"]["bytes"],
        "dry_run": dry.stdout.strip().splitlines()[-1],
        "evaluations": rep["evaluations"],
        "wall_s": wall,
        "threads": a.threads,
        "command": "python -m benchmarks.bench_study_memory " + " ".join(sys.argv[1:]),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"dry run: {res['dry_run']}")
    print(
        f"study --stream --quick of {a.checkpoints} x {one / 2**20:.0f} MiB checkpoints: peak RSS "
        f"{peak / 2**20:.0f} MiB = {res['ratio']:.2f}x one checkpoint (target <= {TARGET}x: "
        f"{'met' if res['met'] else 'MISSED'}); {rep['evaluations']} evaluations in {wall:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
