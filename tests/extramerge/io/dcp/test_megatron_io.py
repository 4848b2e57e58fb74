"""Megatron-core ``torch_dist`` checkpoints: a run root (iter_XXXXXXX/ folders made with torch's DCP
writer, with metadata.json, common.pt, optimizer state and byte entries, plus the tracker file) is
inspected, merged and analysed with the optimizer state left out; the merge is a Megatron run root that
torch's ``dcp.load`` reads back. Megatron's chunkings (per-layer pieces of layer-stacked tensors, tensor
parallelism along a later dimension) are read exactly."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from _dcp_factory import ITERS, OBJECTS, OPTIMIZER, SHAPES, make_megatron_run
from _dcp_factory import quiet as _quiet

import extramerge
from extramerge.cli import main
from extramerge.io import TensorInfo, load_checkpoints
from extramerge.io.dcp import OutChunk, write_distcp, write_metadata
from extramerge.trajectory import gram_pass

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron")
    return root, make_megatron_run(root)


def test_inspect_names_megatron_and_leaves_out_optimizer(run, capsys):
    root, states = run
    cks = load_checkpoints([root / "ckpt"])
    try:
        assert [c.step for c in cks] == list(ITERS) and {c.format for c in cks} == {"megatron"}
        assert set(cks[0].infos) == set(SHAPES) and set(cks[0].state_tensors) == set(OPTIMIZER)
        assert all(torch.equal(cks[1].read(k), v) for k, v in states[1].items())
    finally:
        for c in cks:
            c.close()
    assert main(["inspect", str(root / "ckpt")]) == 0
    out = capsys.readouterr().out
    rows = out.splitlines()[1:]
    table = [r.split() for r in rows if r.split()[1:2] in (["100"], ["200"], ["300"])]
    assert [r[2] for r in table] == ["megatron"] * 3
    assert "2 training-state tensors" in out and "consistent: yes" in out


def test_merge_writes_a_megatron_root_that_dcp_loads(run, tmp_path):
    root, states = run
    out = tmp_path / "merged"
    assert main(["merge", str(root / "ckpt"), "--method", "sma", "-o", str(out), "--quiet"]) == 0
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "300"
    it = out / "iter_0000300"
    newest = root / "ckpt" / "iter_0000300"
    for name in ("metadata.json", "common.pt"):  # byte for byte from the newest input
        assert (it / name).read_bytes() == (newest / name).read_bytes()
    want = {k: sum(s[k].double() for s in states) / len(states) for k in SHAPES}
    got = _quiet(
        dcp.load,
        {k: torch.empty(s, dtype=torch.bfloat16) for k, s in SHAPES.items()},
        checkpoint_id=str(it),
        no_dist=True,
    )
    for k in SHAPES:
        torch.testing.assert_close(got[k].double(), want[k].to(torch.bfloat16).double(), rtol=0, atol=0.01)
    objects = _quiet(dcp.load, {OBJECTS[0]: io.BytesIO()}, checkpoint_id=str(it), no_dist=True)
    assert objects[OBJECTS[0]].getvalue() == b"common 300"
    (again,) = load_checkpoints([out])  # the merge is itself a Megatron run root
    try:
        assert again.format == "megatron" and again.step == 300 and not again.state_tensors
    finally:
        again.close()
    extramerge.merge(
        sorted(root.glob("st_*.safetensors")), method="sma", output=tmp_path / "r.safetensors", progress=False
    )
    from safetensors.torch import load_file

    ref = load_file(tmp_path / "r.safetensors")
    assert all(torch.equal(got[k], ref[k]) for k in SHAPES)  # bit-identical to the same merge of safetensors


def test_analyze_leaves_out_optimizer(run):
    root, _ = run
    grams = []
    for paths in ([root / "ckpt"], sorted(root.glob("st_*.safetensors"))):
        cks = load_checkpoints(paths)
        try:
            data = gram_pass(cks, progress=False)
            grams.append(dict(zip(data.names, data.per_tensor, strict=True)))
        finally:
            for c in cks:
                c.close()
    assert set(grams[0]) == set(SHAPES)
    for k in SHAPES:
        np.testing.assert_array_equal(grams[0][k], grams[1][k])


def _write_chunked(folder: Path, full: dict, boxes: dict) -> None:
    """A DCP folder whose tensors are stored in the given chunk boxes, spread over two files."""
    folder.mkdir()
    infos = {k: TensorInfo(k, v.shape, v.dtype) for k, v in full.items()}
    plan = [[], []]
    for name, chunks in boxes.items():
        for i, (offsets, sizes) in enumerate(chunks):
            plan[i % 2].append(OutChunk(name, offsets, sizes, 0, 0))

    def data(c):
        box = tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes, strict=True))
        return full[c.name][box].clone()

    stored = []
    for k, chunks in enumerate(plan):
        stored += write_distcp(folder, k, chunks, data, fsync=False)[0]
    write_metadata(folder, infos, plan, stored, fsync=False)


def test_tensor_and_pipeline_parallel_chunkings(tmp_path, monkeypatch):
    monkeypatch.setenv("EXTRAMERGE_MMAP", "1")  # the zero-copy spans are checked too
    g = torch.Generator().manual_seed(5)
    full = {
        "qkv": torch.randn(3, 6, 4, generator=g),  # per layer, column-parallel halves: intervals
        "proj": torch.randn(3, 4, 6, generator=g),  # per layer, row-parallel halves along dim 2: slabs
        "emb": torch.randn(5, 6, generator=g),  # vocabulary rows split in two
    }
    boxes = {
        "qkv": [((layer, h * 3, 0), (1, 3, 4)) for layer in range(3) for h in range(2)],
        "proj": [((layer, 0, h * 3), (1, 4, 3)) for layer in range(3) for h in range(2)],
        "emb": [((0, 0), (3, 6)), ((3, 0), (2, 6))],
    }
    _write_chunked(tmp_path / "ck", full, boxes)
    loaded = _quiet(
        dcp.load,
        {k: torch.empty_like(v) for k, v in full.items()},
        checkpoint_id=str(tmp_path / "ck"),
        no_dist=True,
    )
    assert all(torch.equal(loaded[k], v) for k, v in full.items())  # torch's own reader agrees
    (ck,) = load_checkpoints([tmp_path / "ck"])
    try:
        for name, t in full.items():
            flat = t.reshape(-1)
            assert torch.equal(ck.read(name), t), name
            for a, b in ((0, 5), (7, 30), (20, flat.numel())):
                assert torch.equal(ck.read_range(name, a, b), flat[a:b]), (name, a, b)
        assert ck.span("qkv", 0, 12) is not None and ck.span("qkv", 10, 14) is None
        assert ck.span("proj", 0, 2) is None  # assembled from row-parallel halves: copied
    finally:
        ck.close()
