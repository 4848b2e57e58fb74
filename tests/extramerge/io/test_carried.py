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
