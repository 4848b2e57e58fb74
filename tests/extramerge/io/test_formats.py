"""The format registry (``extramerge.io.formats``): every format name has one entry; a file format's
suffixes map back to it; what each entry says is what the writer, the readers and the merge engine do
(names, folders, the whole output collected in memory, ranked output by byte ranges or whole files per
rank), and a test-registered format with one flag changed changes the engine's choice."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from _ckpt_factory import make_safetensors_files

from extramerge import distributed
from extramerge.engine import merge as merge_mod
from extramerge.engine import merge_weights, ranked
from extramerge.io import (
    FORMATS,
    TORCH_SUFFIXES,
    WEIGHT_SUFFIXES,
    CheckpointError,
    TensorInfo,
    default_format,
    formats,
    load_checkpoints,
    open_checkpoint,
    write_checkpoint,
)
from extramerge.io.raw import DIRECT_BLOCK

WEIGHTS = [0.25, 0.75]


def _tensors(infos):
    for name, info in infos.items():
        yield name, np.arange(info.numel, dtype=np.float32).reshape(info.shape)


INFOS = {n: TensorInfo(n, s, "F32") for n, s in [("a.weight", (4, 8)), ("b.weight", (8,)), ("c", (3, 3))]}


def _files(out: Path) -> dict[str, bytes]:
    """Every file of an output but its merge.json record (which carries a timestamp), by relative path."""
    paths = sorted(out.rglob("*")) if out.is_dir() else [out]
    return {
        str(p.relative_to(out) if out.is_dir() else p.name): p.read_bytes()
        for p in paths
        if p.is_file() and not p.name.endswith("merge.json")
    }


# ------------------------------------------------------------------------------------------ the table


def test_every_format_name_has_one_entry():
    assert FORMATS == tuple(formats.REGISTRY)
    assert set(FORMATS) == {"hf-safetensors", "hf-bin", "safetensors", "torch", "dcp", "megatron"}
    assert all(formats.get(name).name == name for name in FORMATS)
    hf = {f.name: (f.weights_file, f.index_file) for f in formats.REGISTRY.values() if f.hf_stem}
    assert hf == {  # the names transformers' save_pretrained writes
        "hf-safetensors": ("model.safetensors", "model.safetensors.index.json"),
        "hf-bin": ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    }
    with pytest.raises(CheckpointError, match=r"unknown output format 'gguf'; choose one of hf-safetensors"):
        formats.get("gguf")


def test_file_suffixes_map_back_to_their_format():
    file_formats = [f for f in formats.REGISTRY.values() if not f.folder]
    assert {s for f in file_formats for s in f.suffixes} == set(WEIGHT_SUFFIXES)
    assert formats.get("torch").suffixes == TORCH_SUFFIXES
    for fmt in file_formats:
        for suffix in fmt.suffixes:
            assert formats.by_suffix(suffix) is fmt
            assert default_format(f"out/merged{suffix}", None) == fmt.name
    assert formats.by_suffix(".bin").name == "torch"  # an hf-bin folder holds .bin files, a .bin is torch
    assert formats.by_suffix(".distcp") is None and formats.by_suffix("") is None


@pytest.mark.parametrize("suffix", WEIGHT_SUFFIXES)
def test_a_file_written_by_suffix_opens_as_that_format(tmp_path, suffix):
    out = tmp_path / f"merged{suffix}"
    write_checkpoint(out, _tensors(INFOS), infos=INFOS, fsync=False)
    ck = open_checkpoint(out)
    try:
        assert ck.format == formats.by_suffix(suffix).name
        assert list(ck.infos) == list(INFOS)
    finally:
        ck.close()


@pytest.mark.parametrize("name", FORMATS)
def test_each_format_writes_what_its_entry_says_and_reads_back_as_itself(tmp_path, name):
    fmt = formats.get(name)
    out = tmp_path / "out"
    res = write_checkpoint(out, _tensors(INFOS), infos=INFOS, fmt=name, fsync=False, shard_size=64)
    assert out.is_dir()  # a file format without a weight-file name goes into that folder
    names = {p.relative_to(out).as_posix() for p in res.files}
    if fmt.hf_stem is not None:  # shards above 64 bytes and their index, named by the entry
        assert fmt.index_file in names
        stem, ext = fmt.weights_file[: -len(fmt.suffixes[0])], fmt.suffixes[0]
        assert any(n.startswith(f"{stem}-00001-of-") and n.endswith(ext) for n in names)
    elif not fmt.folder:
        assert f"model{fmt.suffixes[0]}" in names
    if fmt.run_root:
        assert "latest_checkpointed_iteration.txt" in names and "iter_0000000/.metadata" in names
    elif fmt.folder and fmt.hf_stem is None:
        assert ".metadata" in names
    with pytest.raises(CheckpointError, match="writes a folder") if fmt.folder else contextlib.nullcontext():
        write_checkpoint(tmp_path / "x.safetensors", _tensors(INFOS), infos=INFOS, fmt=name, fsync=False)
    # a file format's file (model.safetensors in a folder alone is read as an HF folder)
    (ck,) = load_checkpoints([out if fmt.folder else out / f"model{fmt.suffixes[0]}"])
    try:
        assert ck.format == name
        assert {formats.get(ck.format).reader} <= {type(s) for s in ck.sources} | {None}
        for n, info in INFOS.items():
            np.testing.assert_array_equal(ck.read(n, numpy=True), np.arange(info.numel).reshape(info.shape))
    finally:
        ck.close()


# ------------------------------------------------------------------------------ the engine's decisions


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setattr(merge_mod, "rss_now", lambda: 0)  # a projected peak that depends on the plan alone
    return make_safetensors_files(tmp_path / "run", n=2)


def _projected(ckpts, out, fmt) -> int:
    return merge_weights(ckpts, WEIGHTS, out, fmt=fmt, dry_run=True, progress=False).projected_peak_rss_bytes


def _with(monkeypatch, base: str, **flags) -> str:
    """Register a format 'fake' that is ``base`` with ``flags`` changed; returns its name."""
    fake = dataclasses.replace(formats.get(base), name="fake", **flags)
    monkeypatch.setitem(formats.REGISTRY, "fake", fake)
    return "fake"


def test_the_memory_plan_counts_the_collected_output_when_the_entry_collects(run, tmp_path, monkeypatch):
    ckpts = load_checkpoints(run)
    base = _projected(ckpts, tmp_path / "st", "safetensors")
    written = sum(i.nbytes for i in ckpts[-1].infos.values())
    for name in FORMATS:
        grow = written - 2 * DIRECT_BLOCK if formats.get(name).collects else 0
        assert _projected(ckpts, tmp_path / name, name) == base + grow, name
    fake = _with(monkeypatch, "safetensors", collects=True)
    assert _projected(ckpts, tmp_path / "fake", fake) == base + written - 2 * DIRECT_BLOCK


def test_the_memory_plan_counts_pages_read_when_an_input_format_keeps_them(run, tmp_path, monkeypatch):
    ckpts = load_checkpoints(run)
    assert not formats.get(ckpts[0].format).resident_reads
    plain = merge_weights(ckpts, WEIGHTS, tmp_path / "a", fmt="safetensors", dry_run=True, progress=False)
    kept = dataclasses.replace(formats.get("safetensors"), resident_reads=True)
    monkeypatch.setitem(formats.REGISTRY, "safetensors", kept)
    now = _projected(ckpts, tmp_path / "b", "safetensors")
    assert now == plain.projected_peak_rss_bytes + plain.bytes_read


@contextlib.contextmanager
def _one_rank(monkeypatch):
    """This process alone as a torch.distributed group (gloo), which the engine sees as a ranked run."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with monkeypatch.context() as m:
            group = distributed.Group(0, 1)
            m.setattr(distributed, "current", lambda: group)
            yield group
    finally:
        dist.destroy_process_group()


def test_ranked_output_follows_the_entries(run, tmp_path, monkeypatch):
    """Under a process group, a format is refused unless its entry is ranked (before anything is read, a
    dry run too), and its ranks write whole files exactly when the entry says so; either way the output
    equals one process's byte for byte."""
    shares = []
    real_share = ranked.dcp_share
    monkeypatch.setattr(ranked, "dcp_share", lambda *a, **k: shares.append(k["fmt"]) or real_share(*a, **k))
    ckpts = load_checkpoints(run)
    alone = {}
    for name in FORMATS:
        merge_weights(ckpts, WEIGHTS, tmp_path / "one" / name, fmt=name, progress=False, fsync=False)
        alone[name] = _files(tmp_path / "one" / name)
    fake = _with(monkeypatch, "dcp")  # the dcp entry under another name: the flags decide, not the name
    with _one_rank(monkeypatch) as group:
        for name in (*FORMATS, fake):
            fmt, out = formats.get(name), tmp_path / "ranked" / name
            if not fmt.ranked:
                with pytest.raises(ValueError, match=f"output format {name} is written by one process"):
                    merge_weights(ckpts, WEIGHTS, out, fmt=name, dry_run=True, progress=False)
                continue
            summary = merge_weights(ckpts, WEIGHTS, out, fmt=name, progress=False, fsync=False)
            assert summary.processes == 1
            assert _files(out) == alone["dcp" if name == fake else name], name
        unranked = _with(monkeypatch, "safetensors", ranked=False)
        with pytest.raises(ValueError, match="output format fake is written by one process"):
            merge_weights(ckpts, WEIGHTS, tmp_path / "unranked", fmt=unranked, dry_run=True, progress=False)
        with pytest.raises(ValueError, match="output format fake is written by one process"):
            ranked.write_ranked(
                group, [], iter(()), output=tmp_path / "unranked", fmt=unranked, template=None, infos=INFOS,
                shard_size=2**30, metadata=None, record=None, force=False, inputs=(), fsync=False,
            )  # fmt: skip
    assert shares == [n for n in FORMATS if formats.get(n).whole_files_per_rank] + ["fake"]
