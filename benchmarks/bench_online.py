"""Cost of online merging (extramerge.online) on the trainer's presets: added time per training step and
extra memory of EMA (every step and every k), SMA-K, Extra-Merge and power EMA, against a plain step and
against ``torch.optim.swa_utils.AveragedModel.update_parameters``.

    python -m benchmarks.bench_online                       # small preset, batch 32, 5 repeats
    python -m benchmarks.bench_online --preset tiny --repeats 3 --threads 1

Per repeat: one plain training step (GPT-2 of the preset, AdamW, clipping, random byte windows of the
preset's context), timed; then each variant's update, timed alone right after that step (the weights
just written, as in training). A variant updated every k steps costs its update time / k per step.
Reported: medians over repeats with [min, max]; the per-step overhead = update / plain step. Memory: the
bytes each variant's stores hold (``OnlineMerger.nbytes``) against the parameters, and AveragedModel's
full module copy. ``--e2e`` steps also time whole steps with and without the EMA, alternating, as a
cross-check. Finally the SMA strategy: summing the ring on read (what the merger does) against a running
sum updated by add/subtract (cheaper reads, but rounding drift), measured on the same parameters.
Writes online.txt and online.json to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from extramerge.lm.models import build_model, resolve_size
from extramerge.online import OnlineMerger
from rivervalley.common.resources import available_cores, flush_denormals

VARIANTS = {  # name: (spec, every)
    "ema (every step)": ("ema:0.999", 1),
    "ema (every 10)": ("ema:0.999", 10),
    "sma:8": ("sma:8", 1),
    "sma:8 + extra:0.5@4": ("sma:8,extra:0.5@4", 1),
    "ema + extra:0.5@4": ("ema:0.999,extra:0.5@4", 1),
    "pema:6.94": ("pema:6.94", 1),
}


def _step(model, opt, batch: torch.Tensor) -> float:
    loss = F.cross_entropy(
        (logits := model(input_ids=batch[:, :-1], use_cache=False).logits).reshape(-1, logits.size(-1)),
        batch[:, 1:].reshape(-1),
    )
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def bench(preset: str, batch: int, repeats: int, e2e: int) -> dict:
    torch.manual_seed(0)
    shape = resolve_size(preset)
    model = build_model("gpt2", preset, seq_len=shape.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)

    def batch_():
        return torch.randint(0, 257, (batch, shape.seq_len + 1), generator=gen)

    mergers = {name: OnlineMerger(model, spec, every=every) for name, (spec, every) in VARIANTS.items()}
    swa = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    param_bytes = mergers["sma:8"].param_bytes()
    _step(model, opt, batch_())  # warm-up (allocations, first-touch of AdamW state)
    steps, upd = [], {name: [] for name in [*VARIANTS, "AveragedModel.update_parameters"]}
    for r in range(1, max(repeats, 10) + 1):
        steps.append(_timed(lambda: _step(model, opt, batch_())))
        for name, m in mergers.items():
            k = m.every
            t = _timed(lambda m=m, r=r, k=k: m.update(r * k))  # an update step for every variant
            upd[name].append(t / k)  # amortised over the k steps between updates
        upd["AveragedModel.update_parameters"].append(_timed(lambda: swa.update_parameters(model)))
        if r >= repeats and all(len(v) >= 10 for v in upd.values()):
            break
    plain = statistics.median(steps)
    rows = {}
    for name, ts in upd.items():
        m = mergers.get(name)
        mem = sum(m.nbytes().values()) if m is not None else _module_bytes(swa.module)
        rows[name] = {
            "added_s": _stats(ts),
            "overhead_pct": 100 * statistics.median(ts) / plain,
            "extra_bytes": mem,
            "extra_vs_params": mem / param_bytes,
        }
    out = {"preset": preset, "batch": batch, "params": param_bytes // 4, "param_bytes": param_bytes}
    out |= {"plain_step_s": _stats(steps), "variants": rows}
    if e2e:
        out["e2e"] = _end_to_end(model, opt, batch_, e2e)
    out["sma_strategy"] = _sma_strategy(model)
    out["measured_memory"] = _measured_memory(preset)
    return out


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_of(preset: str, spec: str) -> dict:
    """In this (fresh) process: resident memory added by one variant's stores once full (K + d + 2
    updates), against what ``nbytes`` says they hold. ``spec`` 'AveragedModel' for swa_utils'."""
    import gc

    torch.manual_seed(0)
    model = build_model("gpt2", preset, seq_len=resolve_size(preset).seq_len)
    gc.collect()
    before = _rss()
    if spec == "AveragedModel":
        m = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))
        for _ in range(3):
            m.update_parameters(model)
        held = _module_bytes(m.module)
    else:
        m = OnlineMerger(model, spec)
        for step in range(1, 16):
            m.update(step)
        held = sum(m.nbytes().values())
    gc.collect()
    return {"measured_bytes": _rss() - before, "held_bytes": held}


def _measured_memory(preset: str) -> dict:
    """``rss_of`` for every variant, each in its own process (a fresh allocator)."""
    import subprocess

    out = {}
    variants = [(n, spec) for n, (spec, every) in VARIANTS.items() if every == 1]  # every k: same stores
    for name, spec in [*variants, ("AveragedModel.update_parameters", "AveragedModel")]:
        cmd = [sys.executable, "-m", "benchmarks.bench_online", "--preset", preset, "--rss-of", spec]
        row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        out[name] = {"spec": spec, **row}
    return out


def _module_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _end_to_end(model, opt, batch_, n: int) -> dict:
    """Whole steps, alternating plain and plain + EMA every step."""
    merger = OnlineMerger(model, "ema:0.999")
    plain, ema = [], []
    for i in range(1, n + 1):
        b1, b2 = batch_(), batch_()
        plain.append(_timed(lambda b1=b1: _step(model, opt, b1)))
        ema.append(_timed(lambda b2=b2, i=i: (_step(model, opt, b2), merger.update(i))))
    return {"plain_s": _stats(plain), "ema_s": _stats(ema)}


def _sma_strategy(model, k: int = 8, updates: int = 64) -> dict:
    """Ring summed on read vs a running sum (add new, subtract oldest): update time, read time, drift."""
    params = [p.detach() for p in model.parameters()]
    gen = torch.Generator().manual_seed(1)
    ring = OnlineMerger(params, f"sma:{k}")
    running = [torch.zeros_like(p) for p in params]
    window = []
    t_ring, t_run = [], []
    exact = None
    for step in range(1, updates + 1):
        for p in params:
            p.add_(1e-3 * torch.randn(p.shape, generator=gen))
        t_ring.append(_timed(lambda step=step: ring.update(step)))
        snap = [p.clone() for p in params]  # the running sum needs the ring too (to subtract the oldest)

        def run_update(snap=snap):
            for acc, s in zip(running, snap, strict=True):
                acc.add_(s)
            if len(window) == k:
                for acc, s in zip(running, window[0], strict=True):
                    acc.sub_(s)

        t_run.append(_timed(run_update))
        window.append(snap)
        window[:] = window[-k:]
    exact = [sum(w[i].double() for w in window) / k for i in range(len(params))]
    drift_run = max(float((acc.double() / k - e).abs().max()) for acc, e in zip(running, exact, strict=True))
    merged = dict(ring.merged("sma"))
    drift_ring = max(float((merged[str(i)].double() - e).abs().max()) for i, e in enumerate(exact))
    t_read = _timed(lambda: list(ring.merged("sma")))
    return {
        "k": k,
        "updates": updates,
        "ring_update_s": statistics.median(t_ring),
        "running_sum_update_s": statistics.median(t_run),
        "ring_read_s": t_read,
        "max_abs_error_ring": drift_ring,
        "max_abs_error_running_sum": drift_run,
    }


def report(res: dict, meta: dict) -> str:
    ps = res["plain_step_s"]
    lines = [
        "Online merging (extramerge.online): added time per training step and extra memory",
        f"command: {meta['command']}",
        f"machine: {meta['cores']} CPUs available, torch threads {meta['threads']}, "
        f"torch {torch.__version__}, {platform.platform()}",
        f"load average (1/5/15 min) before: {meta['load_before']}, after: {meta['load_after']}",
        "",
        f"preset {res['preset']} (GPT-2, {res['params'] / 1e6:.2f} M params, fp32), AdamW, "
        f"batch {res['batch']}",
        f"plain step: median {ps['median']:.3f} s [{ps['min']:.3f}, {ps['max']:.3f}] over {ps['n']}",
        "",
        f"{'variant':34s} {'added ms/step':>14s} {'[min, max]':>18s} {'overhead':>9s} {'extra memory':>14s}",
    ]
    for name, row in res["variants"].items():
        a = row["added_s"]
        spread = f"[{1e3 * a['min']:.2f}, {1e3 * a['max']:.2f}]"
        lines.append(
            f"{name:34s} {1e3 * a['median']:14.2f} {spread:>18s} "
            f"{row['overhead_pct']:8.2f}% {row['extra_bytes'] / 2**20:9.1f} MiB "
            f"({row['extra_vs_params']:.0f}x)"
        )
    if "e2e" in res:
        e = res["e2e"]
        lines += [
            "",
            f"whole steps, alternating ({e['plain_s']['n']} each): plain {e['plain_s']['median']:.3f} s "
            f"[{e['plain_s']['min']:.3f}, {e['plain_s']['max']:.3f}], with EMA {e['ema_s']['median']:.3f} s "
            f"[{e['ema_s']['min']:.3f}, {e['ema_s']['max']:.3f}]",
        ]
    s = res["sma_strategy"]
    lines += [
        "",
        f"SMA-{s['k']} strategy over {s['updates']} updates: ring (copy per update, sum on read) "
        f"{1e3 * s['ring_update_s']:.2f} ms/update, read {1e3 * s['ring_read_s']:.1f} ms, max error "
        f"{s['max_abs_error_ring']:.1e}; running sum (add + subtract) {1e3 * s['running_sum_update_s']:.2f} "
        f"ms/update (plus the same ring copy), max error {s['max_abs_error_running_sum']:.1e}",
        "extra memory: the stores only (ring of K + d snapshots, one copy per EMA, d more for an EMA's "
        "Extra-Merge); AveragedModel: a deep copy of the module (parameters and buffers).",
        "",
        "resident memory added, measured (each variant alone in a fresh process, stores full):",
    ]
    for name, row in res["measured_memory"].items():
        lines.append(
            f"  {name:34s} {row['measured_bytes'] / 2**20:8.1f} MiB measured, "
            f"{row['held_bytes'] / 2**20:8.1f} MiB held: {row['measured_bytes'] / row['held_bytes']:.2f}x"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_online", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--preset", default="small", help="trainer size preset (default small)")
    p.add_argument(
        "--batch-size", type=int, default=32, help="sequences per step (default 32, the trainer's)"
    )
    p.add_argument("--repeats", type=int, default=5, help="plain steps timed (default 5; updates >= 10)")
    p.add_argument("--e2e", type=int, default=0, help="also time N whole steps with and without EMA")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--out", default="results/benchmarks", help="folder for online.txt and online.json")
    p.add_argument("--rss-of", default=None, help=argparse.SUPPRESS)  # internal: one variant's memory
    args = p.parse_args(argv)
    if args.rss_of:
        torch.set_num_threads(1)
        print(json.dumps(rss_of(args.preset, args.rss_of)))
        return 0
    threads = args.threads or available_cores()
    torch.set_num_threads(threads)
    meta = {
        "command": "python -m benchmarks.bench_online " + " ".join(sys.argv[1:] if argv is None else argv),
        "cores": available_cores(),
        "threads": threads,
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }
    with flush_denormals():
        res = bench(args.preset, args.batch_size, args.repeats, args.e2e)
    meta["load_after"] = [round(x, 2) for x in os.getloadavg()]
    text = report(res, meta)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "online.txt").write_text(text)
    (out / "online.json").write_text(json.dumps({"meta": meta, **res}, indent=1) + "\n")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
