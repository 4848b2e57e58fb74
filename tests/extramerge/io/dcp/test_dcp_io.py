"""DCP (torch.distributed.checkpoint) input and output: checkpoints written by torch's own DCP writer
(single process, and two gloo processes with FSDP2-style Shard(0) DTensors) read lazily and merged /
analysed exactly as the same tensors saved as safetensors; malicious and corrupt metadata refused with one
line; a merged DCP folder loaded back by torch's own ``dcp.load``."""

from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from _dcp_factory import OPT, STEPS, make_dcp_run
from _dcp_factory import dcp_load as _dcp_load
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException

import extramerge
from extramerge.cli import main
from extramerge.io import CheckpointError, load_checkpoints
from extramerge.io.dcp import plan_dcp, read_index, save
from extramerge.trajectory import gram_pass

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # dcp: "assuming ... a single process"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return root, make_dcp_run(root)


def test_open_reads_metadata_and_names_format(runs, capsys):
    root, states = runs
    cks = load_checkpoints([root / "dcp"])
    try:
        assert [c.step for c in cks] == list(STEPS) and {c.format for c in cks} == {"dcp"}
        assert set(cks[0].infos) == set(states[0]) and set(cks[0].state_tensors) == {OPT}
        assert set(cks[0].sources[0].objects) == {"train_state"}
        for name, t in states[-1].items():  # every tensor equals what was saved, ranges and views too
            assert torch.equal(cks[-1].read(name), t), name
            n = t.numel()
            if n > 2:
                assert torch.equal(cks[-1].read_range(name, 1, n - 1), t.reshape(-1)[1 : n - 1])
    finally:
        for c in cks:
            c.close()
    assert main(["inspect", str(root / "dcp")]) == 0
    out = capsys.readouterr().out
    assert "dcp" in out and "step-300" in out and "consistent: yes" in out
    assert "1 training-state tensor" in out  # the optimizer moment, left out


def test_merge_equals_safetensors_merge(runs, tmp_path):
    root, _ = runs
    a = extramerge.merge(
        [root / "dcp"], method="ema", decay=0.5, output=tmp_path / "a.safetensors", progress=False
    )
    b = extramerge.merge(
        [root / "st"], method="ema", decay=0.5, output=tmp_path / "b.safetensors", progress=False
    )
    assert a.n_checkpoints == b.n_checkpoints == 3
    ta, tb = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert ta.keys() == tb.keys() and OPT not in ta
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k  # bit-identical
    assert (
        main(
            ["merge", str(root / "dcp"), "--method", "sma", "-o", str(tmp_path / "c.safetensors"), "--quiet"]
        )
        == 0
    )
    extramerge.merge([root / "st"], method="sma", output=tmp_path / "d.safetensors", progress=False)
    tc, td = load_file(tmp_path / "c.safetensors"), load_file(tmp_path / "d.safetensors")
    assert all(torch.equal(tc[k], td[k]) for k in td)


def test_analyze_gram_equals_safetensors(runs):
    root, _ = runs
    grams = []
    for sub in ("dcp", "st"):
        cks = load_checkpoints([root / sub])
        try:
            data = gram_pass(cks, progress=False)
            grams.append((data.gram, dict(zip(data.names, data.per_tensor, strict=True))))
        finally:
            for c in cks:
                c.close()
    (g_dcp, per_dcp), (g_st, per_st) = grams
    assert per_dcp.keys() == per_st.keys()
    for name in per_st:  # each tensor's contribution bit-identical; the totals add them in another order
        np.testing.assert_array_equal(per_dcp[name], per_st[name])
    np.testing.assert_allclose(g_dcp, g_st, rtol=1e-14, atol=0)
    rep = extramerge.analyze([root / "dcp"], windows=(1, 2), progress=False)
    assert rep["n_checkpoints"] == 3


def test_dcp_output_loads_back_with_dcp_load(runs, tmp_path, monkeypatch):
    root, states = runs
    monkeypatch.setattr(save, "CHUNK_BYTES", 200)  # row blocks of <= 200 bytes: several chunks per tensor
    out = tmp_path / "merged"
    extramerge.merge([root / "dcp"], method="sma", output=out, shard_size=600, progress=False)
    ref = load_file(extramerge.merge([root / "st"], method="sma", output=tmp_path / "r.safetensors",
                                      progress=False).files[0])  # fmt: skip
    index = read_index(out)
    assert len(index.files) > 1 and len(index.tensors["transformer.wte.weight"].chunks) > 1
    loaded = _dcp_load({k: torch.empty_like(v) for k, v in ref.items()}, out)
    for k, v in ref.items():
        assert torch.equal(loaded[k], v), k
    train = _dcp_load({"train_state": io.BytesIO()}, out)["train_state"]  # copied from the newest input
    assert train.getvalue() == b"step=300"
    opt = torch.zeros(16, 8)  # optimizer state is not in a merge: only a partial load leaves it alone
    with pytest.raises(CheckpointException) as failed:
        _dcp_load({OPT: opt, **{k: torch.empty_like(v) for k, v in ref.items()}}, out)
    assert f"Missing key in checkpoint state_dict: {OPT}" in str(
        getattr(failed.value, "failures", failed.value)
    )
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    _dcp_load({OPT: opt}, out, planner=DefaultLoadPlanner(allow_partial_load=True))
    assert not opt.any()
    (ck,) = load_checkpoints([out])  # our reader of our writer: multi-chunk, multi-file
    try:
        assert ck.format == "dcp" and all(torch.equal(ck.read(k), v) for k, v in ref.items())
    finally:
        ck.close()


def test_plan_is_deterministic_row_blocks():
    from extramerge.io import TensorInfo

    infos = {"a": TensorInfo("a", (10, 4), "F32"), "b": TensorInfo("b", (3,), "F32")}
    plan = plan_dcp(infos, file_bytes=100, chunk_bytes=48)
    chunks = [c for f in plan for c in f]
    assert [(c.name, c.offsets, c.sizes) for c in chunks] == [
        ("a", (0, 0), (3, 4)), ("a", (3, 0), (3, 4)), ("a", (6, 0), (3, 4)), ("a", (9, 0), (1, 4)),
        ("b", (0,), (3,)),
    ]  # fmt: skip
    assert [len(f) for f in plan] == [2, 3] and plan == plan_dcp(infos, file_bytes=100, chunk_bytes=48)


# --------------------------------------------------------------------------------- two processes (FSDP2)


def _fsdp_worker(rank: int, folder: str, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        for step, full in zip(STEPS[:2], _fsdp_states(), strict=True):
            sd = {
                k: distribute_tensor(v, mesh, [Shard(1 if k == "tp.weight" else 0)]) for k, v in full.items()
            }
            dcp.save(sd, checkpoint_id=f"{folder}/step-{step}")
    finally:
        dist.destroy_process_group()


def _fsdp_states() -> list[dict]:
    g = torch.Generator().manual_seed(7)
    shapes = {"emb.weight": (7, 5), "bias": (9,), "tp.weight": (4, 6), "one": (1, 3)}
    return [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(2)]


def test_fsdp2_two_process_checkpoint(tmp_path, monkeypatch):
    import socket

    import torch.multiprocessing as mp

    monkeypatch.setenv("EXTRAMERGE_MMAP", "1")  # the zero-copy spans are checked too

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_worker, args=(str(tmp_path), port), nprocs=2, join=True)
    assert sorted(p.name for p in (tmp_path / "step-100").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    index = read_index(tmp_path / "step-100")
    assert {c.blob.file for c in index.tensors["emb.weight"].chunks} == {"__0_0.distcp", "__1_0.distcp"}
    states = _fsdp_states()
    cks = load_checkpoints([tmp_path])
    try:
        for ck, state in zip(cks, states, strict=True):
            for name, t in state.items():
                assert torch.equal(ck.read(name), t), name
                n = t.numel()
                assert torch.equal(ck.read_range(name, 2, n - 1), t.reshape(-1)[2 : n - 1])  # across chunks
        assert cks[0].span("emb.weight", 0, 5) is not None  # inside rank 0's rows: zero-copy
        assert cks[0].span("emb.weight", 10, 25) is None  # across the two ranks' rows: copied
    finally:
        for c in cks:
            c.close()
    extramerge.merge([tmp_path], method="custom", weights=[0.25, 0.75], output=tmp_path / "m.safetensors",
                     progress=False)  # fmt: skip
    merged = load_file(tmp_path / "m.safetensors")
    for name in states[0]:
        want = (0.25 * states[0][name].double() + 0.75 * states[1][name].double()).float()
        torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ malicious or corrupt input


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _copy(runs, tmp_path) -> Path:
    folder = tmp_path / "step-100"
    shutil.copytree(runs[0] / "dcp" / "step-100", folder)
    return folder


def _metadata(folder: Path):
    """The test's own .metadata (written by torch a moment ago), read by torch's own reader."""
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(folder)).read_metadata()


def _rewrite(folder: Path, meta) -> None:
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(meta, f)


@pytest.mark.parametrize("where", ["whole", "nested"])
def test_metadata_pickling_a_global_is_refused_unexecuted(runs, tmp_path, where):
    folder, marker = _copy(runs, tmp_path), tmp_path / "pwned"
    if where == "whole":
        obj = _Evil(marker)
    else:
        obj = _metadata(folder)
        obj.planner_data = {"x": _Evil(marker)}
    _rewrite(folder, obj)
    with pytest.raises(
        CheckpointError, match=r"\.metadata: refusing to unpickle the global '(posix|os)\.system'"
    ):
        load_checkpoints([folder])
    assert not marker.exists()
    assert main(["inspect", str(folder)]) == 2 and not marker.exists()


def _storage(meta, fqn: str):
    return next(v for k, v in meta.storage_data.items() if k.fqn == fqn)


def _bad_path(meta):
    _storage(meta, "transformer.wte.weight").relative_path = "../x"


def _bad_offset(meta):
    _storage(meta, "transformer.wte.weight").offset = 10**9


def _transformed(meta):
    _storage(meta, "transformer.wte.weight").transform_descriptors = ["zstd"]


def _overlap(meta):  # two chunks of 80 + 48 = 128 elements (the right count) that overlap in rows 6..9
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    name = "transformer.wte.weight"
    meta.state_dict_metadata[name].chunks = [
        ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([10, 8])),
        ChunkStorageMetadata(torch.Size([6, 0]), torch.Size([6, 8])),
    ]
    meta.storage_data[MetadataIndex(name, [6, 0])] = _storage(meta, name)


def _missing(meta):
    c = meta.state_dict_metadata["transformer.wte.weight"].chunks[0]
    c.sizes = torch.Size([8, 8])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_bad_path, "points outside the checkpoint folder"),
        (_bad_offset, "truncated: entry 'transformer.wte.weight' needs bytes up to"),
        (_transformed, "compressed or extension DCP storage"),
        (_overlap, r"tensor 'transformer.wte.weight': chunks at offsets \[0, 0\] and \[6, 0\] overlap"),
        (_missing, "tensor 'transformer.wte.weight': its chunks hold 64 elements but the tensor has 128"),
    ],
)
def test_corrupt_metadata_fields(runs, tmp_path, edit, message):
    folder = _copy(runs, tmp_path)
    meta = _metadata(folder)
    edit(meta)
    _rewrite(folder, meta)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoints([folder])


def test_truncated_distcp(runs, tmp_path):
    folder = _copy(runs, tmp_path)
    f = folder / "__0_0.distcp"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: truncated"):
        load_checkpoints([folder])


def test_corrupt_chunk_archive_named_on_read(runs, tmp_path):
    folder = _copy(runs, tmp_path)
    blob = _storage(_metadata(folder), "transformer.wte.weight")
    data = bytearray((folder / "__0_0.distcp").read_bytes())
    data[blob.offset : blob.offset + blob.length] = b"\0" * blob.length
    (folder / "__0_0.distcp").write_bytes(bytes(data))
    (ck,) = load_checkpoints([folder])  # opening reads .metadata only
    try:
        assert torch.equal(ck.read("transformer.ln_f.weight"), ck.read("transformer.ln_f.weight"))
        with pytest.raises(
            CheckpointError, match=r"__0_0\.distcp: tensor 'transformer.wte.weight', chunk at"
        ):
            ck.read("transformer.wte.weight")
    finally:
        ck.close()


def test_chunk_dtype_must_match_metadata(runs, tmp_path):
    folder = _copy(runs, tmp_path)
    meta = _metadata(folder)
    meta.state_dict_metadata["transformer.wte.weight"].properties.dtype = torch.float64
    _rewrite(folder, meta)
    (ck,) = load_checkpoints([folder])
    try:
        with pytest.raises(CheckpointError, match="stored as float32 .* but the metadata says float64"):
            ck.read_range("transformer.wte.weight", 0, 4)
    finally:
        ck.close()


def test_folder_without_checkpoints_names_dcp(tmp_path):
    (tmp_path / "empty" / "nothing").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="DCP checkpoint folders such as step_XXXX/, step-XXXX/"):
        load_checkpoints([tmp_path / "empty"])
