"""Speed of the batched river-valley simulator (rivervalley.simulate) on CPU (or a GPU with --device cuda).

    python -m benchmarks.bench_simulator                   # full size: S=1024 seeds, p=1024, T=10^4 steps
    python -m benchmarks.bench_simulator --steps 1000      # quick run
    python -m benchmarks.bench_simulator --json out.json   # also write the numbers (``--json -``: stdout)
    python -m benchmarks.bench_simulator --threads 1       # one torch thread (best on a busy machine)
    python -m benchmarks.bench_simulator --device cuda     # the same measurements on a GPU

Measures, for plain SGD on the quadratic river valley in its eigenbasis (additive noise σ = 1):

1. the step path: seed·step·coordinate updates per second;
2. a naive baseline that loops over seeds in Python (one [p] vector per seed, the same math), timed on a
   few seeds × fewer steps and extrapolated linearly to S × T;
3. a memory-bandwidth bound: copy bandwidth (bytes read + written per second of a torch copy, both of a
   512 MiB buffer = DRAM and of one [S, p] buffer = the working set, which may sit in cache) divided by
   the bytes a step must move per seed·coordinate — read θ (8 B), write θ (8 B), write and read one
   float32 Gaussian (4 + 4 B): 24 B. Our kernels actually move 56 B (θ ← θ⊙(1 − ηh): 16 B; randn: 4 B;
   float32 -> float64: 12 B; θ += a·ξ: 24 B), reported too. Also the bound set by the Gaussian sampler alone;
4. the exact fast path (closed-form AR(1) jumps between checkpoints) against stepping, same checkpoints:
   end to end, and its jump loop alone with the output memory touched beforehand (storing N checkpoints
   of [S, p] costs about as much as N steps, so end to end the exact path cannot reach a speedup of s);
5. the noise-free step path (no sampler; bound: read + write θ, 16 B), showing the update kernels
   themselves against the bandwidth bound;
6. optionally the rotated quadratic (dense Hessian: one [S, p] × [p, p] matmul per step), fewer steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from rivervalley._compute import flush_denormals
from rivervalley.landscapes import QuadraticRiverValley
from rivervalley.simulate import _NoiseSource, _run_exact, checkpoint_steps, simulate

BYTES_MIN = 24  # read θ 8 + write θ 8 + write ξ 4 + read ξ 4 (float64 θ, float32 noise)
BYTES_KERNELS = 56  # mul_ 16 + randn 4 + float32->float64 12 + add_(ξ) 24


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


def sampler_rate(s: int, p: int, repeats: int = 20) -> float:
    """Gaussians per second of the simulator's noise source for [S, p]: float32 draws converted to float64."""
    src = _NoiseSource((s, p), 0, torch.float32, DEVICE, out_dtype=torch.float64)
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


def exact_dynamics_seconds(q, lr: float, sigma: float, s: int, steps: int, every: int) -> float:
    """Time of the exact path's jumps alone: the simulator's own jump loop (``_run_exact``) writing into a
    checkpoint tensor whose pages were touched beforehand, so that first-touch page faults of the output
    (paid equally by both paths, and dominating the exact path's end-to-end time) are left out."""
    _, ckpts = checkpoint_steps(steps, ckpt_every=every)
    out = torch.zeros(s, len(ckpts), q.dim, dtype=torch.float64, device=DEVICE)
    theta = torch.zeros(s, q.dim, dtype=torch.float64, device=DEVICE)
    src = _NoiseSource((s, q.dim), 0, torch.float32, DEVICE, out_dtype=torch.float64)
    src.draw()
    try:
        with flush_denormals(), torch.no_grad():
            _sync()
            t0 = time.perf_counter()
            _run_exact(q, theta, lr, steps, ckpts, out, q.noise_std(sigma), src)
            _sync()
            return time.perf_counter() - t0
    finally:
        src.close()


def naive_rate(p: int, seeds: int, steps: int, lr: float, sigma: float) -> float:
    """Updates per second of a per-seed Python loop: for each seed, for each step, g = hθ − c·e_0 + σξ
    and θ ← θ − ηg on a [p] vector."""
    q = _landscape(p).to(DEVICE, torch.float64)
    h = q._h
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
            "sampler_threads": min(4, os.cpu_count() or 1),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name(DEVICE) if DEVICE != "cpu" else None,
            "note": "shared machine: other jobs may have run concurrently",
        },
    }
    bw_dram = copy_bandwidth(512 * 2**20)
    bw_ws = copy_bandwidth(s * p * 8)
    rng = sampler_rate(s, p)
    res["copy_bandwidth_GBps"] = {"dram_512MiB": bw_dram / 1e9, "working_set": bw_ws / 1e9}
    res["sampler_Gaussians_per_s"] = rng

    # 1. the step path (noise), with the checkpoints of the exact-path comparison
    kw = dict(steps=steps, lr=lr, seeds=s, noise=sigma, ckpt_every=every, device=DEVICE)
    stepped, t_step = _timed(lambda: simulate(q, **kw))
    n_ckpts = int(stepped.n_ckpts)
    del stepped
    rate = s * steps * p / t_step
    res["step_path"] = {
        "seconds": t_step,
        "updates_per_s": rate,
        "n_ckpts": n_ckpts,
        "fraction_of_dram_bound": rate * BYTES_MIN / bw_dram,
        "fraction_of_working_set_bound": rate * BYTES_MIN / bw_ws,
        "fraction_of_dram_bound_kernel_bytes": rate * BYTES_KERNELS / bw_dram,
        "fraction_of_sampler_bound": rate / rng,
    }

    # 2. noise-free: the update kernels alone (16 B per update: read θ, write θ)
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

    # 3. naive per-seed loop, extrapolated
    nrate = naive_rate(p, args.naive_seeds, args.naive_steps, lr, sigma)
    res["naive_loop"] = {
        "seeds_timed": args.naive_seeds,
        "steps_timed": args.naive_steps,
        "updates_per_s": nrate,
        "extrapolated_seconds": s * steps * p / nrate,
        "speedup_of_step_path": rate / nrate,
    }

    # 4. exact fast path, same checkpoints: end to end, and its jumps alone (output memory pre-touched)
    _, t_exact = _timed(lambda: simulate(q, exact=True, **kw))
    t_jumps = exact_dynamics_seconds(q, lr, sigma, s, steps, every)
    res["exact_path"] = {
        "seconds": t_exact,
        "n_ckpts": n_ckpts,
        "ckpt_every": every,
        "speedup_end_to_end": t_step / t_exact,
        "jumps_seconds": t_jumps,
        "speedup_jumps_only": t_step / t_jumps,
        "target_speedup": every,
    }

    # 5. rotated quadratic: dense [p, p] Hessian matmul per step
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
    rows = [
        (
            "config",
            f"S={c['seeds']} p={c['dim']} T={c['steps']} ckpt_every={c['ckpt_every']}, "
            f"device {c.get('device', 'cpu')}, {res['machine']['torch_threads']} torch thread(s), "
            f"{res['machine']['sampler_threads']} sampler threads",
        ),
        (
            "copy bandwidth, read+write",
            f"DRAM {bw['dram_512MiB']:.1f} GB/s; [S,p] working set {bw['working_set']:.1f} GB/s",
        ),
        ("Gaussian sampler alone", f"{res['sampler_Gaussians_per_s'] / 1e6:.0f} M/s"),
        ("step path", f"{sp['updates_per_s'] / 1e6:.0f} M seed*step*coord/s ({sp['seconds']:.1f} s)"),
        (
            "  vs bound at 24 B/update",
            f"DRAM {_pct(sp['fraction_of_dram_bound'])}, working set "
            f"{_pct(sp['fraction_of_working_set_bound'])} "
            f"(DRAM at our 56 B: {_pct(sp['fraction_of_dram_bound_kernel_bytes'])})",
        ),
        ("  vs sampler bound", _pct(sp["fraction_of_sampler_bound"])),
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
            "exact fast path",
            f"{ex['seconds']:.2f} s end to end: {ex['speedup_end_to_end']:.0f}x; jumps alone "
            f"{ex['jumps_seconds']:.2f} s: {ex['speedup_jumps_only']:.0f}x "
            f"(target >= s = {ex['ckpt_every']}; {ex['n_ckpts']} checkpoints stored)",
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
        help="torch intra-op threads (default: torch's choice); 1 is faster on a busy shared machine. The "
        "Gaussian sampler fills its 4 streams from its own threads, one per core",
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
