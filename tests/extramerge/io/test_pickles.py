"""Issue 21 item 6: pickles are scanned before any unpickler sees them (``extramerge.io.pickles``): a
budget proportional to their size, compressed zip records refused, and (for DCP metadata) BUILD only on
what the pickle created. The same scanner guards ``.pt`` files, DCP chunk archives and ``.metadata``."""

from __future__ import annotations

import io
import pickle
import pickletools
import zipfile
from collections import OrderedDict

import pytest
import torch
from _ckpt_factory import make_torch_files

from extramerge.cli import main
from extramerge.io import CheckpointError, open_checkpoint, pickles


def _data_pkl(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    z = zipfile.ZipFile(buf)
    return z.read(next(r for r in z.infolist() if r.filename.endswith("/data.pkl")))


def test_ordinary_pickles_pass_well_inside_the_budget():
    sd = OrderedDict((f"h.{i}.weight", torch.zeros(2, 2)) for i in range(300))
    sd._metadata = {"": {"version": 1}}  # what state_dict() carries: a BUILD on an OrderedDict
    for obj in (sd, {"model": dict(sd), "iter_num": 3, "config": {"lr": 1e-3, "name": "x"}}):
        data = _data_pkl(obj)
        assert pickles.scan(data, "x") == len(data)
    plain = pickle.dumps({"a": [1, 2.5, "s", b"b", (1, 2)], "b": {3, 4}}, protocol=4)
    assert pickles.scan(plain, "x") == len(plain)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"\x80\x04(" + b"}" * 200_000 + b"l.", "40× its size in memory"),  # 1 byte each, ~80× unpickled
        (b"\x80\x04N" + b"r" + (2**31).to_bytes(4, "little") + b".", "40× its size in memory"),  # memo
        (b"\x80\x04X\xff\xff\xff\x7fabc.", "corrupt pickle"),  # a string longer than the pickle
        (b"\x80\x04Nh\x05.", "memo key 5 was never stored"),
        (b"\x80\x04(N", "corrupt pickle"),  # no STOP
    ],
)
def test_hostile_pickles_are_refused_without_building_anything(data, needle):
    with pytest.raises(CheckpointError, match=needle):
        pickles.scan(data, "f.pkl")


def test_build_is_limited_only_where_the_caller_asks():
    evil = b"\x80\x02cbuiltins\nobject\n}\x8c\x01aK\x01sb."  # BUILD on a global
    assert pickles.scan(evil, "x") == len(evil)  # torch's own unpickler judges .pt files' BUILD
    with pytest.raises(CheckpointError, match="sets the state of a class or function it did not create"):
        pickles.scan(evil, "x", build={("builtins", "object")})
    made = b"\x80\x02cbuiltins\nobject\n)\x81}\x8c\x01aK\x01sb."  # NEWOBJ, then BUILD on the instance
    assert pickles.scan(made, "x", build={("builtins", "object")}) == len(made)


def _recompressed(path, data_pkl: bytes | None = None) -> None:
    """Rewrite the torch.save archive ``path`` with its data.pkl DEFLATE-compressed (and replaced)."""
    src = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for r in src.infolist():
            data = src.read(r)
            if r.filename.endswith("/data.pkl"):
                r.compress_type = zipfile.ZIP_DEFLATED
                data = data if data_pkl is None else data_pkl
            z.writestr(r, data)
    path.write_bytes(out.getvalue())


@pytest.fixture
def torch_loads(monkeypatch) -> list:
    calls: list = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    return calls


def test_pt_with_a_compressed_data_pkl_is_refused_before_torch_load(tmp_path, capsys, torch_loads):
    (p,) = make_torch_files(tmp_path, n=1)
    _recompressed(p)
    with pytest.raises(CheckpointError, match=r"step_000100\.pt: record '.*data\.pkl' of its zip archive is"):
        open_checkpoint(p)
    assert torch_loads == []
    capsys.readouterr()
    assert main(["inspect", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is compressed" in err[0], err


def test_pt_whose_data_pkl_amplifies_is_refused_before_torch_load(tmp_path, torch_loads):
    (p,) = make_torch_files(tmp_path, n=1)
    src = zipfile.ZipFile(io.BytesIO(p.read_bytes()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:  # stored, as torch.save writes: 1 MB of empty dicts
        for r in src.infolist():
            data = src.read(r)
            z.writestr(r, b"\x80\x02(" + b"}" * 2**20 + b"l." if r.filename.endswith("/data.pkl") else data)
    p.write_bytes(out.getvalue())
    with pytest.raises(CheckpointError, match=r"data\.pkl\): refusing a pickle that would take more than"):
        open_checkpoint(p)
    assert torch_loads == []


def test_pt_files_still_load_zip_and_legacy(tmp_path):
    (p,) = make_torch_files(tmp_path, n=1)
    legacy = tmp_path / "legacy.pt"
    sd = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    for path in (p, legacy):
        ck = open_checkpoint(path)
        try:
            assert ck.infos
        finally:
            ck.close()
    ck = open_checkpoint(legacy)
    try:
        assert torch.equal(ck.read("w"), sd["w"])
    finally:
        ck.close()


def _objects():
    sd = OrderedDict(a=1, b=[1.5, -(2**70), "é\n", b"\x00" * 300, bytearray(b"z")])
    return [
        sd,
        {"x": (1, 2, 3), "y": {frozenset({1}), 2}, "z": [None, True, False, 2**31, -1, 3.25, "s" * 300]},
        [sd, sd, (sd,)],  # memo GETs
        OrderedDict,  # a global
    ]


@pytest.mark.parametrize("protocol", range(6))
def test_scan_walks_every_protocol_as_pickletools_does(protocol):
    for obj in _objects():
        data = pickle.dumps(obj, protocol=protocol)
        ends = [pos for _, _, pos in pickletools.genops(data)]
        assert pickles.scan(data, "x") == ends[-1] + 1 == len(data)
        assert pickles.scan(b"junk" + data, "x", start=4) == len(data) + 4
        for cut in range(1, len(data), max(1, len(data) // 40)):  # every truncation is refused
            with pytest.raises(CheckpointError, match="corrupt pickle"):
                pickles.scan(data[:cut], "x")
