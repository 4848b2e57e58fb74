"""Overhead of the LM trainer's step path over a plain hand-written PyTorch loop.

    python -m benchmarks.bench_train                    # tiny (40 steps) and small (8 steps), 3 repeats each
    python -m benchmarks.bench_train --steps 20 --repeats 2 --presets tiny
    python -m benchmarks.bench_train --threads 1,2      # one row per thread count

For each preset (GPT-2, AdamW, batch 32 x the preset's context, pydoc), on the same model init and the same
data, the same number of torch threads:

(a) ``experiments.lm.train.train``: the real loop (lr schedule applied to every param group, random
    windows from train.npy, clipping, running loss, log.jsonl lines every 10 steps, tqdm), timed by the
    trainer itself (``run.json`` ``timings.train_s``: the loop without its checkpoint/eval/resume writes,
    which are reported separately as ``ckpt_s``);
(b) a plain loop: sample windows, forward, cross-entropy, backward, clip, ``AdamW.step``, ``zero_grad``,
    timed from its first step to ``loss.item()`` after its last.

Runs alternate (a, b), (b, a), ... to spread drifts in machine load evenly; the overhead is the median over
repeats of the paired ratio ``plain tokens/s / trainer tokens/s - 1``. Writes ``train.txt`` and ``train.json``
to ``--out`` (default ``results/benchmarks``) with the load average before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from extramerge.lm import data as lmdata
from extramerge.lm.config import TrainConfig
from extramerge.lm.models import build_model, preset_param_count, resolve_size
from extramerge.lm.train import train
from rivervalley.common.resources import available_cores as _available_cores
from rivervalley.common.resources import flush_denormals

DEFAULT_STEPS = {"tiny": 40, "small": 8}
LR = 3e-3


def trainer_run(size: str, steps: int, batch: int, threads: int, work: Path, tag: str) -> dict:
    """Tokens/s of the real trainer (its own train_s: checkpoint, eval and resume writes excluded)."""
    out = work / f"{size}-{tag}"
    cfg = TrainConfig(
        out=str(out),
        arch="gpt2",
        size=size,
        optimizer="adamw",
        lr=LR,
        schedule="cosine",
        steps=steps,
        batch_size=batch,
        ckpt_every=steps,
        eval_batches=1,
        log_every=10,
        threads=threads,
        corpus="pydoc",
        progress=True,
    )
    sink = io.StringIO()
    with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):  # tqdm runs, but out of sight
        train(cfg)
    rec = json.loads((out / "run.json").read_text())
    t = rec["timings"]
    return {
        "tokens_per_s": steps * rec["tokens_per_step"] / t["train_s"],
        "train_s": t["train_s"],
        "ckpt_s": t["ckpt_s"],
        "resume_s": t["resume_s"],
        "eval_s": t["eval_s"],
    }


def plain_run(size: str, steps: int, batch: int, threads: int, tokens: np.ndarray) -> dict:
    """Tokens/s of a hand-written loop on the same model init and the same kind of batches."""
    seq = resolve_size(size).seq_len
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with flush_denormals():
            torch.manual_seed(0)
            model = build_model("gpt2", size)
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
            rng = np.random.default_rng(0)
            offsets = np.arange(seq + 1)
            t0 = time.perf_counter()
            for _ in range(steps):
                starts = rng.integers(0, len(tokens) - seq, size=batch)
                chunk = torch.from_numpy(tokens[starts[:, None] + offsets].astype(np.int64))
                logits = model(input_ids=chunk[:, :-1], use_cache=False).logits
                loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), chunk[:, 1:].reshape(-1))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            loss.item()
            dt = time.perf_counter() - t0
    finally:
        torch.set_num_threads(old)
    return {"tokens_per_s": steps * batch * seq / dt, "train_s": dt}


def bench(presets, steps_arg, repeats: int, batch: int, threads_list) -> dict:
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        tokens = lmdata.load_split(lmdata.prepare("pydoc", work / "data"), "train")  # what the trainer reads
        for size, threads in [(s, t) for s in presets for t in threads_list]:
            steps = steps_arg or DEFAULT_STEPS.get(size, 10)
            seq = resolve_size(size).seq_len
            ours, plain = [], []
            for rep in range(repeats):
                order = ("ours", "plain") if rep % 2 == 0 else ("plain", "ours")
                for who in order:
                    if who == "ours":
                        ours.append(trainer_run(size, steps, batch, threads, work, f"t{threads}r{rep}"))
                    else:
                        plain.append(plain_run(size, steps, batch, threads, tokens))
                    last = (ours if who == "ours" else plain)[-1]["tokens_per_s"]
                    print(
                        f"  {size} threads {threads} rep {rep} {who:5s} {last:9.0f} tokens/s",
                        file=sys.stderr,
                        flush=True,
                    )
            ratios = [p["tokens_per_s"] / o["tokens_per_s"] - 1 for o, p in zip(ours, plain, strict=True)]
            ours_tps = statistics.median(o["tokens_per_s"] for o in ours)
            results[f"{size}/threads={threads}"] = {
                "preset": size,
                "threads": threads,
                "params": preset_param_count("gpt2", size),
                "batch": batch,
                "seq_len": seq,
                "tokens_per_step": batch * seq,
                "steps": steps,
                "repeats": repeats,
                "trainer_tokens_per_s": [round(o["tokens_per_s"], 1) for o in ours],
                "plain_tokens_per_s": [round(p["tokens_per_s"], 1) for p in plain],
                "trainer_tokens_per_s_median": round(ours_tps, 1),
                "plain_tokens_per_s_median": round(statistics.median(p["tokens_per_s"] for p in plain), 1),
                "overhead_pct_paired": [round(100 * r, 2) for r in ratios],
                "overhead_pct": round(100 * statistics.median(ratios), 2),
                "trainer_steps_per_s": round(ours_tps / (batch * seq), 3),
                "checkpoint_write_s_median": round(statistics.median(o["ckpt_s"] for o in ours), 3),
                "resume_save_s_median": round(statistics.median(o["resume_s"] for o in ours), 3),
            }
    return results


def report(results: dict, meta: dict) -> str:
    lines = [
        "LM trainer step path vs a plain PyTorch loop (GPT-2, AdamW, pydoc; same init, threads, batches)",
        f"command: {meta['command']}",
        f"machine: {meta['cpus']} CPUs available, torch threads {meta['threads']} (same in both loops), "
        f"torch {meta['torch']}, {meta['platform']}",
        f"load average (1/5/15 min) before: {meta['load_before']}, after: {meta['load_after']} "
        "(shared machine: other jobs ran alongside)",
        "",
        f"{'preset':8s} {'threads':>7s} {'params':>8s} {'batch x seq':>12s} {'steps':>5s} "
        f"{'trainer tok/s':>14s} {'plain tok/s':>12s} {'overhead':>9s} {'steps/s':>8s} {'ckpt write':>10s}",
    ]
    for r in results.values():
        lines.append(
            f"{r['preset']:8s} {r['threads']:7d} {r['params'] / 1e6:7.2f}M "
            f"{r['batch']:>5d} x {r['seq_len']:<4d} {r['steps']:5d} "
            f"{r['trainer_tokens_per_s_median']:14,.0f} {r['plain_tokens_per_s_median']:12,.0f} "
            f"{r['overhead_pct']:+8.1f}% {r['trainer_steps_per_s']:8.3f} "
            f"{r['checkpoint_write_s_median']:9.3f}s"
        )
    lines += ["", "per-repeat overhead % (plain/trainer - 1, paired runs):"]
    lines += [f"  {size}: {r['overhead_pct_paired']}" for size, r in results.items()]
    lines.append(
        "tokens/s are medians over repeats; 'ckpt write' (one HF folder) is excluded from trainer tok/s."
    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: tiny 40, small 8)")
    p.add_argument("--repeats", type=int, default=3, help="paired runs per preset (default 3)")
    p.add_argument("--presets", default="tiny,small", help="comma-separated sizes (default tiny,small)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step (default 32)")
    p.add_argument("--threads", default=None, help="torch threads, or a comma list (default: all cores)")
    p.add_argument("--out", default="results/benchmarks", help="folder for train.txt and train.json")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [_available_cores()]
    meta = {
        "command": "python -m benchmarks.bench_train " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpus": _available_cores(),
        "threads": threads,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }
    results = bench(
        [s.strip() for s in args.presets.split(",") if s.strip()],
        args.steps,
        args.repeats,
        args.batch_size,
        threads,
    )
    meta["load_after"] = [round(x, 2) for x in os.getloadavg()]
    text = report(results, meta)
    print(text, end="")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text(text)
    (out / "train.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
