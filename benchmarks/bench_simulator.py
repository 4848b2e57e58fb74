"""Speed of the batched river-valley simulator (rivervalley.simulate) on CPU (or a GPU with --device cuda).

    python -m benchmarks.bench_simulator                   # full size: S=1024 seeds, p=1024, T=10^4 steps
    python -m benchmarks.bench_simulator --steps 1000      # quick run
    python -m benchmarks.bench_simulator --json out.json   # also write the numbers (``--json -``: stdout)
    python -m benchmarks.bench_simulator --threads 1       # one torch thread (best on a busy machine)
    python -m benchmarks.bench_simulator --device cuda     # the same measurements on a GPU

Measures, for plain SGD on the quadratic river valley in its eigenbasis (additive noise σ = 1):

1. the step path (default noise backend: the compiled Philox kernel, draw fused with the update, when it
   builds): seed·step·coordinate updates per second, as a user calls it (fresh output);
2. a naive baseline that loops over seeds in Python (one [p] vector per seed, the same math), timed on a
   few seeds × fewer steps and extrapolated linearly to S × T;
3. a memory-bandwidth bound: copy bandwidth (bytes read + written per second of a torch copy, both of a
   512 MiB buffer = DRAM and of one [S, p] buffer = the working set, which may sit in cache) divided by
   the bytes a step must move per seed·coordinate: read θ and write θ, 16 B (the fused kernel draws each
   Gaussian in registers, so no noise tensor is written or read). Also the rates of the Gaussian samplers
   alone (native and torch's);
4. the exact fast path (closed-form AR(1) jumps between checkpoints) against stepping, same checkpoints:
   both end to end with fresh output, and both writing into one reused ``out`` buffer. Fresh output must
   first be mapped by the kernel (page faults), a cost the output's size sets for either path: it is
   larger than the 100 jumps themselves, so the end-to-end ratio stays well below s;
5. the step path with torch's sampler (``noise_backend='torch'``: draw float32, convert, two update
   passes, 56 B per update), fewer steps;
6. the noise-free step path (no sampler; bound: read + write θ, 16 B), showing the update kernels
   themselves against the bandwidth bound;
7. optionally the rotated quadratic (dense Hessian: one [S, p] × [p, p] matmul per step), fewer steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

from rivervalley import _native
from rivervalley.common.resources import flush_denormals
from rivervalley.landscapes import QuadraticRiverValley
from rivervalley.simulate import simulate
from rivervalley.simulate.noise import NoiseSource

BYTES_STEP = 16  # read θ 8 + write θ 8 (float64 θ; the fused kernel's noise stays in registers)
BYTES_TORCH = 56  # torch sampler path: mul_ 16 + randn 4 + float32->float64 12 + add_(ξ) 24


def _landscape(p: int, rotate: bool = False) -> QuadraticRiverValley:
    # λ_i = i^(−1/2) on the valley: ηλ ≤ 0.5 keeps every coordinate stable at η = 0.5.
    return QuadraticRiverValley(slope=1.0, m=p - 1, power_law=(1.0, 0.5), rotate=rotate, seed=0)


DEVICE = "cpu"


def _sync() -> None:
    if DEVICE != "cpu":
        torch.cuda.synchronize(DEVICE)


def copy_bandwidth(n_bytes: int, repeats: int = 5) -> float:
    """Best-of-``repeats`` bytes/s of ``dst.copy_(src)`` for float64 buffers of ``n_bytes``, counting the
    bytes read plus the bytes written. 512 MiB measures DRAM; the simulator's [S, p] size may fit in cache."""
    src = torch.ones(max(1, n_bytes // 8), dtype=torch.float64, device=DEVICE)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync()
    reps = max(repeats, int(2**28 // n_bytes))  # small buffers: repeat enough to time reliably
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src)
        _sync()
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * src.numel() * 8 / best


def sampler_rate(s: int, p: int, backend: str, repeats: int = 20) -> float:
    """Gaussians per second of the simulator's noise source for [S, p] into float64 (torch: float32 draws
    converted; native: float32 Box-Muller widened as stored)."""
    src = NoiseSource((s, p), 0, torch.float32, DEVICE, out_dtype=torch.float64, backend=backend)
    try:
        src.draw()
        _sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            src.draw()
        _sync()
        return s * p * repeats / (time.perf_counter() - t0)
    finally:
        src.close()


def numpy_sampler_rate(s: int, p: int, repeats: int = 10) -> float:
    """float32 normals per second of numpy's fastest generator (SFC64 + ziggurat), one thread."""
    gen = np.random.Generator(np.random.SFC64(0))
    out = np.empty((s, p), dtype=np.float32)
    gen.standard_normal(out=out, dtype=np.float32)
    t0 = time.perf_counter()
    for _ in range(repeats):
        gen.standard_normal(out=out, dtype=np.float32)
    return s * p * repeats / (time.perf_counter() - t0)


def kernel_costs(s: int, p: int, n: int = 50) -> dict:
    """Seconds per step and per jump of the native kernels as the simulator calls them, best of 3 rounds
    of ``n``: a step inside one multi-step SGD call (in place), and a jump inside one multi-jump call (in
    place, plus a non-temporal store of the result into its checkpoint slot, mapped beforehand)."""
    src = _native.PhiloxNormals(1)
    try:
        x = torch.zeros(s, p, dtype=torch.float64)
        h, g, sd = (torch.full((p,), v, dtype=torch.float64) for v in (0.5, 0.0, 1.0))
        lrs = torch.full((n,), 0.1, dtype=torch.float64)
        a, b, c = (torch.full((p,), v, dtype=torch.float64) for v in (0.9, 0.0, 0.1))
        slots = torch.zeros(s, n, p, dtype=torch.float64)
        best_step = best_jump = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            src.sgd_steps(x, h, g, sd, lrs)
            t1 = time.perf_counter()
            src.jumps(x, a, b, c, slots)
            t2 = time.perf_counter()
            best_step, best_jump = min(best_step, (t1 - t0) / n), min(best_jump, (t2 - t1) / n)
        return {"step_s": best_step, "jump_s": best_jump}
    finally:
        src.close()


def naive_rate(p: int, seeds: int, steps: int, lr: float, sigma: float) -> float:
    """Updates per second of a per-seed Python loop: for each seed, for each step, g = hθ − c·e_0 + σξ
    and θ ← θ − ηg on a [p] vector."""
    q = _landscape(p).to(DEVICE, torch.float64)
    h = q.eigenvalues
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    _sync()
    t0 = time.perf_counter()
    with flush_denormals():
        for _ in range(seeds):
            theta = torch.zeros(p, dtype=torch.float64, device=DEVICE)
            for _ in range(steps):
                g = h * theta
                g[0] -= q.slope
                g += sigma * torch.randn(p, generator=gen, dtype=torch.float64, device=DEVICE)
                theta -= lr * g
    _sync()
    return seeds * steps * p / (time.perf_counter() - t0)


def _timed(fn):
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - t0


def run(args) -> dict:
    s, p, steps, every = args.seeds, args.dim, args.steps, args.ckpt_every
    lr, sigma = 0.5, 1.0
    q = _landscape(p).to(DEVICE, torch.float64)
    res = {
        "config": {
            "seeds": s,
            "dim": p,
            "steps": steps,
            "ckpt_every": every,
            "lr": lr,
            "noise": sigma,
            "device": DEVICE,
            "command": "python -m benchmarks.bench_simulator " + " ".join(sys.argv[1:]),
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name(DEVICE) if DEVICE != "cpu" else None,
            "note": "shared machine: other jobs may have run concurrently",
        },
    }
    bw_dram = copy_bandwidth(512 * 2**20)
    bw_ws = copy_bandwidth(s * p * 8)
    native = DEVICE == "cpu" and _native.load() is not None
    res["native_kernel"] = _native.status()["detail"] if DEVICE == "cpu" else "not used on " + DEVICE
    res["copy_bandwidth_GBps"] = {"dram_512MiB": bw_dram / 1e9, "working_set": bw_ws / 1e9}
    res["sampler_Gaussians_per_s"] = {"torch": sampler_rate(s, p, "torch")}
    if native:
        res["sampler_Gaussians_per_s"]["native"] = sampler_rate(s, p, "native")
    res["sampler_Gaussians_per_s"]["numpy SFC64 (1 thread)"] = numpy_sampler_rate(s, p)

    # 1. the step path, end to end (fresh output), default noise backend
    kw = dict(steps=steps, lr=lr, seeds=s, noise=sigma, ckpt_every=every, device=DEVICE)
    stepped, t_step = _timed(lambda: simulate(q, **kw))
    n_ckpts, backend = int(stepped.n_ckpts), stepped.config["noise_backend"]
    del stepped
    rate = s * steps * p / t_step
    res["step_path"] = {
        "noise_backend": backend,
        "seconds": t_step,
        "updates_per_s": rate,
        "n_ckpts": n_ckpts,
        "bytes_per_update": BYTES_STEP if backend == "native" else BYTES_TORCH,
        "fraction_of_dram_bound": rate * BYTES_STEP / bw_dram,
        "fraction_of_working_set_bound": rate * BYTES_STEP / bw_ws,
    }

    # 2. exact fast path, same checkpoints: end to end, then both paths into one reused output buffer
    _, t_exact = _timed(lambda: simulate(q, exact=True, **kw))
    reuse = {"out": torch.zeros(s, n_ckpts, p, dtype=torch.float64, device=DEVICE)}  # mapped once
    _, t_step_out = _timed(lambda: simulate(q, **reuse, **kw))
    t_exact_out = min(_timed(lambda: simulate(q, exact=True, **reuse, **kw))[1] for _ in range(args.repeats))
    reuse.clear()
    attainable = None
    if backend == "native":
        # What the ratio can be at best, counting kernel time only: stepping costs T steps plus J stores
        # of a checkpoint (w each, w = jump − step); the exact path costs J jumps, each one step's work
        # plus its store.
        kc = kernel_costs(s, p)
        jumps = n_ckpts - 1
        k, kj = kc["step_s"], kc["jump_s"]
        attainable = {**kc, "speedup": (steps * k + jumps * max(kj - k, 0.0)) / (jumps * kj)}
    res["exact_path"] = {
        "n_ckpts": n_ckpts,
        "ckpt_every": every,
        "target_speedup": every,
        "fresh_output": {"exact_seconds": t_exact, "step_seconds": t_step, "speedup": t_step / t_exact},
        "reused_output": {
            "exact_seconds": t_exact_out,
            "exact_repeats": args.repeats,
            "step_seconds": t_step_out,
            "speedup": t_step_out / t_exact_out,
        },
        "attainable": attainable,
    }

    # 3. the step path with torch's sampler, fewer steps
    if args.torch_steps and backend == "native":
        ts = min(steps, args.torch_steps)
        _, t_torch = _timed(lambda: simulate(q, **{**kw, "steps": ts, "noise_backend": "torch"}))
        trate = s * ts * p / t_torch
        res["torch_sampler_step_path"] = {
            "steps": ts,
            "seconds": t_torch,
            "updates_per_s": trate,
            "fraction_of_dram_bound": trate * BYTES_STEP / bw_dram,
            "native_speedup": rate / trate,
        }

    # 4. noise-free: the update kernels alone (16 B per update: read θ, write θ)
    quiet = min(steps, args.noise_free_steps)
    _, t_quiet = _timed(lambda: simulate(q, steps=quiet, lr=lr, seeds=s, device=DEVICE))
    qrate = s * quiet * p / t_quiet
    res["noise_free_step_path"] = {
        "steps": quiet,
        "seconds": t_quiet,
        "updates_per_s": qrate,
        "fraction_of_dram_bound": qrate * 16 / bw_dram,
        "fraction_of_working_set_bound": qrate * 16 / bw_ws,
    }

    # 5. naive per-seed loop, extrapolated
    nrate = naive_rate(p, args.naive_seeds, args.naive_steps, lr, sigma)
    res["naive_loop"] = {
        "seeds_timed": args.naive_seeds,
        "steps_timed": args.naive_steps,
        "updates_per_s": nrate,
        "extrapolated_seconds": s * steps * p / nrate,
        "speedup_of_step_path": rate / nrate,
    }

    # 6. rotated quadratic: dense [p, p] Hessian matmul per step
    if args.rotated_steps:
        qr = _landscape(p, rotate=True).to(DEVICE, torch.float64)
        rs = args.rotated_steps
        _, t_rot = _timed(lambda: simulate(qr, steps=rs, lr=lr, seeds=s, noise=sigma, device=DEVICE))
        res["rotated_step_path"] = {
            "steps": rs,
            "seconds": t_rot,
            "updates_per_s": s * rs * p / t_rot,
            "gflops": 2 * s * p * p * rs / t_rot / 1e9,
        }
    return res


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _table(res: dict) -> str:
    c, bw = res["config"], res["copy_bandwidth_GBps"]
    sp, nf, nv, ex = res["step_path"], res["noise_free_step_path"], res["naive_loop"], res["exact_path"]
    smp = res["sampler_Gaussians_per_s"]
    fresh, reused = ex["fresh_output"], ex["reused_output"]
    rows = [
        (
            "config",
            f"S={c['seeds']} p={c['dim']} T={c['steps']} ckpt_every={c['ckpt_every']}, "
            f"device {c.get('device', 'cpu')}, {res['machine']['torch_threads']} torch thread(s)",
        ),
        ("native kernel", res["native_kernel"]),
        (
            "copy bandwidth, read+write",
            f"DRAM {bw['dram_512MiB']:.1f} GB/s; [S,p] working set {bw['working_set']:.1f} GB/s",
        ),
        (
            "Gaussian samplers alone",
            ", ".join(f"{k} {v / 1e6:.0f} M/s" for k, v in smp.items()),
        ),
        (
            "step path",
            f"{sp['updates_per_s'] / 1e6:.0f} M seed*step*coord/s ({sp['seconds']:.1f} s; "
            f"noise backend {sp['noise_backend']})",
        ),
        (
            f"  vs bound at {BYTES_STEP} B/update",
            f"DRAM {_pct(sp['fraction_of_dram_bound'])} (target >= 30%), working set "
            f"{_pct(sp['fraction_of_working_set_bound'])}",
        ),
    ]
    if "torch_sampler_step_path" in res:
        t = res["torch_sampler_step_path"]
        rows.append(
            (
                "  with torch's sampler",
                f"{t['updates_per_s'] / 1e6:.0f} M/s ({t['steps']} steps; DRAM "
                f"{_pct(t['fraction_of_dram_bound'])}); native kernel {t['native_speedup']:.1f}x faster",
            )
        )
    rows += [
        (
            "noise-free step path",
            f"{nf['updates_per_s'] / 1e6:.0f} M/s ({nf['steps']} steps); at 16 B/update: "
            f"DRAM {_pct(nf['fraction_of_dram_bound'])}, working set "
            f"{_pct(nf['fraction_of_working_set_bound'])}",
        ),
        (
            "naive per-seed loop",
            f"{nv['updates_per_s'] / 1e6:.1f} M/s (timed {nv['seeds_timed']} seeds x "
            f"{nv['steps_timed']} steps, extrapolated {nv['extrapolated_seconds']:.0f} s)",
        ),
        ("  step path / naive", f"{nv['speedup_of_step_path']:.1f}x"),
        (
            "exact fast path, reused out",
            f"{reused['exact_seconds']:.3f} s (best of {reused['exact_repeats']}) vs stepping "
            f"{reused['step_seconds']:.1f} s: {reused['speedup']:.0f}x (target >= s = {ex['ckpt_every']}; "
            f"{ex['n_ckpts']} checkpoints)",
        ),
        *(
            [
                (
                    "  attainable (kernel time only)",
                    f"step {1e3 * ex['attainable']['step_s']:.2f} ms, jump (step + store) "
                    f"{1e3 * ex['attainable']['jump_s']:.2f} ms per [S,p] update: at most "
                    f"{ex['attainable']['speedup']:.0f}x; reached "
                    f"{_pct(reused['speedup'] / ex['attainable']['speedup'])}",
                )
            ]
            if ex.get("attainable")
            else []
        ),
        (
            "exact fast path, fresh output",
            f"{fresh['exact_seconds']:.3f} s vs stepping {fresh['step_seconds']:.1f} s: "
            f"{fresh['speedup']:.0f}x (mapping {c['seeds'] * ex['n_ckpts'] * c['dim'] * 8 / 2**20:.0f} MiB "
            f"of new output: {fresh['exact_seconds'] - reused['exact_seconds']:.2f} s)",
        ),
    ]
    if "rotated_step_path" in res:
        r = res["rotated_step_path"]
        rows.append(
            (
                "rotated (matmul) step path",
                f"{r['updates_per_s'] / 1e6:.0f} M/s, {r['gflops']:.0f} GFLOP/s ({r['steps']} steps)",
            )
        )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", type=int, default=1024, help="S, seeds simulated at once (default 1024)")
    ap.add_argument("--dim", type=int, default=1024, help="p, parameters per seed (default 1024)")
    ap.add_argument("--steps", type=int, default=10_000, help="T, SGD steps (default 10^4)")
    ap.add_argument("--ckpt-every", type=int, default=100, help="checkpoint interval s (default 100)")
    ap.add_argument("--naive-seeds", type=int, default=4, help="seeds timed for the naive loop (default 4)")
    ap.add_argument(
        "--naive-steps", type=int, default=500, help="steps timed for the naive loop (default 500)"
    )
    ap.add_argument(
        "--torch-steps",
        type=int,
        default=2000,
        help="steps for the step path with torch's sampler, for comparison; 0 skips it (default 2000)",
    )
    ap.add_argument(
        "--repeats", type=int, default=5, help="timed runs of the exact path, best taken (default 5)"
    )
    ap.add_argument(
        "--noise-free-steps",
        type=int,
        default=2000,
        help="steps for the noise-free variant (no sampling: pure update bandwidth; default 2000)",
    )
    ap.add_argument(
        "--rotated-steps",
        type=int,
        default=100,
        help="steps for the rotated (matmul) variant; 0 skips it (default 100)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's choice), also the native kernel's threads; 1 is "
        "faster on a busy shared machine",
    )
    ap.add_argument("--device", default="cpu", help="torch device to simulate on (default cpu; e.g. cuda)")
    ap.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON ('-' for stdout)")
    args = ap.parse_args(argv)
    if args.steps % args.ckpt_every:
        ap.error("--steps must be a multiple of --ckpt-every")
    if args.threads:
        torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = args.device
    res = run(args)
    print(_table(res))
    if args.json == "-":
        print(json.dumps(res, indent=2))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
