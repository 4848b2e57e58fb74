"""Huge sizes are refused up front: every allocation of a simulation (landscape, checkpoints, state, noise,
results per seed, schedule) is projected before the first one, so `rivervalley simulate` with sizes no
machine holds prints one line naming the flags and the bytes, exits 2 and writes nothing (issue 21 item 9:
`--seeds 1000000 --m 4096` died in torch's allocator with a traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rivervalley.landscapes import QuadraticRiverValley
from rivervalley.simulate import simulate

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    "sizes, flags",
    [
        (["--seeds", "1000000", "--m", "4096"], ["--seeds", "--m"]),
        (["--seeds", "1000000", "--m", "4096", "--exact"], ["--seeds", "--m"]),
        (["--seeds", str(10**9), "--m", str(10**6)], ["--seeds", "--m"]),
        (["--seeds", "8", "--m", str(10**6), "--rotate"], ["--rotate"]),
        (["--landscape", "matrix", "--shape", "100000,100000", "--optimizer", "muon"], ["--shape"]),
        (["--steps", str(10**12), "--ckpt-every", str(10**12)], ["--steps"]),
    ],
)
def test_cli_refuses_huge_sizes_in_one_line_before_allocating(tmp_path, sizes, flags):
    out = tmp_path / "sim"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "rivervalley.cli", "simulate", *sizes, "-o", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = lines[0]
    assert line.startswith("rivervalley: error: simulate with ") and "needs about" in line
    assert all(f in line for f in flags), line
    assert proc.stdout == ""
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_simulate_projects_every_allocation_before_the_first(monkeypatch):
    """The library's own check runs before the initial point and the noise buffers are allocated."""
    from rivervalley.common import resources
    from rivervalley.simulate import runner

    def allocated(*a, **k):
        raise AssertionError("allocated before the memory check")

    monkeypatch.setattr(resources, "available_memory", lambda: 10**6)
    monkeypatch.setattr(runner, "NoiseSource", allocated)
    monkeypatch.setattr(runner, "initial_theta", allocated)
    land = QuadraticRiverValley(slope=1.0, m=4096)
    with pytest.raises(ValueError, match=r"1000000 seeds x 51 checkpoints x 4097 parameters .* needs about"):
        simulate(land, lr=0.1, steps=1000, seeds=10**6, ckpt_every=20, noise=1.0)
    with pytest.raises(ValueError, match=r"schedule .* needs about"):  # the per-step lr array, too
        simulate(QuadraticRiverValley(slope=1.0, m=1), lr=0.1, steps=10**12, ckpt_every=10**12)


def test_require_memory_falls_back_to_installed_memory(monkeypatch):
    """Where the available memory cannot be read, the machine's physical memory still bounds a request."""
    from rivervalley.common import resources

    monkeypatch.setattr(resources, "available_memory", lambda: None)
    resources.require_memory(1, "one byte")
    if resources._installed_memory() is not None:
        with pytest.raises(ValueError, match="of memory is installed"):
            resources.require_memory(1 << 62, "an exabyte")
