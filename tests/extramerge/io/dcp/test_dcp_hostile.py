"""Issue 21: hostile DCP ``.metadata`` files the restricted unpickler used to accept or choke on. Each is
refused with one line naming the file, exit 2 from the CLI, and leaves the process unchanged: a BUILD
that sets state on an allowlisted class, function or enum member (item 5), a pickle that amplifies its size
in memory (item 6), a compressed chunk archive (item 6), 200 000-deep transform descriptors (item 12);
and the chunk-cover check, now a sweep of signed boxes, still finds overlaps and gaps (item 7)."""

from __future__ import annotations

import io
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from _dcp_factory import dcp_save
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as md

from extramerge.cli import main
from extramerge.io import CheckpointError, load_checkpoints
from extramerge.io.dcp import metadata as dcp_metadata

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # dcp: "assuming ... a single process"

MDM = b"torch.distributed.checkpoint.metadata"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dcp") / "step-100"
    dcp_save({"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(4), "s": io.BytesIO(b"x")}, folder)
    return folder


def _copy(saved: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "step-100"
    shutil.copytree(saved, folder)
    return folder


def _refused(folder: Path, capsys, *needles: str) -> None:
    with pytest.raises(CheckpointError) as e:
        load_checkpoints([folder])
    assert "\n" not in str(e.value) and str(folder / ".metadata") in str(e.value), e.value
    capsys.readouterr()
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("extramerge: error: "), err
    for n in needles:
        assert n in err[0], (n, err)


def _meta(folder: Path):
    return FileSystemReader(str(folder)).read_metadata()


def _rewrite(folder: Path, meta) -> None:
    (folder / ".metadata").write_bytes(pickle.dumps(meta))


def _global(module: bytes, name: bytes) -> bytes:
    return b"c" + module + b"\n" + name + b"\n"


def _su(text: bytes) -> bytes:  # SHORT_BINUNICODE
    return b"\x8c" + bytes([len(text)]) + text


# Pushes a target, then state (None, {"pwned": 1}) (slot state: setattr works on classes), BUILD, POP.
def _build_then_pop(target: bytes, state_dict: bool = False) -> bytes:
    state = b"}" + _su(b"pwned") + b"K\x01s"
    return target + (state if state_dict else b"N" + state + b"\x86") + b"b0"


_MEMO = (10**6).to_bytes(4, "little")  # a memo index the protocol-2 body below never uses
_TARGETS = {
    "class": (_build_then_pop(_global(MDM, b"ChunkStorageMetadata")), lambda: vars(md.ChunkStorageMetadata)),
    "function": (
        _build_then_pop(_global(b"torch.serialization", b"_get_layout"), state_dict=True),
        lambda: vars(torch.serialization._get_layout),
    ),
    "enum member": (  # _MEM_FORMAT_ENCODING(0): a process-wide singleton
        _build_then_pop(_global(MDM, b"_MEM_FORMAT_ENCODING") + b"K\x00\x85R", state_dict=True),
        lambda: vars(md._MEM_FORMAT_ENCODING(0)),
    ),
    "memoized class": (  # the class stored in the memo (LONG_BINPUT), fetched back (LONG_BINGET), built
        _global(MDM, b"StorageMeta") + b"r" + _MEMO + b"0" + _build_then_pop(b"j" + _MEMO),
        lambda: vars(md.StorageMeta),
    ),
}


@pytest.mark.parametrize("what", list(_TARGETS))
def test_build_on_an_allowlisted_global_is_refused_and_changes_nothing(saved, tmp_path, capsys, what):
    folder = _copy(saved, tmp_path)
    prefix, state = _TARGETS[what]
    before = dict(state())
    body = pickle.dumps(_meta(folder), protocol=2)  # a valid Metadata, memo indices given (BINPUT)
    (folder / ".metadata").write_bytes(b"\x80\x04" + prefix + body)
    _refused(folder, capsys, "BUILD")
    assert dict(state()) == before and "pwned" not in state()


def test_the_valid_metadata_still_reads(saved):
    index = dcp_metadata.read_index(saved)
    assert set(index.tensors) == {"w", "b"} and set(index.objects) == {"s"}
    assert index.planner_data == {"w": ("w",), "b": ("b",), "s": ("s",)}


@pytest.fixture
def unpickled(monkeypatch) -> list:
    """Records each .metadata the restricted unpickler is asked to load."""
    calls: list = []

    class Recording(dcp_metadata._SafeUnpickler):
        def load(self):
            calls.append(self.where)
            return super().load()

    monkeypatch.setattr(dcp_metadata, "_SafeUnpickler", Recording)
    return calls


def test_nested_empty_dicts_are_refused_before_unpickling(saved, tmp_path, capsys, unpickled):
    folder = _copy(saved, tmp_path)
    n = 500_000  # 2 MB; unpickled: ~100 MB (50×) before this check
    (folder / ".metadata").write_bytes(b"\x80\x04}" + b"\x8c\x00}" * n + b"s" * n + b".")
    _refused(folder, capsys, "× its size in memory")
    assert unpickled == []


def test_a_huge_memo_index_is_refused_before_unpickling(saved, tmp_path, capsys, unpickled):
    folder = _copy(saved, tmp_path)  # LONG_BINPUT 2**31: the C unpickler would allocate 16 GiB of memo
    (folder / ".metadata").write_bytes(b"\x80\x04N" + b"r" + (2**31).to_bytes(4, "little") + b".")
    _refused(folder, capsys, "× its size in memory")
    assert unpickled == []


def test_truncated_pickle_is_one_line(saved, tmp_path, capsys):
    folder = _copy(saved, tmp_path)
    (folder / ".metadata").write_bytes((folder / ".metadata").read_bytes()[:200])
    _refused(folder, capsys, "corrupt DCP metadata")


def test_deep_transform_descriptors_are_one_line(saved, tmp_path, capsys):
    folder = _copy(saved, tmp_path)
    meta = _meta(folder)
    next(iter(meta.storage_data.values())).transform_descriptors = "DEEP"
    data = pickle.dumps(meta, protocol=2)  # no frames: a string can be swapped for other opcodes
    n = 200_000  # [[[...]]] 200 000 deep: n + 1 EMPTY_LIST, then n APPEND
    data = data.replace(b"X\x04\x00\x00\x00DEEP", b"]" * (n + 1) + b"a" * n)
    (folder / ".metadata").write_bytes(data)
    _refused(folder, capsys, "transforms")


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("planner_data", {"w": ("w",), "b": [("b",)], "s": ("s",)}, "planner_data"),
        ("planner_data", ["w"], "planner_data"),
        ("storage_meta", {"checkpoint_id": "x"}, "storage_meta"),
        ("storage_meta", md.StorageMeta(modules=[torch.Size([1])]), "storage_meta"),
    ],
)
def test_planner_data_and_storage_meta_are_validated(saved, tmp_path, capsys, field, value, needle):
    folder = _copy(saved, tmp_path)
    meta = _meta(folder)
    setattr(meta, field, value)
    _rewrite(folder, meta)
    _refused(folder, capsys, needle)


def test_compressed_chunk_archive_is_refused_before_torch_inflates_it(saved, tmp_path, monkeypatch):
    folder = _copy(saved, tmp_path)
    meta = _meta(folder)
    (key, info) = next((k, v) for k, v in meta.storage_data.items() if k.fqn == "w")
    distcp = folder / info.relative_path
    raw = distcp.read_bytes()
    archive = raw[info.offset : info.offset + info.length]
    src = zipfile.ZipFile(io.BytesIO(archive))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for r in src.infolist():
            data = src.read(r)
            if r.filename.endswith("data.pkl"):
                data = data[:-1] + b"N" * 2_000_000 + b"0" * 2_000_000 + b"."  # inflates 4 MB, packs ~10 KB
            z.writestr(r, data, compress_type=zipfile.ZIP_DEFLATED if "data.pkl" in r.filename else None)
    new = out.getvalue()
    distcp.write_bytes(raw[: info.offset] + new + raw[info.offset + info.length :])
    shift = len(new) - info.length
    for v in meta.storage_data.values():
        if v.relative_path == info.relative_path and v.offset > info.offset:
            v.offset += shift
    info.length = len(new)
    _rewrite(folder, meta)
    (ck,) = load_checkpoints([folder])
    loads: list = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(a) or real(*a, **kw))
    try:
        with pytest.raises(CheckpointError, match=r"data\.pkl' of its zip archive is compressed"):
            ck.read("w")
    finally:
        ck.close()
    assert loads == []  # refused before torch.load could inflate it
