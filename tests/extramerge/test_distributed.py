"""Merge and analyze on several processes (torch.distributed, gloo, CPU): the split of the work, the
launch variables, and runs of 2 processes whose outputs must equal one process's byte for byte; a failure
on one rank fails every rank with one line from rank 0 and leaves nothing behind.

Runs start either through torchrun (``python -m torch.distributed.run``) or, where each rank's exit status
and stderr are checked, as processes given the env:// variables directly (as srun would).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from _procs import leftovers, run_one, run_ranks, run_torchrun, same_tree
from safetensors.numpy import save_file

from extramerge import distributed
from extramerge.engine import MERGE_CHUNK_BYTES
from extramerge.engine.units import plan_units
from extramerge.io import open_checkpoint

# Tensors large enough that the merge's units (4 MiB per checkpoint) are several, one tensor straddles
# the two ranks' blocks, and the output shards at 5 MB.
_SHAPES = {
    "h.0.attn.weight": ((1536, 1024), np.float32),
    "h.0.mlp.weight": ((1024, 1536), np.float32),
    "h.1.attn.weight": ((1024, 1024), ml_dtypes.bfloat16),
    "h.1.ln.bias": ((1024,), np.float32),
    "h.1.steps": ((3,), np.int64),
    "z.last.weight": ((700, 1024), np.float32),
}


def _make_run(root: Path, n: int = 4, nan_in: tuple[int, str] | None = None) -> list[Path]:
    """n HF folders step_000100 ... (config.json + model.safetensors), θ_k = base + 0.1·k·d + noise;
    ``nan_in`` = (checkpoint index, tensor) puts a NaN at the end of that tensor."""
    rng = np.random.default_rng(0)
    base = {k: rng.standard_normal(s, dtype=np.float32) for k, (s, dt) in _SHAPES.items() if dt != np.int64}
    drift = {k: rng.standard_normal(v.shape, dtype=np.float32) for k, v in base.items()}
    paths = []
    for k in range(n):
        state = {}
        for name, (shape, dt) in _SHAPES.items():
            if dt == np.int64:
                state[name] = np.arange(3, dtype=np.int64) + 100 * (k + 1)
                continue
            x = base[name] + 0.1 * k * drift[name] + 0.01 * rng.standard_normal(shape, dtype=np.float32)
            state[name] = x.astype(dt)
        if nan_in is not None and nan_in[0] == k:
            state[nan_in[1]].reshape(-1)[-1] = np.nan
        folder = root / f"step_{100 * (k + 1):06d}"
        folder.mkdir(parents=True)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 1024}) + "\n")
        paths.append(folder)
    return paths


# ------------------------------------------------------------------------------------------- no processes


def test_split_by_bytes_is_contiguous_covering_and_balanced():
    rng = random.Random(0)
    for _ in range(300):
        sizes = [rng.choice([0, 1, 7, 100, 4096, 10**6]) for _ in range(rng.randint(0, 40))]
        world = rng.randint(1, 6)
        blocks = distributed.split_by_bytes(sizes, world)
        assert len(blocks) == world
        assert blocks[0][0] == 0 and blocks[-1][1] == len(sizes)
        assert all(hi == lo for (_, hi), (lo, _) in zip(blocks, blocks[1:], strict=False))  # contiguous
        total, biggest = sum(sizes), max(sizes, default=0)
        if total:
            for lo, hi in blocks:
                assert abs(sum(sizes[lo:hi]) - total / world) <= biggest
    assert distributed.split_by_bytes([5, 5, 5, 5], 2) == [(0, 2), (2, 4)]
    assert distributed.split_by_bytes([0, 0, 0], 3) == [(0, 1), (1, 2), (2, 3)]  # by count
    assert distributed.split_by_bytes([10], 3) in ([(0, 0), (0, 1), (1, 1)], [(0, 1), (1, 1), (1, 1)])
    assert distributed.rank_block([1, 2, 3]) == range(3)  # one process: everything


def test_launch_from_env_torchrun_slurm_and_errors():
    base = {"MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    assert distributed.launch_from_env({}) is None
    assert distributed.launch_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    got = distributed.launch_from_env(base | {"WORLD_SIZE": "4", "RANK": "3"})
    assert got == distributed.Launch(3, 4, "node1", 29500)
    slurm = base | {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}
    assert distributed.launch_from_env(slurm) == distributed.Launch(5, 8, "node1", 29500)
    assert distributed.launch_from_env({"SLURM_NTASKS": "8", "SLURM_PROCID": "5"}) is None  # no MASTER_ADDR
    with pytest.raises(ValueError, match="MASTER_PORT"):
        distributed.launch_from_env({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "x"})
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        distributed.launch_from_env(base | {"WORLD_SIZE": "two", "RANK": "0"})
    with pytest.raises(ValueError, match="RANK=2 is outside"):
        distributed.launch_from_env(base | {"WORLD_SIZE": "2", "RANK": "2"})


# ------------------------------------------------------------------------------------------ two processes


def _tensors_per_rank(path: Path) -> list[set[str]]:
    """The tensors each of 2 ranks reads in a merge (the engine's unit plan and split)."""
    ck = open_checkpoint(path)
    try:
        infos = dict(ck.infos)
    finally:
        ck.close()
    plan = plan_units(infos, MERGE_CHUNK_BYTES // 4)
    sizes = [sum((b - a) * infos[n].itemsize for n, a, b in u) for u in plan]
    blocks = distributed.split_by_bytes(sizes, 2)
    assert all(hi - lo >= 2 for lo, hi in blocks)  # several units on each rank
    return [{n for u in plan[lo:hi] for n, _, _ in u} for lo, hi in blocks]


@pytest.fixture(scope="module")
def run4(tmp_path_factory) -> list[Path]:
    paths = _make_run(tmp_path_factory.mktemp("run"))
    first, second = _tensors_per_rank(paths[-1])
    assert first & second  # one tensor's bytes are split between the ranks
    return paths


def test_torchrun_merge_sharded_equals_one_process(run4, tmp_path):
    args = ["merge", *run4, "--method", "ema", "--shard-size", "5MB", "--quiet", "-o"]
    one = run_one([*args, tmp_path / "one"], tmp_path)
    assert one.returncode == 0, one.stderr
    two = run_torchrun([*args, tmp_path / "two"], tmp_path)
    assert two.returncode == 0, two.stderr + two.stdout
    assert two.stdout.count("extramerge merged ->") == 1  # rank 0 alone prints the summary
    assert "on 2 processes" in two.stdout
    assert len(list((tmp_path / "two").glob("model-*-of-*.safetensors"))) >= 3
    same_tree(tmp_path / "one", tmp_path / "two")
    assert leftovers(tmp_path) == []


def test_ranks_merge_single_file_bfloat16_equals_one_process(run4, tmp_path):
    args = ["merge", *run4, "--method", "extra", "--dtype", "bfloat16", "--quiet", "-o"]
    one = run_one([*args, tmp_path / "one.safetensors"], tmp_path)
    assert one.returncode == 0, one.stderr
    (r0, out0, err0), (r1, out1, err1) = run_ranks([*args, tmp_path / "two.safetensors"], tmp_path)
    assert (r0, r1) == (0, 0), err0 + err1
    assert "extramerge merged ->" in out0 and out1 == "" and err1 == ""
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    rec = [json.loads((tmp_path / f"{x}.merge.json").read_text()) for x in ("one", "two")]
    assert [r.pop("created") and r for r in rec][0] == rec[1]
    assert leftovers(tmp_path) == []


def test_torchrun_analyze_equals_one_process(run4, tmp_path):
    one = run_one(["analyze", *run4, "--quiet", "-o", tmp_path / "one"], tmp_path)
    assert one.returncode == 0, one.stderr
    two = run_torchrun(["analyze", *run4, "--quiet", "-o", tmp_path / "two"], tmp_path)
    assert two.returncode == 0, two.stderr + two.stdout
    assert two.stdout.count("analysed 4 checkpoints") == 1
    with np.load(tmp_path / "one" / "gram.npz") as a, np.load(tmp_path / "two" / "gram.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            x, y = a[key], b[key]
            assert x.dtype == y.dtype and x.shape == y.shape, key
            assert x.tobytes() == y.tobytes(), key  # bit-identical, not merely close
        assert a["gram"].shape == (4, 4) and np.all(np.diag(a["gram"])[:-1] > 0)
    ra, rb = (json.loads((tmp_path / d / "analysis.json").read_text()) for d in ("one", "two"))
    ra.pop("files"), rb.pop("files")
    assert ra == rb


def _merge_args(paths, out) -> list:
    return [*paths, "--method", "sma", "--quiet", "-o", out]


def test_failure_on_one_rank_fails_all_with_one_line(tmp_path):
    """A NaN only rank 1 reads (the last tensor): every rank exits 2, rank 0 prints the one line, and
    neither the output nor the staging folder is left."""
    paths = _make_run(tmp_path / "run", nan_in=(2, "z.last.weight"))
    first, second = _tensors_per_rank(paths[-1])
    assert "z.last.weight" in second and "z.last.weight" not in first
    (r0, _, err0), (r1, out1, err1) = run_ranks(["merge", *_merge_args(paths, tmp_path / "out")], tmp_path)
    assert (r0, r1) == (2, 2)
    lines = err0.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("extramerge: error: tensor 'z.last.weight'"), err0
    assert "step_000300" in lines[0] and "NaN" in lines[0]
    assert out1 == "" and err1 == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no output, no staging folder


@pytest.mark.parametrize(
    "case, message",
    [
        ("exists", "exists and is not empty"),
        ("torch", "written by one process"),
        ("inspect", "runs as one process"),
    ],
)
def test_refusals_fail_every_rank(run4, tmp_path, case, message):
    if case == "exists":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "mine.txt").write_text("keep me")
        args = ["merge", *_merge_args(run4, tmp_path / "out")]
    elif case == "torch":
        args = ["merge", *_merge_args(run4, tmp_path / "out.pt")]
    else:
        args = ["inspect", *run4]
    (r0, out0, err0), (r1, out1, err1) = run_ranks(args, tmp_path)
    assert (r0, r1) == (2, 2)
    assert err0.count("\n") == 1 and err0.startswith("extramerge: error: ") and message in err0, err0
    assert out1 == "" and err1 == ""
    assert leftovers(tmp_path) == []
    if case == "exists":
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]
    else:
        assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("direct", [True, False])
def test_ranged_writer_pieces_from_several_ranks_make_the_exact_file(tmp_path, direct):
    """Ranks write contiguous, unaligned byte ranges in pieces of odd sizes (whole pages with O_DIRECT,
    the partial pages at each end through the page cache): the file is exactly the bytes meant."""
    from extramerge.io.ranged import RangedWriter, create_files
    from extramerge.io.shards import FileLayout

    rng = np.random.default_rng(0)
    header = b"H" * 1001
    sizes = {"a": 9_000_001, "b": 12_345_679}  # bytes of two tensors, both crossing 8 MiB blocks
    offsets = {"a": len(header), "b": len(header) + sizes["a"]}
    total = len(header) + sum(sizes.values())
    layout = FileLayout("f.bin", header, ["a", "b"], offsets, total)
    want = {n: rng.integers(0, 256, s, dtype=np.uint8) for n, s in sizes.items()}
    create_files(tmp_path, [layout])
    # three "ranks": a[0:3_000_017), a[3_000_017:] + b[:5_000_000), b[5_000_000:]
    shares = [[("a", 0, 3_000_017)], [("a", 3_000_017, sizes["a"]), ("b", 0, 5_000_000)]]
    shares.append([("b", 5_000_000, sizes["b"])])
    for share in reversed(shares):  # in any order
        w = RangedWriter(tmp_path, [layout], writeback=True, direct=direct)
        for name, a, b in share:
            cuts = np.sort(rng.integers(a, b, 7))
            for lo, hi in zip([a, *cuts], [*cuts, b], strict=True):
                w.write(name, int(lo), memoryview(want[name][lo:hi]))
        w.close(fsync=True)
    got = (tmp_path / "f.bin").read_bytes()
    assert got == header + want["a"].tobytes() + want["b"].tobytes()


@pytest.mark.parametrize("rank", [0, 1])
def test_launched_rank_ends_its_process_after_leaving(monkeypatch, capsys, rank):
    """Under a launcher main() leaves the group (barrier, destroy), flushes, then ends the process with
    the command's status through os._exit: gloo can abort in the interpreter's teardown (SIGABRT) after
    the work is done (scripts/gloo_exit_abort.py)."""
    from extramerge import cli

    calls = []

    class Ended(Exception):
        pass

    def fake_exit(code):
        calls.append(("exit", code))
        raise Ended

    def fake_run(prog, parser, argv, errors=()):
        print("summary")
        return 3

    monkeypatch.setattr(distributed, "launch_from_env", lambda: distributed.Launch(rank, 2, "127.0.0.1", 1))
    monkeypatch.setattr(distributed, "leave", lambda: calls.append(("leave",)))
    monkeypatch.setattr(cli.commandline, "run", fake_run)
    monkeypatch.setattr(distributed.os, "_exit", fake_exit)
    with pytest.raises(Ended):
        cli.main(["analyze", "x"])
    assert calls == [("leave",), ("exit", 3)]
    assert capsys.readouterr().out == ("summary\n" if rank == 0 else "")  # other ranks print nothing
