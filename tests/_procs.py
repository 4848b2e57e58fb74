"""Running extramerge as separate processes, for the tests of several processes (shared by
test_distributed and test_distributed_dcp): one process, ``torchrun`` (``python -m torch.distributed.run``)
and ranks started with the env:// variables directly (as srun would), plus comparisons of their outputs.

Public helpers:
    run_one(args, cwd)                  one process: ``python -m extramerge ARGS``
    run_torchrun(args, cwd, nproc=2)    torchrun on 127.0.0.1 at a free port
    run_ranks(args, cwd, nproc=2)       [(exit status, stdout, stderr)] of each rank
    same_tree(a, b)                     every file under output a equals b's byte for byte (merge.json
                                        apart from its time stamp)
    leftovers(folder)                   hidden entries of folder (staging folders left behind)
    default_signals                     preexec_fn: the child starts with SIGINT, SIGTERM and SIGHUP at
                                        their defaults, whatever the test run inherited
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path


def default_signals() -> None:
    """For ``preexec_fn``: SIGINT, SIGTERM and SIGHUP at their defaults in the child. A test run started as a
    background job inherits SIGINT ignored, under nohup SIGHUP too, and the commands keep an inherited
    ignore (by design); a test that signals its child sets what it relies on."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {
        k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "SLURM_NTASKS")
    }
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_one(args: list, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "extramerge", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120)


def run_torchrun(args: list, cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    run += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    return subprocess.run(
        [*run, "-m", "extramerge", *map(str, args)], cwd=cwd, env=_env(), capture_output=True, text=True,
        timeout=180,
    )  # fmt: skip


def run_ranks(args: list, cwd: Path, nproc: int = 2) -> list[tuple[int, str, str]]:
    """Each rank started with the env:// variables (as srun would): [(exit status, stdout, stderr)]."""
    port = str(_free_port())
    procs = []
    for rank in range(nproc):
        env = _env() | {"WORLD_SIZE": str(nproc), "RANK": str(rank), "LOCAL_RANK": str(rank)}
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        cmd = [sys.executable, "-m", "extramerge", *map(str, args)]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    out = []
    for p in procs:
        o, e = p.communicate(timeout=180)
        out.append((p.returncode, o.decode(), e.decode()))
    return out


def same_tree(a: Path, b: Path) -> None:
    """Every file under output ``a`` (subfolders too) equals ``b``'s byte for byte (merge.json apart from
    its time stamp)."""
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*"))
    assert names == sorted(str(p.relative_to(b)) for p in b.rglob("*"))
    for name in names:
        if (a / name).is_dir():
            continue
        if Path(name).name == "merge.json":
            ja, jb = (json.loads((d / name).read_text()) for d in (a, b))
            ja.pop("created"), jb.pop("created")
            assert ja == jb
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))
