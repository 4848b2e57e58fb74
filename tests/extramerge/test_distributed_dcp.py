"""DCP and Megatron runs (made with torch's own ``dcp.save``: test_dcp_io and test_megatron_io build them)
merged and analysed by 2 processes: a DCP or Megatron output whose ``.distcp`` files the ranks write whole
(several files, tensors in several row-block chunks, one tensor's chunks on both ranks) equals the
one-process output byte for byte, ``.metadata`` included, and torch's ``dcp.load`` reads it back; a
safetensors output and ``analyze``'s gram.npz equal one process's too; a NaN only one rank reads fails
every rank with one line and leaves nothing behind.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from _dcp_factory import make_dcp_run, make_megatron_run
from _procs import leftovers, run_one, run_ranks, run_torchrun, same_tree
from safetensors.torch import load_file

from extramerge import distributed
from extramerge.io import formats, load_checkpoints
from extramerge.io.dcp import plan_output, read_index

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SHARD = {"dcp": "300B", "megatron": "24B"}  # tiny .distcp files: many files, tensors in several chunks
EXTRA = ["--method", "extra", "--alpha", "0.5"]  # weights -0.5, 0, 1.5 on 3 checkpoints


def _split(run: Path, shard: str) -> list[set[str]]:
    """The tensors in each of 2 ranks' files of the merge of ``run`` (the files shared out by bytes)."""
    cks = load_checkpoints([run])
    try:
        infos, template = dict(cks[-1].infos), cks[-1]
        run_root = formats.get(template.format).run_root
        layout = plan_output(infos, template, run_root=run_root, file_bytes=int(shard[:-1]))
    finally:
        for c in cks:
            c.close()
    blocks = distributed.split_by_bytes(layout.file_bytes(infos), 2)
    assert all(hi - lo >= 2 for lo, hi in blocks)  # several whole files on each rank
    return [{c.name for f in layout.files[lo:hi] for c in f} for lo, hi in blocks]


@pytest.fixture(scope="module", params=["dcp", "megatron"])
def run(request, tmp_path_factory):
    """(format, the run to merge, its states, the iteration folder of a merge of it)."""
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "dcp":
        return "dcp", root / "dcp", make_dcp_run(root, more={"lm_head.weight": (32, 32)}), ""
    return "megatron", root / "ckpt", make_megatron_run(root), "iter_0000300"


def _load(folder: Path, like: dict) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(like, checkpoint_id=str(folder), no_dist=True)
    return like


def test_merge_two_processes_equals_one(run, tmp_path):
    fmt, path, states, it = run
    first, second = _split(path, SHARD[fmt])
    assert first & second or fmt == "megatron"  # one tensor's chunks lie in files of both ranks
    args = ["merge", path, *EXTRA, "--shard-size", SHARD[fmt], "--quiet", "-o"]
    one = run_one([*args, tmp_path / "one"], tmp_path)
    assert one.returncode == 0, one.stderr
    two = run_torchrun([*args, tmp_path / "two"], tmp_path)
    assert two.returncode == 0, two.stderr + two.stdout
    assert two.stdout.count("extramerge merged ->") == 1 and "on 2 processes" in two.stdout
    same_tree(tmp_path / "one", tmp_path / "two")  # every .distcp file, .metadata, the Megatron files
    out = tmp_path / "two" / it
    index = read_index(out)
    assert len(index.files) >= 4 and max(len(t.chunks) for t in index.tensors.values()) >= 3
    rec = json.loads((tmp_path / "two" / "merge.json").read_text())
    assert rec["output_format"] == fmt and rec["weights"] == [-0.5, 0.0, 1.5]

    floats = {k: v for k, v in states[-1].items() if v.is_floating_point()}
    got = _load(out, {k: torch.empty(v.shape, dtype=v.dtype) for k, v in states[-1].items()})
    for k, v in states[-1].items():  # Σ w_j θ_j in float64, integer tensors from the newest
        want = -0.5 * states[0][k].double() + 1.5 * v.double() if k in floats else v
        tol = 0.05 if v.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(got[k].double(), want.double(), rtol=0, atol=tol, msg=k)
    if fmt == "dcp":
        assert _load(out, {"train_state": io.BytesIO()})["train_state"].getvalue() == b"step=300"
    else:
        assert (tmp_path / "two" / "latest_checkpointed_iteration.txt").read_text().strip() == "300"
        for name in ("metadata.json", "common.pt"):
            assert (out / name).read_bytes() == (path / it / name).read_bytes()
        common = _load(out, {"common_state/shard_0_1": io.BytesIO()})["common_state/shard_0_1"]
        assert common.getvalue() == b"common 300"

    st = ["merge", path, *EXTRA, "--quiet", "-o"]  # the same merge as one safetensors file
    one = run_one([*st, tmp_path / "one.safetensors"], tmp_path)
    assert one.returncode == 0, one.stderr
    two = run_torchrun([*st, tmp_path / "two.safetensors"], tmp_path)
    assert two.returncode == 0, two.stderr + two.stdout
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    flat = load_file(tmp_path / "two.safetensors")
    assert flat.keys() == got.keys() and all(torch.equal(flat[k], got[k].contiguous()) for k in flat)
    assert leftovers(tmp_path) == []


def test_analyze_two_processes_equals_one(run, tmp_path):
    _, path, states, _ = run
    one = run_one(["analyze", path, "--quiet", "-o", tmp_path / "one"], tmp_path)
    assert one.returncode == 0, one.stderr
    two = run_torchrun(["analyze", path, "--quiet", "-o", tmp_path / "two"], tmp_path)
    assert two.returncode == 0, two.stderr + two.stdout
    with np.load(tmp_path / "one" / "gram.npz") as a, np.load(tmp_path / "two" / "gram.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key  # bitwise
        flat = [torch.cat([s[k].double().reshape(-1) for k in sorted(s) if s[k].is_floating_point()])
                for s in states]  # fmt: skip
        d = torch.stack([x - flat[-1] for x in flat])  # displacements from the newest checkpoint
        assert int(a["reference"]) == len(states) - 1
        np.testing.assert_allclose(a["gram"], (d @ d.T).numpy(), rtol=1e-9, atol=1e-12)  # independent
    ra, rb = (json.loads((tmp_path / d / "analysis.json").read_text()) for d in ("one", "two"))
    ra.pop("files"), rb.pop("files")
    assert ra == rb


def test_nan_read_by_one_rank_fails_every_rank_with_dcp_output(tmp_path):
    """A NaN in the last tensor, which only rank 1 merges (its files): rank 0 has written its files when
    rank 1 fails; every rank exits 2, rank 0 prints the one line, nothing is left."""
    last = "transformer.h.0.attn.c_proj.weight"
    make_dcp_run(tmp_path / "run", nan_in=last)
    first, second = _split(tmp_path / "run" / "dcp", SHARD["dcp"])
    assert last in second and last not in first
    args = [
        "merge",
        tmp_path / "run" / "dcp",
        *EXTRA,
        "--shard-size",
        SHARD["dcp"],
        "--quiet",
        "-o",
        tmp_path / "out",
    ]
    (r0, _, err0), (r1, out1, err1) = run_ranks(args, tmp_path)
    assert (r0, r1) == (2, 2)
    lines = err0.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"extramerge: error: tensor '{last}'"), err0
    assert "step-300" in lines[0] and "NaN" in lines[0]
    assert out1 == "" and err1 == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no output, no staging folder


def test_units_clipped_to_a_rank_and_entries_through_json():
    from extramerge.engine.units import clip_units
    from extramerge.io.dcp import Written, written_from_json, written_json

    plan = [[("a", 0, 6), ("b", 0, 0), ("c", 0, 2)], [("d", 0, 4)], [("d", 4, 8)]]
    assert clip_units(plan, {"a": (4, 6), "b": (0, 0), "c": (0, 2), "d": (0, 3)}) == [
        [("a", 4, 6), ("b", 0, 0), ("c", 0, 2)], [("d", 0, 3)],
    ]  # fmt: skip
    assert clip_units(plan, {"d": (3, 8)}) == [[("d", 3, 4)], [("d", 4, 8)]]
    assert clip_units(plan, {}) == []
    entries = [
        Written("train_state", None, "__0_0.distcp", 0, 8),
        Written("w", (2, 0), "__1_0.distcp", 8, 900),
    ]
    assert written_from_json(written_json(entries)) == entries
    with pytest.raises(ValueError, match="malformed DCP storage entries"):
        written_from_json(b'[["w", [1], "f"]]')
