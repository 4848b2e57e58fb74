"""Benchmark: streaming `extramerge merge --method sma` vs mergekit `linear` vs a naive script.

    bash benchmarks/setup_mergekit.sh                        # once: mergekit into .bench/mergekit-venv
    python benchmarks/bench_merge.py --json .bench/bench.json           # full: N=8 x ~250M fp32 (~1 GB each)
    python benchmarks/bench_merge.py --quick                            # smoke test: ~20M params
    python benchmarks/bench_merge.py --scaling --skip-mergekit          # add the N = 2, 4, 8, 16 series

What is measured (each contender is a subprocess; wall time with perf_counter; peak RSS from GNU time's
%M, i.e. the kernel's high-water mark of resident memory, which counts touched mmap'd file pages; the
sampled split into anonymous and file-backed RSS is reported next to it):

* The checkpoints are a LLaMA-shaped model (transformers ``LlamaConfig``, untied lm_head) in HF folder
  format (``config.json`` + ``model.safetensors``), generated here tensor by tensor with seeded generators
  (θ_j = base + drift·j + noise_j) and cached under ``.bench/data``.
* Before every timed run: ``sync`` (so earlier output is not being written back), every input file is read
  once (page cache warm; residency is checked with ``fincore`` and reported) and the old output removed.
* I/O floor of a merge = read every input file from page cache into one reusable buffer with ``readinto``
  + write one file of the output's size with plain ``write`` calls + ``fsync``. The fsync is included
  because extramerge fsyncs its output; mergekit and the naive script do not, so the floor is the stricter
  (larger) one only for them. ``floor_nofsync`` is reported too.
* Read floor (for ``analyze``) = the read half of the above.
* Correctness: max |ours − mergekit| and max |ours − naive| over every tensor (target ≤ 1e-6).
* Scaling: ours at N = 2, 4, 8, 16; least-squares line t = a + b·N, R², seconds per checkpoint. When
  16 checkpoints would not fit comfortably in page cache (> 50 % of MemAvailable) the series uses a
  smaller model (``--scaling-params``), which the report states.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
MERGEKIT_YAML = BENCH / "mergekit-venv" / "bin" / "mergekit-yaml"
GB = 10**9
MiB = 2**20

# Targets from the issue.
T_SPEEDUP_VS_MERGEKIT = 2.0
T_RSS_FRACTION_OF_MERGEKIT = 0.25
T_RSS_ABS = 1 * GB
T_MERGE_OVER_FLOOR = 1.5
T_ANALYZE_OVER_READ_FLOOR = 1.5  # issue 24 item 6
T_MAX_ABS_DIFF = 1e-6
T_SCALING_R2 = 0.99
T_READ_PASSES = 1.1  # "one read pass": bytes touched / input bytes


# ----------------------------------------------------------------------------------------------------
# Checkpoint generation


def parse_count(text: str) -> int:
    """'250M' -> 250_000_000; accepts K, M, G suffixes."""
    text = text.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}.get(text[-1:], 1)
    return int(float(text[:-1] if mult != 1 else text) * mult)


def llama_config(params: int):
    """A LLaMA-shaped config whose parameter count is close to `params` (vocab 32000, untied head)."""
    from transformers import LlamaConfig

    vocab = 32000
    hidden = 1024 if params >= 150e6 else 512 if params >= 50e6 else 256
    inter = 256 * math.ceil(8 / 3 * hidden / 256)
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - 2 * vocab * hidden - hidden) / per_layer))
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        torch_dtype="float32",
    )


def tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every weight, in the model's state_dict order, without allocating it."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _safetensors_header(specs: list[tuple[str, tuple[int, ...]]]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in specs:
        nbytes = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob


def _randn(shape, seed: int, tensor: int, stream: int) -> torch.Tensor:
    """Standard normals from a generator seeded by (seed, tensor index, stream); stable across runs."""
    key = (seed * 1_000_003 + tensor) * 10_007 + stream
    return torch.randn(shape, generator=torch.Generator().manual_seed(key))


def generate_checkpoints(root: Path, params: int, n: int, seed: int = 0) -> list[Path]:
    """Write (or reuse) checkpoints root/ckpt-00 .. ckpt-{n-1}; θ_j = base + 1e-3·j·d + 2e-4·ε_j (× scale).

    Checkpoint j depends only on (seed, tensor index, j), so a larger N extends a cached set. All missing
    checkpoints are written in one streaming pass holding a few tensors in memory.
    """
    config = llama_config(params)
    specs = tensor_specs(config)
    dirs = [root / f"ckpt-{j:02d}" for j in range(n)]
    missing = [j for j, d in enumerate(dirs) if not (d / "model.safetensors").exists()]
    if not missing:
        return dirs
    total = sum(math.prod(s) for _, s in specs)
    print(f"generating {len(missing)} checkpoint(s) of {total / 1e6:.1f}M params under {root}", flush=True)
    header = _safetensors_header(specs)
    files = {}
    for j in missing:
        dirs[j].mkdir(parents=True, exist_ok=True)
        config.save_pretrained(dirs[j])
        files[j] = open(dirs[j] / "model.safetensors.tmp", "wb")
        files[j].write(header)
    t0 = time.perf_counter()
    for i, (_name, shape) in enumerate(specs):
        is_norm = len(shape) == 1
        scale = 0.02 if not is_norm else 0.01
        base = torch.ones(shape) if is_norm else scale * _randn(shape, seed, i, 0)
        drift = scale * _randn(shape, seed, i, 1)
        for j in missing:
            noise = _randn(shape, seed, i, 2 + j)
            theta = base + (1e-3 * j) * drift + (2e-4 * scale) * noise
            files[j].write(memoryview(theta.numpy()).cast("B"))
    for j, f in files.items():
        f.close()
        os.replace(dirs[j] / "model.safetensors.tmp", dirs[j] / "model.safetensors")
    print(f"  done in {time.perf_counter() - t0:.1f}s", flush=True)
    return dirs


# ----------------------------------------------------------------------------------------------------
# Measuring processes and the I/O floor


@dataclass
class Run:
    name: str
    cmd: list[str]
    wall_s: float = float("nan")
    peak_rss_bytes: int = 0
    peak_rss_anon_bytes: int = 0  # sampled every ~5 ms from /proc/PID/status
    peak_rss_file_bytes: int = 0
    user_s: float = 0.0
    sys_s: float = 0.0
    minor_faults: int = 0
    read_bytes_syscall: int = 0  # /proc/PID/io rchar: bytes read via read()-like calls (not mmap)
    write_bytes_syscall: int = 0
    returncode: int = 0
    input_cache_residency: float = float("nan")
    log: str = ""
    extra: dict = field(default_factory=dict)


def _proc_kb(status: str, key: str) -> int:
    for line in status.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _proc_io(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return {}
    return {k: int(v) for k, v in (line.split(": ") for line in text.splitlines())}


def _child_pid(pid: int) -> int | None:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


def measure(name: str, cmd: list[str], log_path: Path, env: dict | None = None) -> Run:
    """Run cmd to completion: wall time, peak RSS, sampled anon/file RSS, bytes read.

    Peak RSS comes from GNU time (``%M``), which forks the command from its own small process. Taking
    ru_maxrss from wait4 on a child of this (large) Python process would be wrong: Linux carries the
    pre-exec high-water mark across exec, so every child would report at least this process's RSS.
    Without /usr/bin/time the last sampled VmHWM (a per-address-space peak) is used instead.
    """
    run = Run(name=name, cmd=[str(c) for c in cmd], log=str(log_path))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    gnu_time = shutil.which("time") and Path("/usr/bin/time").exists()
    tfile = log_path.with_suffix(".time")
    argv = ["/usr/bin/time", "-f", "%M %U %S %R %x", "-o", str(tfile), *run.cmd] if gnu_time else run.cmd
    peaks = {"anon": 0, "file": 0, "hwm": 0}
    io_last: dict[str, int] = {}
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)

        def sample() -> None:
            target = None if gnu_time else proc.pid
            while not done.is_set():
                target = target or _child_pid(proc.pid)
                if target is not None:
                    try:
                        status = Path(f"/proc/{target}/status").read_text()
                    except OSError:
                        break
                    peaks["anon"] = max(peaks["anon"], _proc_kb(status, "RssAnon"))
                    peaks["file"] = max(
                        peaks["file"], _proc_kb(status, "RssFile") + _proc_kb(status, "RssShmem")
                    )
                    peaks["hwm"] = max(peaks["hwm"], _proc_kb(status, "VmHWM"))
                    io_last.update(_proc_io(target))
                time.sleep(0.005)

        done = threading.Event()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, ru = os.wait4(proc.pid, 0)  # the sampler must not reap (no proc.poll() there)
        run.wall_s = time.perf_counter() - t0
        done.set()
        proc.returncode = run.returncode = os.waitstatus_to_exitcode(status)
        sampler.join()
    if gnu_time and tfile.exists():
        fields = tfile.read_text().split()[-5:]
        maxrss_kb, user, sys_, minflt, rc = fields
        run.peak_rss_bytes = int(maxrss_kb) * 1024
        run.user_s, run.sys_s, run.minor_faults = float(user), float(sys_), int(minflt)
        run.returncode = int(rc)
    else:
        run.peak_rss_bytes = peaks["hwm"]
        run.user_s, run.sys_s, run.minor_faults = ru.ru_utime, ru.ru_stime, ru.ru_minflt
    run.extra["sampled_vmhwm_bytes"] = peaks["hwm"]
    run.peak_rss_anon_bytes, run.peak_rss_file_bytes = peaks["anon"], peaks["file"]
    # Last sample (<= 5 ms before exit): misses at most a few MB of reads at page-cache speed.
    run.read_bytes_syscall = io_last.get("rchar", 0)
    run.write_bytes_syscall = io_last.get("wchar", 0)
    if run.returncode != 0:
        tail = Path(log_path).read_text()[-3000:]
        print(f"  !! {name} exited with {run.returncode}; log {log_path}:\n{tail}", flush=True)
    return run


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint given as a file or an HF folder."""
    path = Path(path)
    return [path] if path.is_file() else sorted(path.glob("*.safetensors"))


def input_files(ckpts: list[Path]) -> list[Path]:
    return [f for c in ckpts for f in checkpoint_files(c)]


def warm_cache(files: list[Path], buf: bytearray) -> float:
    """Read every file once (populates page cache); return seconds."""
    t0 = time.perf_counter()
    view = memoryview(buf)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    return time.perf_counter() - t0


def cache_residency(files: list[Path]) -> float:
    """Fraction of the files' bytes resident in page cache (util-linux fincore), NaN if unavailable."""
    if not shutil.which("fincore"):
        return float("nan")
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *map(str, files)],
        capture_output=True,
        text=True,
    )
    res = size = 0
    for line in out.stdout.split("\n"):
        if line.strip():
            r, s = line.split()
            res, size = res + int(r), size + int(s)
    return res / size if size else float("nan")


def read_floor(files: list[Path], buf: bytearray) -> float:
    """Seconds to read every file from page cache into one reusable buffer."""
    return warm_cache(files, buf)


def write_floor(path: Path, nbytes: int, buf: bytearray, fsync: bool) -> float:
    """Seconds to write nbytes with plain write() calls (+ fsync) to a new file."""
    view = memoryview(buf)
    os.sync()
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        left = nbytes
        while left:
            left -= fh.write(view[: min(left, len(view))])
        if fsync:
            os.fsync(fh.fileno())
    dt = time.perf_counter() - t0
    path.unlink()
    os.sync()
    return dt


# ----------------------------------------------------------------------------------------------------
# Contenders


def extramerge_available() -> tuple[bool, str]:
    out = subprocess.run([sys.executable, "-m", "extramerge.cli", "--help"], capture_output=True, text=True)
    lines = (out.stderr or out.stdout).strip().splitlines()
    return out.returncode == 0, lines[-1] if lines else ""


def ours_merge_cmd(ckpts: list[Path], out: Path) -> list:
    return [
        sys.executable,
        "-m",
        "extramerge.cli",
        "merge",
        *ckpts,
        "--method",
        "sma",
        "--window",
        str(len(ckpts)),
        "-o",
        out,
        "--quiet",
    ]


def ours_analyze_cmd(ckpts: list[Path], out: Path) -> list:
    return [sys.executable, "-m", "extramerge.cli", "analyze", *ckpts, "-o", out, "--quiet"]


def mergekit_cmd(ckpts: list[Path], out: Path, workdir: Path) -> list:
    """mergekit-yaml with a `linear` merge, equal weights, float32 math and output, CPU."""
    cfg = workdir / f"mergekit-linear-n{len(ckpts)}.yml"
    lines = [
        "merge_method: linear",
        "dtype: float32",
        "out_dtype: float32",
        "parameters:",
        "  normalize: true",
        "models:",
    ]
    for c in ckpts:
        lines += [f"  - model: {c}", "    parameters:", "      weight: 1.0"]
    cfg.write_text("\n".join(lines) + "\n")
    return [MERGEKIT_YAML, cfg, out, "--no-cuda", "--lazy-unpickle", "--no-copy-tokenizer", "--quiet"]


def naive_cmd(ckpts: list[Path], out: Path) -> list:
    return [sys.executable, ROOT / "benchmarks" / "naive_merge.py", "-o", out, *ckpts]


def max_abs_diff(a: Path, b: Path) -> tuple[float, list[str]]:
    """max |a − b| over all tensors of two checkpoints; also the names present in only one."""
    from safetensors import safe_open

    def index(path):
        idx = {}
        for f in checkpoint_files(path):
            with safe_open(f, framework="pt") as st:
                for k in st.keys():
                    idx[k] = f
        return idx

    ia, ib = index(a), index(b)
    only = sorted(set(ia) ^ set(ib))
    worst = 0.0
    for k in sorted(set(ia) & set(ib)):
        with safe_open(ia[k], framework="pt") as sa, safe_open(ib[k], framework="pt") as sb:
            ta, tb = sa.get_tensor(k), sb.get_tensor(k)
        if ta.shape != tb.shape:
            return float("inf"), only + [f"{k}: shape {tuple(ta.shape)} vs {tuple(tb.shape)}"]
        worst = max(worst, (ta.double() - tb.double()).abs().max().item())
    return worst, only


# ----------------------------------------------------------------------------------------------------
# Orchestration


def meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, v = line.split(":")
        out[k] = int(v.split()[0]) * 1024
    return out


def fits_in_cache(nbytes: int) -> bool:
    return nbytes <= 0.5 * meminfo()["MemAvailable"]


class Bench:
    def __init__(self, args):
        self.args = args
        self.buf = bytearray(16 * MiB)
        self.logs = BENCH / "logs"
        self.outs = BENCH / "out"
        self.outs.mkdir(parents=True, exist_ok=True)
        self.results: dict = {"runs": {}, "checks": [], "env": self.environment()}

    def environment(self) -> dict:
        mi = meminfo()
        return {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "machine": platform.platform(),
            "mem_total_bytes": mi["MemTotal"],
            "mem_available_bytes_at_start": mi["MemAvailable"],
            "loadavg_at_start": os.getloadavg(),
        }

    def timed(self, key: str, name: str, cmd: list, inputs: list[Path], out: Path, env=None) -> Run:
        """One measured run (best wall of --repeats; peak RSS is the max over repeats)."""
        best = None
        for r in range(self.args.repeats):
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            os.sync()
            warm_cache(inputs, self.buf)
            residency = cache_residency(inputs)
            run = measure(name, cmd, self.logs / f"{key}-r{r}.log", env=env)
            run.input_cache_residency = residency
            run.extra["loadavg_1min_after"] = os.getloadavg()[0]
            if best is None or run.wall_s < best.wall_s:
                rss = max(run.peak_rss_bytes, best.peak_rss_bytes if best else 0)
                best, best.peak_rss_bytes = run, rss
            else:
                best.peak_rss_bytes = max(best.peak_rss_bytes, run.peak_rss_bytes)
        print(
            f"  {name:<28} {best.wall_s:8.2f} s (CPU {best.user_s + best.sys_s:.2f} s)"
            f"   peak RSS {best.peak_rss_bytes / MiB:8.0f} MiB"
            f"   (anon≤{best.peak_rss_anon_bytes / MiB:.0f}, file≤{best.peak_rss_file_bytes / MiB:.0f} MiB;"
            f" inputs {100 * best.input_cache_residency:.0f}% cached; rc={best.returncode})",
            flush=True,
        )
        self.results["runs"][key] = asdict(best)
        return best

    def floors(self, inputs: list[Path], out_bytes: int, key: str) -> dict:
        reps = max(3, self.args.repeats)
        warm_cache(inputs, self.buf)
        rd = min(read_floor(inputs, self.buf) for _ in range(reps))
        tmp = BENCH / "floor-write.bin"
        wr = min(write_floor(tmp, out_bytes, self.buf, fsync=True) for _ in range(reps))
        wr_nf = min(write_floor(tmp, out_bytes, self.buf, fsync=False) for _ in range(reps))
        in_bytes = sum(f.stat().st_size for f in inputs)
        fl = {
            "input_bytes": in_bytes,
            "output_bytes": out_bytes,
            "read_s": rd,
            "write_fsync_s": wr,
            "write_nofsync_s": wr_nf,
            "floor_s": rd + wr,
            "floor_nofsync_s": rd + wr_nf,
            "read_GBps": in_bytes / rd / GB,
            "write_fsync_GBps": out_bytes / wr / GB,
        }
        print(
            f"  I/O floor: read {in_bytes / GB:.2f} GB in {rd:.2f} s ({fl['read_GBps']:.1f} GB/s)"
            f" + write {out_bytes / GB:.2f} GB in {wr:.2f} s with fsync ({wr_nf:.2f} s without)"
            f" = {fl['floor_s']:.2f} s",
            flush=True,
        )
        self.results.setdefault("floors", {})[key] = fl
        return fl

    def check(self, what: str, value, target: str, ok: bool | None, note: str = "") -> None:
        self.results["checks"].append(
            {
                "check": what,
                "value": value,
                "target": target,
                "status": "SKIP" if ok is None else "PASS" if ok else "FAIL",
                "note": note,
            }
        )

    def run(self) -> None:
        a = self.args
        have_ours, why = extramerge_available()
        have_mk = MERGEKIT_YAML.exists() and not a.skip_mergekit
        self.results["env"]["extramerge_available"] = have_ours
        if not have_ours:
            print(f"extramerge CLI not available ({why.strip()}); measuring the other contenders only")
        if not MERGEKIT_YAML.exists() and not a.skip_mergekit:
            print("mergekit not installed: run `bash benchmarks/setup_mergekit.sh` (skipping mergekit)")
        if have_mk:
            mkv = subprocess.run(
                [
                    str(MERGEKIT_YAML.parent / "python"),
                    "-c",
                    "import importlib.metadata as m; print(m.version('mergekit'))",
                ],
                capture_output=True,
                text=True,
            ).stdout.strip()
            self.results["env"]["mergekit_version"] = mkv

        params = parse_count(a.params)
        data = BENCH / "data" / f"llama-{a.params.upper()}-seed{a.seed}"
        ckpts = generate_checkpoints(data, params, a.n, seed=a.seed)
        inputs = input_files(ckpts)
        ckpt_bytes = inputs[0].stat().st_size
        nparams = sum(math.prod(s) for _, s in tensor_specs(llama_config(params)))
        self.results["setup"] = {
            "n": a.n,
            "params": nparams,
            "checkpoint_bytes": ckpt_bytes,
            "data_dir": str(data),
            "repeats": a.repeats,
        }
        print(
            f"\nN={a.n} checkpoints x {nparams / 1e6:.1f}M params ({ckpt_bytes / GB:.2f} GB each), "
            f"{os.cpu_count()} CPUs, MemAvailable {meminfo()['MemAvailable'] / GB:.1f} GB, "
            f"load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        if not fits_in_cache(a.n * ckpt_bytes):
            print("  warning: inputs exceed half of MemAvailable; page cache may not stay warm", flush=True)

        fl = self.floors(inputs, ckpt_bytes, "merge")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if a.analyze_only:
            have_mk = False
        # Reference point: what any torch-based tool pays before touching a tensor.
        self.timed(
            "baseline_import_torch",
            "python -c 'import torch'",
            [sys.executable, "-c", "import torch, safetensors.torch"],
            inputs,
            BENCH / "out" / "none",
            env,
        )
        out_ours, out_mk, out_naive = self.outs / "ours", self.outs / "mergekit", self.outs / "naive"
        ours = mk = naive = None
        if have_ours and not a.analyze_only:
            ours = self.timed(
                "ours_merge", "extramerge merge sma", ours_merge_cmd(ckpts, out_ours), inputs, out_ours, env
            )
        if have_mk:
            mk = self.timed(
                "mergekit_linear",
                "mergekit-yaml linear",
                mergekit_cmd(ckpts, out_mk, BENCH),
                inputs,
                out_mk,
                env,
            )
        need = a.n * ckpt_bytes * 1.3 + 2 * ckpt_bytes + 2 * GB
        if a.skip_naive or a.analyze_only:
            pass
        elif need > meminfo()["MemAvailable"]:
            print(
                f"  skipping naive: needs ~{need / GB:.1f} GB, MemAvailable "
                f"{meminfo()['MemAvailable'] / GB:.1f} GB",
                flush=True,
            )
        else:
            naive = self.timed(
                "naive", "naive load-everything", naive_cmd(ckpts, out_naive), inputs, out_naive, env
            )

        ok = lambda r: r is not None and r.returncode == 0  # noqa: E731
        if ok(ours) and ok(mk):
            sp = mk.wall_s / ours.wall_s
            self.check(
                "merge speedup vs mergekit",
                round(sp, 2),
                f">= {T_SPEEDUP_VS_MERGEKIT}x",
                sp >= T_SPEEDUP_VS_MERGEKIT,
            )
            fr = ours.peak_rss_bytes / mk.peak_rss_bytes
            self.check(
                "merge peak RSS / mergekit's",
                round(fr, 3),
                f"<= {T_RSS_FRACTION_OF_MERGEKIT}",
                fr <= T_RSS_FRACTION_OF_MERGEKIT,
                f"{ours.peak_rss_bytes / MiB:.0f} vs {mk.peak_rss_bytes / MiB:.0f} MiB",
            )
        if ok(ours):
            self.check(
                "merge peak RSS (MB)",
                round(ours.peak_rss_bytes / 1e6),
                f"< {T_RSS_ABS / 1e6:.0f}",
                ours.peak_rss_bytes < T_RSS_ABS,
            )
            r = ours.wall_s / fl["floor_s"]
            self.check(
                "merge wall / I/O floor",
                round(r, 2),
                f"<= {T_MERGE_OVER_FLOOR}",
                r <= T_MERGE_OVER_FLOOR,
                f"{ours.wall_s:.2f} s vs {fl['floor_s']:.2f} s floor: {fl['floor_s'] / ours.wall_s:.0%}"
                f" of floor speed (no-fsync floor {fl['floor_nofsync_s']:.2f} s)",
            )
        for other, label in ((mk, "mergekit"), (naive, "naive")):
            if ok(ours) and ok(other):
                d, only = max_abs_diff(out_ours, self.outs / ("mergekit" if label == "mergekit" else "naive"))
                self.check(
                    f"max |ours - {label}|",
                    float(f"{d:.3g}"),
                    f"<= {T_MAX_ABS_DIFF:g}",
                    d <= T_MAX_ABS_DIFF and not only,
                    f"names in one only: {only[:4]}" if only else "",
                )
        if ok(mk) and ok(naive) and not ok(ours):
            d, only = max_abs_diff(out_mk, out_naive)
            self.check(
                "max |mergekit - naive| (reference)",
                float(f"{d:.3g}"),
                f"<= {T_MAX_ABS_DIFF:g}",
                d <= T_MAX_ABS_DIFF and not only,
            )
        for r in (mk, naive):
            if ok(r):
                self.results["runs"][("mergekit_linear" if r is mk else "naive")]["over_floor"] = (
                    r.wall_s / fl["floor_s"]
                )

        if have_ours and not a.skip_analyze:
            out_an = self.outs / "analyze"
            an = self.timed(
                "ours_analyze", "extramerge analyze", ours_analyze_cmd(ckpts, out_an), inputs, out_an, env
            )
            if ok(an):
                r = an.wall_s / fl["read_s"]
                self.check(
                    "analyze wall / read floor",
                    round(r, 2),
                    f"<= {T_ANALYZE_OVER_READ_FLOOR}",
                    r <= T_ANALYZE_OVER_READ_FLOOR,
                    f"{an.wall_s:.2f} s vs {fl['read_s']:.2f} s: {fl['read_s'] / an.wall_s:.0%} of floor",
                )
                self.check(
                    "analyze peak RSS (MB)",
                    round(an.peak_rss_bytes / 1e6),
                    f"< {T_RSS_ABS / 1e6:.0f}",
                    an.peak_rss_bytes < T_RSS_ABS,
                )
                self.read_passes("analyze", an, fl["input_bytes"])
        if ok(ours):
            self.read_passes("merge", ours, fl["input_bytes"])

        if a.scaling:
            self.scaling(have_ours, env)
        if have_ours and a.gram_cpu:
            self.gram_cpu(ckpts, a.gram_cpu, env)
        self.report()

    def gram_cpu(self, ckpts: list[Path], runs: int, env: dict) -> None:
        """CPU seconds of the Gram pass alone, inline (one worker, OPENBLAS_NUM_THREADS=1): less at the mercy
        of other jobs than wall time. Compiled kernel vs numpy (RIVERVALLEY_NATIVE=0), alternating, each run
        a fresh process that warms up with one pass, then times one."""
        code = (
            "import sys, time\n"
            "from extramerge.io import load_checkpoints\n"
            "from extramerge.trajectory import gram_pass\n"
            "ck = load_checkpoints(sys.argv[1:])\n"
            "gram_pass(ck, progress=False, workers=0)\n"
            "t = time.process_time()\n"
            "gram_pass(ck, progress=False, workers=0)\n"
            "print(time.process_time() - t)\n"
        )
        out: dict = {"kernel": [], "numpy": []}
        for _ in range(runs):
            for key, native in (("numpy", "0"), ("kernel", "1")):
                e = {**env, "RIVERVALLEY_NATIVE": native, "OPENBLAS_NUM_THREADS": "1"}
                p = subprocess.run(
                    [sys.executable, "-c", code, *map(str, ckpts)], env=e, capture_output=True, text=True
                )
                if p.returncode:
                    print(f"  gram pass ({key}) failed: {p.stderr.strip().splitlines()[-1:]}", flush=True)
                    return
                out[key].append(float(p.stdout))
        self.results["gram_cpu_s"] = out
        for key, v in out.items():
            times = ", ".join(f"{x:.2f}" for x in v)
            print(f"  gram pass CPU, inline, {key:<6}: {times} s", flush=True)

    def read_passes(self, what: str, run: Run, in_bytes: int) -> None:
        """Bytes read through read()/pread() (rchar) / input bytes. A reader that maps the files (mmap +
        madvise) is invisible to rchar (and MADV_POPULATE_READ does not even count page faults), so the
        check is skipped for it."""
        by_read = run.read_bytes_syscall / in_bytes
        seen = by_read >= 0.5
        self.check(
            f"{what}: input read passes",
            round(by_read, 2) if seen else "n/a",
            f"<= {T_READ_PASSES}",
            by_read <= T_READ_PASSES if seen else None,
            f"rchar / input bytes = {by_read:.2f}"
            + ("" if seen else " (inputs are mmap'd: not measurable here)"),
        )

    def scaling(self, have_ours: bool, env) -> None:
        a = self.args
        if not have_ours:
            self.check("time vs N linear (R^2)", None, f">= {T_SCALING_R2}", None, "extramerge missing")
            return
        ns = [2, 4, 8, 16]
        sp = a.scaling_params
        if sp == "auto":
            sp = a.params
            params = parse_count(sp)
            while not fits_in_cache(max(ns) * 4 * params * 1.01) and params > 20e6:
                params //= 2
            if params != parse_count(a.params):
                sp = f"{params // 10**6}M"
        params = parse_count(sp)
        data = BENCH / "data" / f"llama-{sp.upper()}-seed{a.seed}"
        ckpts = generate_checkpoints(data, params, max(ns), seed=a.seed)
        ckpt_bytes = checkpoint_files(ckpts[0])[0].stat().st_size
        print(
            f"\nscaling series: {sp} params ({ckpt_bytes / GB:.2f} GB per checkpoint), N = {ns}", flush=True
        )
        rows = []
        for n in ns:
            sub = ckpts[:n]
            inputs = input_files(sub)
            fl = self.floors(inputs, ckpt_bytes, f"scaling_n{n}")
            out = self.outs / f"ours-n{n}"
            r = self.timed(
                f"scaling_n{n}", f"extramerge merge N={n}", ours_merge_cmd(sub, out), inputs, out, env
            )
            rows.append(
                {
                    "n": n,
                    "wall_s": r.wall_s,
                    "peak_rss_bytes": r.peak_rss_bytes,
                    "floor_s": fl["floor_s"],
                    "over_floor": r.wall_s / fl["floor_s"],
                    "rc": r.returncode,
                }
            )
            shutil.rmtree(out, ignore_errors=True)
        x = np.array([r["n"] for r in rows], float)
        y = np.array([r["wall_s"] for r in rows], float)
        b, c = np.polyfit(x, y, 1)
        r2 = 1 - ((y - (b * x + c)) ** 2).sum() / ((y - y.mean()) ** 2).sum()
        self.results["scaling"] = {
            "params": sp,
            "checkpoint_bytes": ckpt_bytes,
            "rows": rows,
            "slope_s_per_ckpt": b,
            "intercept_s": c,
            "r2": r2,
        }
        self.check(
            "time vs N linear (R^2)",
            round(r2, 4),
            f">= {T_SCALING_R2}",
            r2 >= T_SCALING_R2,
            f"{b:.3f} s/checkpoint + {c:.2f} s ({sp} params); "
            + ", ".join(f"N={r['n']}: {r['wall_s']:.2f}s" for r in rows),
        )

    def report(self) -> None:
        res = self.results
        res["env"]["loadavg_at_end"] = os.getloadavg()
        print("\n" + "=" * 100)
        s = res["setup"]
        print(
            f"N={s['n']} x {s['params'] / 1e6:.1f}M fp32 params ({s['checkpoint_bytes'] / GB:.2f} GB each); "
            f"{res['env']['cpus']} CPUs; load {res['env']['loadavg_at_start'][0]:.2f} -> "
            f"{res['env']['loadavg_at_end'][0]:.2f}"
        )
        fl = res.get("floors", {}).get("merge")
        print(
            f"{'contender':<26}{'wall s':>9}{'x floor':>9}{'peak RSS MiB':>14}{'anon MiB':>10}"
            f"{'file MiB':>10}{'user+sys s':>12}"
        )
        for key, r in res["runs"].items():
            if key.startswith("scaling_"):
                continue
            base = fl["read_s"] if key in ("ours_analyze", "baseline_import_torch") else fl["floor_s"]
            print(
                f"{r['name']:<26}{r['wall_s']:>9.2f}{r['wall_s'] / base:>9.2f}"
                f"{r['peak_rss_bytes'] / MiB:>14.0f}"
                f"{r['peak_rss_anon_bytes'] / MiB:>10.0f}{r['peak_rss_file_bytes'] / MiB:>10.0f}"
                f"{r['user_s'] + r['sys_s']:>12.1f}"
            )
        if fl:
            print(
                f"{'I/O floor (read+write+fsync)':<26}{fl['floor_s']:>9.2f}{1:>9.2f}   "
                f"(read {fl['read_s']:.2f} s, write {fl['write_fsync_s']:.2f} s; no-fsync floor "
                f"{fl['floor_nofsync_s']:.2f} s)"
            )
        print("-" * 100)
        print(f"{'check':<36}{'value':>12}  {'target':<12}{'':6}note")
        for c in res["checks"]:
            print(f"{c['check']:<36}{str(c['value']):>12}  {c['target']:<12}{c['status']:<6}{c['note']}")
        print("=" * 100)
        if self.args.json:
            Path(self.args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(self.args.json).write_text(json.dumps(res, indent=2, default=float))
            print(f"wrote {self.args.json}")


def main() -> None:
    ap = argparse.ArgumentParser(description="Benchmark extramerge against mergekit and a naive merge.")
    ap.add_argument("--n", type=int, default=8, help="number of checkpoints to merge")
    ap.add_argument("--params", default="250M", help="model size (parameters), e.g. 250M, 20M")
    ap.add_argument("--quick", action="store_true", help="smoke test: --params 20M")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated checkpoints")
    ap.add_argument("--repeats", type=int, default=1, help="timed repeats per contender (best wall kept)")
    ap.add_argument("--skip-mergekit", action="store_true", help="do not run mergekit")
    ap.add_argument("--skip-naive", action="store_true", help="do not run the naive script")
    ap.add_argument("--skip-analyze", action="store_true", help="do not run extramerge analyze")
    ap.add_argument(
        "--analyze-only", action="store_true", help="time extramerge analyze alone (no merge contenders)"
    )
    ap.add_argument(
        "--gram-cpu",
        type=int,
        default=0,
        metavar="RUNS",
        help="also RUNS alternating CPU-second timings of the inline Gram pass, compiled kernel vs numpy",
    )
    ap.add_argument("--scaling", action="store_true", help="also time ours at N = 2, 4, 8, 16")
    ap.add_argument(
        "--scaling-params",
        default="auto",
        help="model size for the scaling series; auto = --params if 16 fit in half of RAM",
    )
    ap.add_argument("--generate-only", action="store_true", help="write the checkpoints and exit")
    ap.add_argument("--json", help="write all measurements to this JSON file")
    args = ap.parse_args()
    if args.quick:
        args.params = "20M"
    if args.generate_only:
        generate_checkpoints(
            BENCH / "data" / f"llama-{args.params.upper()}-seed{args.seed}",
            parse_count(args.params),
            args.n,
            seed=args.seed,
        )
        return
    Bench(args).run()


if __name__ == "__main__":
    main()
