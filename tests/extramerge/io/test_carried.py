"""Issue 21 item 8 (part): what an output copies from the newest input besides the merged tensors is
counted in the merge's projection (``Format.carried``): a sparse side file of an HF folder (``truncate
-s 512M notes.txt``: the dry run said 140 KiB, the output took 513 MB) and a DCP byte entry (its length,
whatever a sparse .distcp stores: the dry run said "written 160 B"). The disk check then refuses what
cannot fit, before anything is written."""

from __future__ import annotations

import io
from collections import namedtuple

import pytest
import torch
from _ckpt_factory import make_hf_run
from _dcp_factory import dcp_save

import extramerge
from extramerge.engine import merge as merge_mod
from extramerge.io import CheckpointError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # dcp: "assuming ... a single process"


def test_a_sparse_side_file_counts_whole(tmp_path):
    run = make_hf_run(tmp_path / "run", n=2)
    before = extramerge.merge(run, method="sma", output=tmp_path / "a", dry_run=True, progress=False)
    with open(run[-1] / "notes.txt", "wb") as f:
        f.truncate(512 * 2**20)  # sparse: no block stored
    after = extramerge.merge(run, method="sma", output=tmp_path / "b", dry_run=True, progress=False)
    assert after.bytes_written - before.bytes_written == 512 * 2**20


def test_a_dcp_byte_entry_counts_its_length(tmp_path):
    runs = []
    for step in (100, 200):
        folder = tmp_path / f"step-{step}"
        blob = b"\0" * (8 * 2**20) if step == 200 else b"x"
        dcp_save({"w": torch.ones(4, 4) * step, "blob": io.BytesIO(blob)}, folder)
        runs.append(folder)
    s = extramerge.merge(runs, method="sma", output=tmp_path / "out", dry_run=True, progress=False)
    assert s.bytes_written >= 8 * 2**20 + 64


def test_the_disk_check_counts_them(tmp_path, monkeypatch):
    run = make_hf_run(tmp_path / "run", n=2)
    with open(run[-1] / "notes.txt", "wb") as f:
        f.truncate(512 * 2**20)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(merge_mod.shutil, "disk_usage", lambda p: usage(2**40, 0, 256 * 2**20))
    with pytest.raises(CheckpointError, match="needs .* but only 256"):
        extramerge.merge(run, method="sma", output=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------- what reading takes besides the merge's own buffers


class _Needed(Exception):
    pass


def _memory_needed(monkeypatch, paths, tmp_path) -> int:
    """The bytes the merge's memory check asks for (the merge stops there)."""
    seen = []

    def record(need, what):
        seen.append(need)
        raise _Needed

    monkeypatch.setattr(merge_mod, "require_memory", record)
    with pytest.raises(_Needed):
        extramerge.merge(paths, method="sma", output=tmp_path / "out.safetensors", progress=False)
    return seen[0]


def test_strided_torch_tensors_count_their_contiguous_copies(tmp_path, monkeypatch):
    """Issue 21 item 8: a tensor saved as an expand (stride 0) is a few bytes in the file and is copied
    contiguous when read (two 1.6 KB .pt files: projected 1.02 GiB, used 1.66 GiB)."""
    n = 2**22  # 16 MiB of float32 each
    plain, strided = [], []
    for k in range(2):
        p = tmp_path / "plain" / f"step_{k + 1}00.pt"
        q = tmp_path / "strided" / f"step_{k + 1}00.pt"
        p.parent.mkdir(exist_ok=True)
        q.parent.mkdir(exist_ok=True)
        torch.save({"w": torch.full((n,), float(k))}, p)
        torch.save({"w": torch.full((1,), float(k)).expand(n)}, q)
        plain.append(p)
        strided.append(q)
    assert q.stat().st_size < 4096
    extra = _memory_needed(monkeypatch, strided, tmp_path) - _memory_needed(monkeypatch, plain, tmp_path)
    assert extra >= 2 * n * 4, extra


def test_dcp_tensors_read_in_slabs_count_them(tmp_path, monkeypatch):
    """A DCP tensor split along dim 1 (row-parallel halves) is assembled in slabs of whole rows."""
    from extramerge.io import TensorInfo
    from extramerge.io.dcp.save import OutChunk, write_distcp, write_metadata

    rows, cols = 2, 2**22  # 32 MiB of float32: one slab of both rows per checkpoint

    def write(folder, boxes, value):
        folder.mkdir(parents=True)
        plan = [[OutChunk("w", o, s, 0, 0) for o, s in boxes]]
        full = torch.full((rows, cols), value)
        got = write_distcp(folder, 0, plan[0], lambda c: full[tuple(slice(o, o + s) for o, s in
                           zip(c.offsets, c.sizes, strict=True))].clone(), fsync=False)[0]  # fmt: skip
        write_metadata(folder, {"w": TensorInfo("w", (rows, cols), torch.float32)}, plan, got, fsync=False)
        return folder

    by_rows = [((0, 0), (1, cols)), ((1, 0), (1, cols))]
    by_cols = [((0, 0), (rows, cols // 2)), ((0, cols // 2), (rows, cols // 2))]
    flat = [write(tmp_path / "rows" / f"step-{k}", by_rows, float(k)) for k in (1, 2)]
    slabs = [write(tmp_path / "cols" / f"step-{k}", by_cols, float(k)) for k in (1, 2)]
    extra = _memory_needed(monkeypatch, slabs, tmp_path) - _memory_needed(monkeypatch, flat, tmp_path)
    assert extra >= 2 * rows * cols * 4, extra


def test_a_merge_reports_the_bytes_it_copied_besides_the_tensors(tmp_path):
    """The summary after the merge says what the dry run said: side files count in both."""
    run = make_hf_run(tmp_path / "run", n=2)
    (run[-1] / "notes.txt").write_bytes(b"x" * 100_000)
    dry = extramerge.merge(run, method="sma", output=tmp_path / "a", dry_run=True, progress=False)
    done = extramerge.merge(run, method="sma", output=tmp_path / "a", progress=False)
    assert done.bytes_written == dry.bytes_written >= 100_000
