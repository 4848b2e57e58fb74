"""Benchmark: `extramerge merge` on 1 process against N processes (torchrun, gloo, CPU).

    python benchmarks/bench_distributed.py                          # 8 x ~1 GB float32, 1 vs 2 processes
    python benchmarks/bench_distributed.py --size-mb 50 --repeats 2 # quick check (8 x 50 MB)
    python benchmarks/bench_distributed.py --dtype bfloat16 --workdir /fast/disk/bench

What is measured (each run a subprocess; best wall time of ``--repeats``; before every run ``sync``, every
input read once so the page cache is warm, the old output removed):

* ``one``: ``python -m extramerge merge CKPT... --method sma -o OUT.safetensors --quiet``;
* ``ranks``: the same under ``python -m torch.distributed.run --nproc-per-node N``;
* seconds, GB/s of input read, peak RSS (GNU time's %M: the largest single process; and each rank's own
  peak during the merge, from the summary rank 0 prints), the speed-up one / ranks;
* the I/O floor (bench_merge's: read every input from page cache into one buffer + write one file of the
  output's size + fsync), and whether one process is already at it (one ≤ 1.25 × floor): only then can N
  processes not help;
* ``--cold``: the same after ``echo 3 > /proc/sys/vm/drop_caches`` where this process may do so (root on
  the host, not in most containers); otherwise noted as not measured.
* ``--dcp``: the same model as torch.distributed.checkpoint folders (torch's dcp.save, made once and kept
  in ``--workdir``) as input, merged into the same .safetensors output, 1 and N processes.

The checkpoints are GPT-2-shaped (vocab 50257, learned positions, 4x MLP), θ_j = base + 10⁻³·j·drift +
2·10⁻⁴·noise_j, generated tensor by tensor from seeded generators (stable across runs) and kept in
``--workdir`` for reuse. Results: results/benchmarks/distributed.{txt,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import measure, read_floor, warm_cache, write_floor  # noqa: E402

from extramerge.io import TensorInfo  # noqa: E402
from extramerge.io.shards import safetensors_files  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GB = 10**9
MiB = 2**20
AT_FLOOR = 1.25  # one process within this factor of the I/O floor counts as "at the floor"


# ----------------------------------------------------------------------------------------------------
# Data


def gpt2_shapes(nbytes: int, itemsize: int) -> list[tuple[str, tuple[int, ...]]]:
    """GPT-2-shaped tensors (as transformers' GPT2LMHeadModel names them, lm_head tied) whose total is
    close to ``nbytes``: width 1024, 768 or 256 by size, as many layers as fit."""
    params = nbytes // itemsize
    d = 1024 if params >= 150e6 else 768 if params >= 40e6 else 256
    vocab, ctx = 50257, 1024
    per_layer = 12 * d * d + 13 * d
    embed = vocab * d + ctx * d
    if embed + per_layer > params:  # small sizes: a smaller vocabulary, as in a character-level model
        vocab = max(256, (params - per_layer - ctx * d) // d)
        embed = vocab * d + ctx * d
    layers = max(1, round((params - embed - 2 * d) / per_layer))
    specs = [("transformer.wte.weight", (vocab, d)), ("transformer.wpe.weight", (ctx, d))]
    for i in range(layers):
        h = f"transformer.h.{i}."
        specs += [
            (h + "ln_1.weight", (d,)),
            (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (d, 3 * d)),
            (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)),
            (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)),
            (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (d, 4 * d)),
            (h + "mlp.c_fc.bias", (4 * d,)),
            (h + "mlp.c_proj.weight", (4 * d, d)),
            (h + "mlp.c_proj.bias", (d,)),
        ]
    return specs + [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]


def _normal(shape, seed: int, tensor: int, stream: int) -> np.ndarray:
    return np.random.default_rng([seed, tensor, stream]).standard_normal(shape, dtype=np.float32)


def generate(workdir: Path, n: int, size_mb: int, dtype: str, seed: int = 0) -> list[Path]:
    """n safetensors files step_XXXXXX.safetensors in ``workdir`` (reused when present and complete)."""
    import ml_dtypes

    np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    code = "F32" if dtype == "float32" else "BF16"
    specs = gpt2_shapes(size_mb * 10**6, np.dtype(np_dtype).itemsize)
    infos = {name: TensorInfo(name, shape, code) for name, shape in specs}
    (layout,) = safetensors_files(infos, "x", shard_size=2**62, metadata=None, aliases={})
    folder = workdir / f"gpt2-{size_mb}MB-{dtype}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for j in range(n):
        path = folder / f"step_{1000 * (j + 1):06d}.safetensors"
        paths.append(path)
        if path.exists() and path.stat().st_size == layout.size:
            continue
        tmp = path.with_suffix(".part")
        with open(tmp, "wb") as f:
            f.write(layout.header)
            for t, (_, shape) in enumerate(specs):
                x = 0.02 * (_normal(shape, seed, t, 0) + 1e-3 * j * _normal(shape, seed, t, 1))
                x += 0.02 * 2e-4 * _normal(shape, seed, t, 2 + j)
                f.write(np.ascontiguousarray(x.astype(np_dtype)).tobytes())
        os.replace(tmp, path)
        print(f"  wrote {path} ({layout.size / GB:.2f} GB)", flush=True)
    return paths


# ----------------------------------------------------------------------------------------------------
# Runs


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def merge_cmd(ckpts: list[Path], out: Path, nproc: int) -> list[str]:
    tail = ["-m", "extramerge", "merge", *map(str, ckpts), "--method", "sma", "-o", str(out), "--quiet"]
    if nproc == 1:
        return [sys.executable, *tail]
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    return [*run, "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *tail]


def drop_caches() -> bool:
    """Drop the page cache (clean pages) where allowed; False where not (containers, non-root)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def rank_peaks(log: Path) -> list[int]:
    """Each rank's peak memory during the merge, from the summary's 'per rank' line (bytes)."""
    units = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    for line in Path(log).read_text().splitlines():
        if line.strip().startswith("per rank"):
            return [int(float(v) * units[u]) for v, u in re.findall(r"([\d.]+) (B|KiB|MiB|GiB|TiB)", line)]
    return []


def merge_seconds(log: Path) -> float | None:
    """The merge's own time from the summary rank 0 prints (open to publish; without interpreter start-up,
    imports and the process group's rendezvous)."""
    for line in Path(log).read_text().splitlines():
        m = re.match(r"\s*time\s+([\d.]+)s", line)
        if m:
            return float(m.group(1))
    return None


def timed(name: str, ckpts, out: Path, nproc: int, repeats: int, logs: Path, cold: bool, buf) -> dict:
    best = None
    for r in range(repeats):
        out.unlink(missing_ok=True)
        out.with_name(out.stem + ".merge.json").unlink(missing_ok=True)
        if cold:
            drop_caches()
        else:
            os.sync()
            warm_cache([f for p in ckpts for f in (sorted(p.iterdir()) if p.is_dir() else [p])], buf)
        run = measure(f"{name}-{r}", merge_cmd(ckpts, out, nproc), logs / f"{name}-{r}.log")
        if run.returncode != 0:
            raise SystemExit(f"{name} failed (exit {run.returncode}); see {run.log}")
        row = {"seconds": run.wall_s, "peak_rss_bytes": run.peak_rss_bytes, "log": run.log}
        row["rank_peak_rss_bytes"] = rank_peaks(Path(run.log)) if nproc > 1 else [run.peak_rss_bytes]
        row["merge_seconds"] = merge_seconds(Path(run.log))
        print(f"  {name} run {r + 1}/{repeats}: {run.wall_s:.2f} s", flush=True)
        if best is None or row["seconds"] < best["seconds"]:
            best = row
    return best


def dcp_inputs(paths: list[Path], workdir: Path) -> list[Path]:
    """The same checkpoints as torch.distributed.checkpoint folders (torch's own ``dcp.save``, one process:
    one chunk a tensor, one ``__0_0.distcp``), made once and cached in ``workdir/dcp/``."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    out = []
    for p in paths:
        folder = workdir / "dcp" / p.stem
        if not (folder / ".metadata").is_file():
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
                dcp.save(load_file(p), checkpoint_id=str(tmp), no_dist=True)
            tmp.rename(folder)
        out.append(folder)
    return out


# ----------------------------------------------------------------------------------------------------
# Report


def report(res: dict) -> str:
    fmt = lambda b: f"{b / GB:.2f} GB"  # noqa: E731
    lines = [
        f"extramerge merge: 1 process vs {res['nproc']} processes (torchrun, gloo) — "
        f"{res['n']} x {res['checkpoint_bytes'] / GB:.2f} GB {res['dtype']} safetensors, method sma",
        f"machine: {res['machine']}",
        f"command: {res['command']}",
        "",
        f"{'run':<22} {'seconds':>8} {'merge s':>8} {'GB/s read':>10} {'peak RSS':>10}  per-rank peak RSS",
    ]
    for key in ("one", "ranks", "one_cold", "ranks_cold", "dcp_one", "dcp_ranks"):
        row = res.get(key)
        if not row:
            continue
        per = ", ".join(fmt(x) for x in row["rank_peak_rss_bytes"])
        gbs = res["bytes_read"] / row["seconds"] / GB
        ms = row.get("merge_seconds")
        ms = f"{ms:>8.2f}" if ms is not None else f"{'-':>8}"
        lines.append(
            f"{key:<22} {row['seconds']:>8.2f} {ms} {gbs:>10.2f} {fmt(row['peak_rss_bytes']):>10}  {per}"
        )
    lines += [
        "",
        f"speed-up {res['nproc']} processes / 1: {res['speedup']:.2f}x wall time (warm page cache); "
        f"{res['merge_speedup']} in the merge's own time (the summary's, without start-up)",
        f"I/O floor (read {res['read_floor_s']:.2f} s + write+fsync {res['write_floor_s']:.2f} s): "
        f"{res['floor_s']:.2f} s; 1 process at {res['one_over_floor']:.2f}x the floor "
        f"({'at' if res['at_floor'] else 'not at'} the I/O floor, threshold {AT_FLOOR}x)",
        f"read floor bandwidth {res['bytes_read'] / res['read_floor_s'] / GB:.2f} GB/s; "
        f"1 process reads at {res['bytes_read'] / res['one']['seconds'] / GB:.2f} GB/s",
        f"cold cache: {res['cold']}",
        f"DCP input: {res['dcp']}",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / ".bench" / "distributed", help="data and outputs")
    ap.add_argument("--n", type=int, default=8, help="checkpoints (default 8)")
    ap.add_argument("--size-mb", type=int, default=1000, help="MB per checkpoint (default 1000)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--nproc", type=int, default=2, help="processes of the distributed run (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each; the best wall time counts")
    ap.add_argument("--cold", action="store_true", help="also time after dropping the page cache")
    ap.add_argument("--dcp", action="store_true", help="also time DCP input of the same model")
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "benchmarks" / "distributed")
    args = ap.parse_args()

    print(f"data: {args.n} x {args.size_mb} MB {args.dtype} in {args.workdir}", flush=True)
    ckpts = generate(args.workdir, args.n, args.size_mb, args.dtype)
    out = args.workdir / "merged.safetensors"
    logs = args.workdir / "logs"
    buf = bytearray(16 * MiB)
    nbytes = sum(p.stat().st_size for p in ckpts)
    res: dict = {
        "n": args.n,
        "dtype": args.dtype,
        "nproc": args.nproc,
        "checkpoint_bytes": ckpts[0].stat().st_size,
        "bytes_read": nbytes,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "command": "python benchmarks/bench_distributed.py " + " ".join(sys.argv[1:]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    res["one"] = timed("one", ckpts, out, 1, args.repeats, logs, False, buf)
    res["ranks"] = timed(f"ranks{args.nproc}", ckpts, out, args.nproc, args.repeats, logs, False, buf)
    warm_cache(ckpts, buf)
    res["read_floor_s"] = min(read_floor(ckpts, buf) for _ in range(max(1, args.repeats)))
    res["write_floor_s"] = write_floor(args.workdir / "floor.bin", out.stat().st_size, buf, fsync=True)
    res["floor_s"] = res["read_floor_s"] + res["write_floor_s"]
    res["speedup"] = res["one"]["seconds"] / res["ranks"]["seconds"]
    m1, mn = res["one"].get("merge_seconds"), res["ranks"].get("merge_seconds")
    res["merge_speedup"] = f"{m1 / mn:.2f}x" if m1 and mn else "not parsed"
    res["one_over_floor"] = res["one"]["seconds"] / res["floor_s"]
    res["at_floor"] = res["one_over_floor"] <= AT_FLOOR
    res["cold"] = "not measured (pass --cold)"
    if args.cold:
        if drop_caches():
            res["one_cold"] = timed("one-cold", ckpts, out, 1, args.repeats, logs, True, buf)
            res["ranks_cold"] = timed("ranks-cold", ckpts, out, args.nproc, args.repeats, logs, True, buf)
            res["cold"] = "measured after dropping the page cache before each run"
        else:
            res["cold"] = "not measured: this process may not drop the page cache (/proc/sys/vm/drop_caches)"
    res["dcp"] = "not measured (pass --dcp)"
    if args.dcp:
        dcp = dcp_inputs(ckpts, args.workdir)
        if dcp is None:
            res["dcp"] = "not measured: DCP inputs are not generated yet (bench_distributed.dcp_inputs)"
        else:
            res["dcp_one"] = timed("dcp-one", dcp, out, 1, args.repeats, logs, False, buf)
            res["dcp_ranks"] = timed("dcp-ranks", dcp, out, args.nproc, args.repeats, logs, False, buf)
            res["dcp"] = (
                f"DCP / safetensors (1 process): {res['dcp_one']['seconds'] / res['one']['seconds']:.2f}x"
            )
    text = report(res)
    print("\n" + text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.with_suffix(".txt").write_text(text)
    args.results.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.results.with_suffix('.txt')} and .json")


if __name__ == "__main__":
    main()
