"""Readers, validation and the streaming/atomic writer of extramerge.io."""

from __future__ import annotations

import json
import os
import stat
import struct

import pytest
import torch
from _ckpt_factory import load_state, make_hf_run, make_safetensors_files, make_torch_files, toy_state
from safetensors import safe_open
from safetensors.torch import save_file

from extramerge.io import (
    CheckpointError,
    TensorInfo,
    check_compatible,
    load_checkpoints,
    open_checkpoint,
    parse_step,
    safetensors_order,
    write_checkpoint,
)


def _infos(state):
    return {k: TensorInfo(k, tuple(v.shape), v.dtype) for k, v in state.items()}


# ------------------------------------------------------------------------------------------------ reading


@pytest.mark.parametrize(
    "name, step",
    [
        ("step_001000", 1000),
        ("checkpoint-2000", 2000),
        ("iter_0003000", 3000),
        ("model_004000.pt", 4000),
        ("ckpt-5000.pt", 5000),
        ("global_step6000", 6000),
        ("step7000.safetensors", 7000),
        ("8000", 8000),
        ("run_a/step_000900/", 900),
        ("ckpt.pt", None),
        ("final", None),
        ("gpt2.safetensors", None),
    ],
)
def test_parse_step(name, step):
    assert parse_step(name) == step


def test_safetensors_file_infos_lazy_and_reads(tmp_path):
    (p,) = make_safetensors_files(tmp_path, n=1)
    ck = open_checkpoint(p)
    state = load_state(p)
    assert ck.format == "safetensors" and ck.step == 100
    assert set(ck.infos) == set(state)
    assert list(ck.infos) == list(safetensors_order(ck.infos))  # stored (data) order
    for name, t in state.items():
        assert ck.infos[name].shape == tuple(t.shape) and ck.infos[name].dtype == t.dtype
        assert torch.equal(ck.read(name), t)
    name = "transformer.h.0.mlp.c_fc.weight"
    buf = torch.empty(1024, dtype=torch.uint8)
    assert torch.equal(ck.read_range(name, 5, 37, buf), state[name].reshape(-1)[5:37])
    assert ck.nbytes == sum(i.nbytes for i in ck.infos.values())
    info = ck.infos["transformer.h.0.attn.counter"]
    assert not info.is_float and info.numel == 3 and info.nbytes == 24


@pytest.mark.parametrize("nested", [None, "nanogpt", "state_dict"])
@pytest.mark.parametrize("prefix", [None, "_orig_mod.", "module."])
def test_torch_file_nesting_prefixes_and_tied_alias(tmp_path, nested, prefix):
    (p,) = make_torch_files(tmp_path, n=1, nested=nested, prefix=prefix, tied=True)
    ck = open_checkpoint(p)
    assert ck.format == "torch" and ck.step == 100
    assert "lm_head.weight" not in ck.infos and ck.aliases == {"lm_head.weight": "transformer.wte.weight"}
    assert all(not k.startswith(("_orig_mod.", "module.")) for k in ck.infos)
    assert torch.equal(ck.read("lm_head.weight"), ck.read("transformer.wte.weight"))
    layout = ck.torch_layout
    assert layout["nest"] == {"nanogpt": "model", "state_dict": "state_dict", None: None}[nested]
    assert layout["prefixes"] == ([prefix] if prefix else [])
    if nested == "nanogpt":
        assert ck.extras["iter_num"] == 100 and ck.extras["config"]["dataset"] == "toy"
        assert "optimizer" not in ck.extras and layout["dropped"] == ["optimizer"]


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin", "sharded-bin"])
def test_hf_folders(tmp_path, fmt):
    (p,) = make_hf_run(tmp_path, "gpt2", n=1, fmt=fmt)
    ck = open_checkpoint(p)
    state = load_state(p)
    assert ck.format == ("hf-bin" if "bin" in fmt else "hf-safetensors")
    assert ck.step == 100 and ck.config["model_type"] == "gpt2"
    if fmt == "sharded":
        assert len(ck.files) > 1
    assert set(ck.infos) | set(ck.aliases) == set(state)
    for name, t in state.items():
        assert torch.equal(ck.read(name), t)


def test_folder_expansion_sorts_by_step_and_skips_outputs(tmp_path):
    run = tmp_path / "run"
    make_safetensors_files(run, n=3, steps=[900, 1000, 80])  # lexical order would be wrong
    (run / "optim_000900_rank0.pt").write_bytes(b"not weights")
    (run / "notes.txt").write_text("hello")
    (run / "merged").mkdir()
    (run / "merged" / "merge.json").write_text("{}")
    (run / "merged" / "model.safetensors").write_bytes((run / "step_000080.safetensors").read_bytes())
    cks = load_checkpoints([run])
    assert [c.step for c in cks] == [80, 900, 1000]
    # explicit lists keep the given order
    files = sorted(run.glob("step_*.safetensors"), reverse=True)
    assert [c.step for c in load_checkpoints(files)] == [1000, 900, 80]


def test_folder_with_unordered_children_is_refused(tmp_path):
    make_safetensors_files(tmp_path, n=1)
    (tmp_path / "final.safetensors").write_bytes((tmp_path / "step_000100.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="final.safetensors.*no step number"):
        load_checkpoints([tmp_path])


def test_folder_with_two_checkpoints_of_one_step_is_refused(tmp_path):
    (p,) = make_safetensors_files(tmp_path, n=1)
    (tmp_path / "model_000100.safetensors").write_bytes(p.read_bytes())
    with pytest.raises(CheckpointError, match="both carry step 100"):
        load_checkpoints([tmp_path])


def test_folder_with_one_weight_file_is_a_checkpoint(tmp_path):
    (tmp_path / "iter_0003000").mkdir()
    torch.save(toy_state(), tmp_path / "iter_0003000" / "model.pt")
    (ck,) = load_checkpoints([tmp_path / "iter_0003000"])
    assert ck.step == 3000 and ck.format == "torch"


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: p.write_text("hello"), "not a checkpoint"),
        (lambda p: p.mkdir(), "not a checkpoint"),
        (lambda p: None, "no such file"),
    ],
)
def test_not_a_checkpoint(tmp_path, make, expected):
    p = tmp_path / "thing"
    make(p)
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoints([p])


def test_hub_reference_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="no-such-org/no-such-model@step1000.*(Hub|huggingface_hub)"):
        load_checkpoints(["no-such-org/no-such-model@step1000"])


# ----------------------------------------------------------------------------------------- bad inputs


def _header(p):
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw, n


def test_truncated_safetensors_fails_at_open(tmp_path):
    (p,) = make_safetensors_files(tmp_path, n=1)
    raw = p.read_bytes()
    p.write_bytes(raw[:-10])
    with pytest.raises(
        CheckpointError, match=r"step_000100.safetensors: truncated file: tensor '.*' ends at"
    ):
        open_checkpoint(p)


def test_safetensors_header_length_beyond_file(tmp_path):
    (p,) = make_safetensors_files(tmp_path, n=1)
    raw, n = _header(p)
    p.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])
    with pytest.raises(CheckpointError, match="header length .* exceeds"):
        open_checkpoint(p)


def test_safetensors_bad_json(tmp_path):
    (p,) = make_safetensors_files(tmp_path, n=1)
    raw, n = _header(p)
    p.write_bytes(raw[:8] + b"{" * n + raw[8 + n :])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        open_checkpoint(p)


def test_safetensors_offsets_inconsistent(tmp_path):
    (p,) = make_safetensors_files(tmp_path, n=1)
    raw, n = _header(p)
    header = json.loads(raw[8 : 8 + n])
    header["transformer.ln_f.weight"]["data_offsets"][1] += 4
    body = json.dumps(header).encode()
    p.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])
    with pytest.raises(CheckpointError, match="'transformer.ln_f.weight' has data offsets inconsistent"):
        open_checkpoint(p)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_torch_file(tmp_path, damage):
    (p,) = make_torch_files(tmp_path, n=1, nested="nanogpt")
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"\x80\x02garbage" * 10)
    with pytest.raises(CheckpointError, match="step_000100.pt: corrupt or not a PyTorch checkpoint"):
        open_checkpoint(p)


def test_torch_file_without_state_dict(tmp_path):
    p = tmp_path / "step_000100.pt"
    torch.save({"iter_num": 3, "config": {"a": 1}}, p)
    with pytest.raises(CheckpointError, match="no state dict of tensors found"):
        open_checkpoint(p)


def test_check_compatible_names_first_offending_tensor_and_files(tmp_path):
    a, b = make_safetensors_files(tmp_path, n=2)
    state = load_state(b)
    state["transformer.h.0.attn.c_attn.weight"] = torch.zeros(8, 16)
    save_file(state, str(b))
    cks = load_checkpoints([a, b])
    msg = (
        "tensor 'transformer.h.0.attn.c_attn.weight' has shape (8, 24) in step_000100.safetensors but "
        "(8, 16) in step_000200.safetensors"
    )
    with pytest.raises(CheckpointError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        check_compatible(cks)
    state.pop("transformer.h.0.attn.c_attn.weight")
    save_file(state, str(b))
    with pytest.raises(
        CheckpointError, match="'transformer.h.0.attn.c_attn.weight' is in step_000100.* missing"
    ):
        check_compatible(load_checkpoints([a, b]))
    state = load_state(a)
    state["transformer.ln_f.weight"] = state["transformer.ln_f.weight"].double()
    save_file(state, str(b))
    with pytest.raises(CheckpointError, match="'transformer.ln_f.weight' has dtype float32 .* but float64"):
        check_compatible(load_checkpoints([a, b]))


# ------------------------------------------------------------------------------------------------ writing


def _mixed_state():
    g = torch.Generator().manual_seed(3)
    return {
        "b": torch.randn(5, 3, generator=g),
        "a": torch.randn(7, generator=g).to(torch.bfloat16),
        "c": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "d": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "e": torch.tensor([True, False]),
        "f": torch.randn(3, generator=g).to(torch.float16),
        "g": torch.zeros(0, 4),
        "h": torch.tensor(2.5),
    }


def test_streaming_safetensors_is_byte_identical_to_save_file(tmp_path):
    state = _mixed_state()
    save_file(state, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    infos = safetensors_order(_infos(state))
    res = write_checkpoint(
        tmp_path / "out.safetensors", ((k, state[k]) for k in infos), infos=infos, metadata={"format": "pt"}
    )
    assert res.files == [tmp_path / "out.safetensors"]
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        for k, v in state.items():
            assert torch.equal(f.get_tensor(k), v)


def test_streaming_accepts_pieces_in_any_order_given(tmp_path):
    state = _mixed_state()
    infos = _infos(state)  # not safetensors' order: still a valid file

    def pieces():
        for k, v in state.items():
            flat = v.reshape(-1)
            if flat.numel() > 4:
                yield k, flat[:4]
                yield k, flat[4:]
            else:
                yield k, v

    write_checkpoint(tmp_path / "out.safetensors", pieces(), infos=infos)
    got = load_state(tmp_path / "out.safetensors")
    assert all(torch.equal(got[k], v) for k, v in state.items())


def test_sharded_hf_output_has_index_and_copies_config(tmp_path):
    (src,) = make_hf_run(tmp_path / "in", "llama", n=1)
    ck = open_checkpoint(src)
    state = load_state(src)
    res = write_checkpoint(
        tmp_path / "out",
        ((k, state[k]) for k in ck.infos),
        infos=ck.infos,
        template=ck,
        shard_size=30_000,
        record={"note": "x"},
    )
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert set(index["weight_map"]) == set(ck.infos)
    assert index["metadata"]["total_size"] == ck.nbytes
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
    assert json.loads((out / "merge.json").read_text()) == {"note": "x"}
    assert res.bytes_written == ck.nbytes
    got = load_state(out)
    assert all(torch.equal(got[k], v) for k, v in state.items())
    with safe_open(str(out / shards[0]), "pt") as f:
        assert f.metadata()["format"] == "pt"


def test_config_dtype_follows_output_dtype(tmp_path):
    (src,) = make_hf_run(tmp_path / "in", "gpt2", n=1)
    ck = open_checkpoint(src)
    infos = {k: TensorInfo(k, i.shape, torch.bfloat16) for k, i in ck.infos.items()}
    write_checkpoint(
        tmp_path / "out", ((k, ck.read(k).to(torch.bfloat16)) for k in infos), infos=infos, template=ck
    )
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("nested", [None, "nanogpt"])
def test_torch_output_keeps_nesting_extras_and_shared_storage(tmp_path, nested):
    (src,) = make_torch_files(tmp_path / "in", n=1, nested=nested, prefix="_orig_mod.", tied=True)
    ck = open_checkpoint(src)
    out = tmp_path / "merged.pt"
    write_checkpoint(out, ((k, ck.read(k)) for k in ck.infos), infos=ck.infos, template=ck, record={})
    obj = torch.load(out, weights_only=True)
    sd = obj["model"] if nested else obj
    assert (
        sd["lm_head.weight"].untyped_storage().data_ptr()
        == sd["transformer.wte.weight"].untyped_storage().data_ptr()
    )
    if nested:
        assert list(obj) == ["model", "model_args", "iter_num", "best_val_loss", "config"]
        assert obj["iter_num"] == 100
    assert (tmp_path / "merged.merge.json").is_file()
    back = open_checkpoint(out)
    assert back.aliases == {"lm_head.weight": "transformer.wte.weight"}


def test_torch_output_into_folder_file_name(tmp_path):
    (src,) = make_torch_files(tmp_path / "in", n=1, nested="nanogpt")
    ck = open_checkpoint(src)
    res = write_checkpoint(tmp_path / "out", ((k, ck.read(k)) for k in ck.infos), infos=ck.infos, template=ck)
    assert res.files == [tmp_path / "out" / "model.pt"]  # not step_000100.pt: that is a training checkpoint
    nano = tmp_path / "nano" / "ckpt.pt"
    nano.parent.mkdir()
    src.rename(nano)
    ck = open_checkpoint(nano)
    res = write_checkpoint(
        tmp_path / "out2", ((k, ck.read(k)) for k in ck.infos), infos=ck.infos, template=ck
    )
    assert res.files == [tmp_path / "out2" / "ckpt.pt"]  # nanoGPT's sample.py --out_dir=out2 finds it


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_interrupted_write_leaves_nothing(tmp_path):
    state = _mixed_state()
    infos = _infos(state)

    def broken():
        for i, (k, v) in enumerate(state.items()):
            if i == 3:
                raise RuntimeError("disk on fire")
            yield k, v

    for out in (tmp_path / "out", tmp_path / "out.safetensors", tmp_path / "out.pt"):
        with pytest.raises(RuntimeError, match="disk on fire"):
            write_checkpoint(
                out, broken(), infos=infos, fmt="safetensors" if out.suffix != ".pt" else "torch"
            )
        assert not out.exists()
        assert _leftovers(tmp_path) == []


def test_stream_mismatch_is_an_error_and_leaves_nothing(tmp_path):
    state = _mixed_state()
    with pytest.raises(ValueError, match="out of order"):
        write_checkpoint(tmp_path / "o.safetensors", reversed(list(state.items())), infos=_infos(state))
    with pytest.raises(ValueError, match="ended before"):
        write_checkpoint(tmp_path / "o.safetensors", list(state.items())[:2], infos=_infos(state))
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force_and_is_replaced_atomically(tmp_path):
    state = _mixed_state()
    rec = {"record": {"tool": "extramerge"}}  # what merges write: the mark of their own output
    out = tmp_path / "out"
    out.mkdir()
    write_checkpoint(out, state.items(), infos=_infos(state), fmt="hf-safetensors", **rec)  # empty: fine
    with pytest.raises(CheckpointError, match="exists and is not empty.*force"):
        write_checkpoint(out, state.items(), infos=_infos(state), fmt="hf-safetensors", **rec)
    (out / "stale.txt").write_text("old")
    write_checkpoint(out, state.items(), infos=_infos(state), fmt="hf-safetensors", force=True, **rec)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []
    f = tmp_path / "x.safetensors"
    write_checkpoint(f, state.items(), infos=_infos(state), **rec)
    with pytest.raises(CheckpointError, match="exists"):
        write_checkpoint(f, state.items(), infos=_infos(state), **rec)
    write_checkpoint(f, state.items(), infos=_infos(state), force=True, **rec)
    assert _leftovers(tmp_path) == []
    # --force never replaces what no merge wrote: a user's folder, or a file without its record
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="not written by an extramerge merge"):
        write_checkpoint(user, state.items(), infos=_infos(state), fmt="hf-safetensors", force=True, **rec)
    (tmp_path / "x.merge.json").unlink()
    with pytest.raises(CheckpointError, match="not written by an extramerge merge"):
        write_checkpoint(f, state.items(), infos=_infos(state), force=True, **rec)
    assert (user / "notes.txt").read_text() == "keep" and f.is_file() and _leftovers(tmp_path) == []


def test_output_equal_to_inside_or_containing_an_input_is_refused(tmp_path):
    (src,) = make_hf_run(tmp_path / "run", "gpt2", n=1)
    ck = open_checkpoint(src)
    items = [(k, ck.read(k)) for k in ck.infos]
    for out, why in ((src, "is"), (src / "merged", "lies inside"), (tmp_path / "run", "contains")):
        with pytest.raises(CheckpointError, match=f"{why} the input checkpoint"):
            write_checkpoint(out, items, infos=ck.infos, template=ck, force=True)
    assert (src / "model.safetensors").is_file()


def test_written_folder_has_normal_permissions(tmp_path):
    state = _mixed_state()
    write_checkpoint(tmp_path / "out", state.items(), infos=_infos(state), fmt="hf-safetensors")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~mask


# ------------------------------------------------------------------------------ dtypes, numpy, direct I/O


def test_tensor_info_holds_safetensors_codes_and_converts_lazily():
    import numpy as np

    for dtype in ("BF16", "bfloat16", torch.bfloat16, np.dtype("float32"), "F32"):
        info = TensorInfo("x", (2, 3), dtype)
        assert info.dtype_str in ("BF16", "F32") and info.itemsize == (2 if "16" in info.dtype_str else 4)
    info = TensorInfo("x", (2, 3), torch.bfloat16)
    assert info == TensorInfo("x", (2, 3), "BF16") and info.dtype == torch.bfloat16
    assert info.dtype_name == "bfloat16" and info.np_dtype.name == "bfloat16" and info.nbytes == 12
    assert TensorInfo("f8", (4,), torch.float8_e4m3fn).np_dtype.name == "float8_e4m3fn"
    assert not TensorInfo("i", (1,), "I64").is_float and TensorInfo("h", (1,), "F16").is_float
    with pytest.raises(ValueError, match="unsupported dtype"):
        TensorInfo("x", (1,), "not-a-dtype")


def test_numpy_reads_match_torch_reads_bit_for_bit(tmp_path, monkeypatch):
    import numpy as np

    monkeypatch.setenv("EXTRAMERGE_MMAP", "1")  # views of the map too (reads are preads by default)

    from extramerge.io import to_numpy, to_torch

    state = _mixed_state()
    save_file(state, str(tmp_path / "m.safetensors"))
    ck = open_checkpoint(tmp_path / "m.safetensors")
    for name, t in state.items():
        arr = ck.read(name, numpy=True)
        assert isinstance(arr, np.ndarray) and arr.shape == tuple(t.shape)
        assert arr.dtype == ck.infos[name].np_dtype
        assert torch.equal(to_torch(arr), t) and torch.equal(ck.read(name), t)
        assert np.array_equal(to_numpy(t).reshape(-1).view(np.uint8), arr.reshape(-1).view(np.uint8))
        if t.numel() > 2:
            view = ck.view_range(name, 1, 3, numpy=True)
            assert np.array_equal(view.view(np.uint8), arr.reshape(-1)[1:3].view(np.uint8))


@pytest.mark.parametrize("direct_io", [True, False])
def test_direct_and_buffered_writes_are_byte_identical_to_save_file(tmp_path, direct_io):
    g = torch.Generator().manual_seed(5)
    state = {**_mixed_state(), "big": torch.randn(3 * 2**20 + 7, generator=g)}  # 12 MB: > one 8 MiB block
    save_file(state, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    infos = safetensors_order(_infos(state))
    out = tmp_path / "out.safetensors"
    write_checkpoint(
        out, ((k, state[k]) for k in infos), infos=infos, metadata={"format": "pt"}, direct_io=direct_io
    )
    assert out.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_direct_io_refused_by_the_filesystem_falls_back_to_buffered(tmp_path, monkeypatch):
    import errno
    import fcntl

    from extramerge.io import raw as C

    real = os.pwrite
    refused = []

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(C.os, "pwrite", pwrite)
    state = {"w": torch.arange(3 * 2**20, dtype=torch.float32), **_mixed_state()}
    save_file(state, str(tmp_path / "ref.safetensors"))
    infos = safetensors_order(_infos(state))
    items = ((k, state[k]) for k in infos)
    write_checkpoint(tmp_path / "out.safetensors", items, infos=infos, direct_io=True)
    assert refused == [0]  # the first direct write was refused, everything after went through the cache
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
