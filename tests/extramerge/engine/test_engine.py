"""The streaming merge engine against an independent reference Σ_j w_j θ_j."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from _ckpt_factory import (
    load_state,
    make_hf_run,
    make_safetensors_files,
    make_torch_files,
    reference_merge,
    tiny_config,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from extramerge.engine import merge_weights
from extramerge.engine.summary import rss_now as _rss_now
from extramerge.io import Checkpoint, CheckpointError, load_checkpoints
from rivervalley import weights as W

WEIGHTS4 = np.array([-0.2, 0.3, 0.4, 0.5])


def _merge(paths, w, out, **kw):
    cks = load_checkpoints(paths)
    kw.setdefault("progress", False)
    return merge_weights(cks, w, out, **kw)


def _assert_close(got: dict, ref: dict, atol=1e-6, aliases=()):
    assert set(got) == set(ref), set(got) ^ set(ref)
    for k, r in ref.items():
        g = got[k]
        assert g.shape == r.shape, k
        if r.dtype.is_floating_point:
            assert torch.allclose(g.double(), r.double(), rtol=1e-6, atol=atol), k
        else:
            assert torch.equal(g, r), k


@contextlib.contextmanager
def _patched_reads(hook):
    """Call ``hook(ckpt, name, ...)`` before every ranged read (copying or zero-copy) of any checkpoint."""
    saved = {m: getattr(Checkpoint, m) for m in ("read_range", "view_range")}

    def wrap(orig):
        def method(self, name, *a, **k):
            hook(self, name, *a, **k)
            return orig(self, name, *a, **k)

        return method

    for m, orig in saved.items():
        setattr(Checkpoint, m, wrap(orig))
    try:
        yield
    finally:
        for m, orig in saved.items():
            setattr(Checkpoint, m, orig)


def _hashes(paths):
    out = {}
    for p in paths:
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize(
    "fmt, kw",
    [
        ("safetensors", {}),
        ("torch", {}),
        ("torch", {"nested": "nanogpt", "prefix": "_orig_mod."}),
        ("torch", {"nested": "state_dict", "prefix": "module."}),
    ],
)
def test_file_formats_round_trip(tmp_path, fmt, kw):
    make = make_safetensors_files if fmt == "safetensors" else make_torch_files
    paths = make(tmp_path / "run", n=4, **kw)
    before = _hashes(paths)
    out = tmp_path / ("merged.safetensors" if fmt == "safetensors" else "merged.pt")
    s = _merge([tmp_path / "run"], WEIGHTS4, out)
    got, ref = load_state(out), reference_merge(paths, WEIGHTS4)
    _assert_close(got, ref)
    assert s.files[0] == out and s.n_read == 4 and s.bytes_written > 0
    assert _hashes(paths) == before  # inputs untouched
    if fmt == "torch":  # tied weights still share storage; int buffers come from the newest
        obj = torch.load(out, weights_only=True)
        sd = obj.get("model", obj.get("state_dict", obj))
        assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
        assert torch.equal(sd["transformer.h.0.attn.counter"], torch.arange(3) + 400)
        if kw.get("nested") == "nanogpt":
            assert obj["iter_num"] == 400 and "optimizer" not in obj


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin", "sharded-bin"])
def test_hf_formats_round_trip(tmp_path, fmt):
    paths = make_hf_run(tmp_path / "run", "gpt2", n=4, fmt=fmt)
    before = _hashes(paths)
    out = tmp_path / "merged"
    s = _merge(paths, WEIGHTS4, out, shard_size=40_000 if fmt == "sharded" else 5 * 2**30)
    ref = reference_merge(paths, WEIGHTS4)
    _assert_close(load_state(out), ref)
    assert (out / "config.json").is_file() and (out / "merge.json").is_file()
    if fmt == "sharded":
        assert (out / "model.safetensors.index.json").is_file()
    assert s.format == ("hf-bin" if "bin" in fmt else "hf-safetensors")
    assert _hashes(paths) == before


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_merged_hf_model_loads_with_transformers(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    paths = make_hf_run(tmp_path / "run", arch, n=4)
    w = W.extra(4, 2, 1, 0.5)
    _merge([tmp_path / "run"], w, tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ref = reference_merge(paths, w)
    sd = model.state_dict()
    for k, r in ref.items():
        assert torch.allclose(sd[k].double(), r, atol=1e-6), k
    if arch == "gpt2":  # tied lm_head is the merged embedding
        assert tiny_config(arch).tie_word_embeddings
        assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    else:
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(model(ids).logits).all()


def test_output_suffix_picks_a_single_file_format(tmp_path):
    paths = make_hf_run(tmp_path / "run", "llama", n=2)
    s = _merge(paths, [0.5, 0.5], tmp_path / "merged.safetensors")
    assert s.format == "safetensors" and s.files[0] == tmp_path / "merged.safetensors"
    assert (tmp_path / "merged.merge.json").is_file()
    _assert_close(load_state(tmp_path / "merged.safetensors"), reference_merge(paths, [0.5, 0.5]))
    s = _merge(paths, [0.5, 0.5], tmp_path / "merged.pt")
    assert s.format == "torch"
    _assert_close(load_state(tmp_path / "merged.pt"), reference_merge(paths, [0.5, 0.5]))


def test_hf_bin_to_safetensors_drops_tied_alias_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    paths = make_hf_run(tmp_path / "run", "gpt2", n=2, fmt="bin")
    _merge(paths, [0.5, 0.5], tmp_path / "merged", fmt="hf-safetensors")
    assert "lm_head.weight" not in load_state(tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)


# --------------------------------------------------------------------------------------------- dtypes


def test_bf16_accumulates_in_fp32_and_stays_bf16(tmp_path):
    paths = make_safetensors_files(tmp_path / "run", n=8, dtype=torch.bfloat16, noise=0.3)
    w = np.full(8, 1 / 8)
    ref = reference_merge(paths, w)
    _merge(paths, w, tmp_path / "a.safetensors")
    got = load_state(tmp_path / "a.safetensors")
    name = "transformer.h.0.mlp.c_fc.weight"
    assert got[name].dtype == torch.bfloat16
    # fp32 accumulation then one rounding: within half a bf16 ulp of the exact float64 mean, almost always
    err = (got[name].double() - ref[name]).abs()
    ulp = torch.finfo(torch.bfloat16).eps * ref[name].abs().clamp_min(1e-3)
    assert (err <= ulp).all()
    naive = sum((s[name] * torch.tensor(1 / 8, dtype=torch.bfloat16)) for s in map(load_state, paths))
    assert err.mean() < (naive.double() - ref[name]).abs().mean()  # beats accumulating in bf16
    _merge(paths, w, tmp_path / "b.safetensors", dtype="float32")
    got32 = load_state(tmp_path / "b.safetensors")
    assert got32[name].dtype == torch.float32
    assert torch.allclose(got32[name].double(), ref[name], rtol=1e-6, atol=1e-7)
    assert got32["transformer.h.0.attn.counter"].dtype == torch.int64  # ints keep their dtype


def test_float64_accumulation_and_fp16_output(tmp_path):
    paths = make_safetensors_files(tmp_path / "run", n=4)
    ref = reference_merge(paths, WEIGHTS4)
    _merge(paths, WEIGHTS4, tmp_path / "a.safetensors", accumulate="float64", dtype="float64")
    got = load_state(tmp_path / "a.safetensors")
    for k, r in ref.items():
        if r.dtype.is_floating_point:
            assert torch.allclose(got[k], r, rtol=1e-12, atol=1e-12), k
    paths64 = make_safetensors_files(tmp_path / "run64", n=4, dtype=torch.float64)
    s = _merge(paths64, WEIGHTS4, tmp_path / "c.safetensors")  # default accumulate, float64 inputs
    got, ref = load_state(tmp_path / "c.safetensors"), reference_merge(paths64, WEIGHTS4)
    name = "transformer.h.0.mlp.c_fc.weight"
    assert s.accumulate == "float64" and torch.allclose(got[name], ref[name], rtol=1e-12, atol=1e-12)
    _merge(paths, WEIGHTS4, tmp_path / "b.safetensors", dtype="float16")
    assert load_state(tmp_path / "b.safetensors")["transformer.ln_f.weight"].dtype == torch.float16


def test_fp16_overflow_is_an_error(tmp_path):
    state = {"w": torch.full((4,), 1e5)}
    for k in range(2):
        save_file(state, str(tmp_path / f"step_{k}.safetensors"))
    with pytest.raises(CheckpointError, match="'w': merged values overflow float16"):
        _merge([tmp_path], [0.5, 0.5], tmp_path / "out.safetensors", dtype="float16")


def test_int_tensors_copied_from_newest_even_with_zero_weight(tmp_path):
    paths = make_safetensors_files(tmp_path / "run", n=3)
    _merge(paths, [0.5, 0.5, 0.0], tmp_path / "out.safetensors")
    got = load_state(tmp_path / "out.safetensors")
    assert torch.equal(got["transformer.h.0.attn.counter"], torch.arange(3) + 300)
    assert torch.equal(got["transformer.mask"], torch.tensor([True, False, True]))


def test_zero_weight_checkpoints_are_not_read(tmp_path):
    paths = make_safetensors_files(tmp_path / "run", n=3)
    bad = load_state(paths[0])
    bad["transformer.ln_f.weight"][0] = float("nan")
    save_file(bad, str(paths[0]))
    cks = load_checkpoints(paths)
    calls = []

    def spy(self, name, *a, **k):
        calls.append(self.path)

    with _patched_reads(spy):
        merge_weights(cks, [0.0, 0.25, 0.75], tmp_path / "out.safetensors", progress=False)
    assert paths[0] not in calls and paths[1] in calls
    _assert_close(load_state(tmp_path / "out.safetensors"), reference_merge(paths[1:], [0.25, 0.75]))


@pytest.mark.parametrize("zero_copy", [True, False])
def test_chunked_merge_of_large_tensors(tmp_path, zero_copy, monkeypatch):
    monkeypatch.setenv("EXTRAMERGE_MMAP", "1" if zero_copy else "0")  # maps only where allowed
    paths = make_safetensors_files(tmp_path / "run", n=4)
    ref = reference_merge(paths, WEIGHTS4)
    for workers in (0, 2):
        out = tmp_path / f"out{workers}.safetensors"
        _merge(paths, WEIGHTS4, out, chunk_bytes=40, prefetch=3, workers=workers, zero_copy=zero_copy)
        _assert_close(load_state(out), ref)


@pytest.mark.parametrize("maps", ["1", "0"])
def test_resident_memory_stays_a_few_chunks(tmp_path, maps, monkeypatch):
    """3 × 24 MB inputs, 1 MiB chunks: mapped pages are dropped after use (and preads reuse their
    buffers), so RSS grows by a few MiB, not by the 72 MB read (nor by the 24 MB output)."""
    monkeypatch.setenv("EXTRAMERGE_MMAP", maps)
    for k in range(3):
        save_file({"w": torch.full((6 * 2**20,), float(k))}, str(tmp_path / f"step_{k}.safetensors"))
    cks = load_checkpoints([tmp_path])
    kw = {"progress": False, "chunk_bytes": 2**20}
    merge_weights(cks, [0.2, 0.3, 0.5], tmp_path / "warm.safetensors", **kw)  # first use pages in torch code
    before = _rss_now()
    s = merge_weights(cks, [0.2, 0.3, 0.5], tmp_path / "out" / "m.safetensors", **kw)
    assert s.merge_rss_bytes - before < 24 * 2**20  # measured ~10 MiB; 72 MiB if pages were kept
    assert s.bytes_read == 3 * 24 * 2**20
    assert torch.allclose(load_state(tmp_path / "out" / "m.safetensors")["w"], torch.full((6 * 2**20,), 1.3))


def test_unmappable_files_fall_back_to_pread(tmp_path):
    paths = make_safetensors_files(tmp_path / "run", n=3)
    cks = load_checkpoints(paths)
    for c in cks:
        for src in c._sources:
            src.mappable = False
    merge_weights(cks, [0.2, 0.3, 0.5], tmp_path / "out.safetensors", progress=False, chunk_bytes=64)
    _assert_close(load_state(tmp_path / "out.safetensors"), reference_merge(paths, [0.2, 0.3, 0.5]))


# ------------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_input_names_tensor_and_file(tmp_path, value):
    paths = make_safetensors_files(tmp_path / "run", n=3)
    state = load_state(paths[1])
    state["transformer.h.0.mlp.c_fc.weight"][3, 4] = value
    save_file(state, str(paths[1]))
    out = tmp_path / "out.safetensors"
    msg = "tensor 'transformer.h.0.mlp.c_fc.weight' in step_000200.safetensors contains NaN or Inf"
    with pytest.raises(CheckpointError, match=msg):
        _merge(paths, [0.2, 0.3, 0.5], out)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["run"]
    _merge(paths, [0.2, 0.3, 0.5], out, allow_nonfinite=True)
    assert not torch.isfinite(load_state(out)["transformer.h.0.mlp.c_fc.weight"]).all()


def test_incompatible_checkpoints_fail_before_reading(tmp_path):
    a, b = make_safetensors_files(tmp_path / "run", n=2)
    state = load_state(b)
    state["transformer.ln_f.weight"] = torch.zeros(9)
    save_file(state, str(b))
    with pytest.raises(CheckpointError, match="'transformer.ln_f.weight' has shape \\(8,\\) in step_000100"):
        _merge([a, b], [0.5, 0.5], tmp_path / "out.safetensors")


def test_bad_weights_and_outputs_fail_up_front(tmp_path):
    paths = make_safetensors_files(tmp_path / "run", n=3)
    with pytest.raises(ValueError, match="got 2 weights for 3 checkpoints"):
        _merge(paths, [0.5, 0.5], tmp_path / "o.safetensors")
    with pytest.raises(ValueError, match="finite"):
        _merge(paths, [0.5, np.nan, 0.5], tmp_path / "o.safetensors")
    with pytest.raises(ValueError, match="all weights are zero"):
        _merge(paths, [0, 0, 0], tmp_path / "o.safetensors")
    with pytest.raises(CheckpointError, match="lies inside the input"):
        _merge([tmp_path / "run"], [0.2, 0.3, 0.5], paths[0] / "x", dry_run=True)
    with pytest.raises(CheckpointError, match="contains the input"):
        _merge([tmp_path / "run"], [0.2, 0.3, 0.5], tmp_path / "run", force=True)
    (tmp_path / "o.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        _merge(paths, [0.2, 0.3, 0.5], tmp_path / "o.safetensors", dry_run=True)
    with pytest.raises(ValueError, match="unknown dtype"):
        _merge(paths, [0.2, 0.3, 0.5], tmp_path / "p.safetensors", dtype="int8")


def test_interrupted_merge_leaves_no_output_and_no_temp(tmp_path):
    paths = make_hf_run(tmp_path / "run", "gpt2", n=3, fmt="sharded")
    cks = load_checkpoints(paths)
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError("input disk vanished")

    with _patched_reads(flaky), pytest.raises(OSError, match="vanished"):
        merge_weights(cks, [0.2, 0.3, 0.5], tmp_path / "out", progress=False, workers=2)
    assert calls["n"] >= 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("dtype, torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_half_precision_output_rounds_like_torch_bit_for_bit(tmp_path, dtype, torch_dtype):
    """The float32 accumulator is cast with ml_dtypes (bfloat16) / numpy (float16): round to nearest even,
    exactly as torch's .to(). Inputs: arbitrary float32 bit patterns, exact ties with even and odd
    mantissas, their neighbours, subnormals, overflow, ±0, ±inf, NaN; weight 1 keeps them exact."""
    g = torch.Generator().manual_seed(0)
    anything = torch.randint(-(2**31), 2**31, (60_000,), generator=g, dtype=torch.int64).to(torch.int32)
    ties = (torch.randint(0, 2**16, (4096,), generator=g, dtype=torch.int32) << 16) | 0x8000  # bf16 ties
    ties16 = (torch.randint(0, 2**19, (4096,), generator=g, dtype=torch.int32) << 13) | 0x1000  # fp16 ties
    bits = torch.cat([anything, ties, ties + 1, ties - 1, ties16, ties16 + 1, ties16 - 1])
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.4028235e38, -65520.0,
                            65519.0, 1e-45, -1e-40, 6e-8, 1.0 + 2**-8, 1.0 + 3 * 2**-8])  # fmt: skip
    values = torch.cat([bits.view(torch.float32), special])
    save_file({"w": values}, str(tmp_path / "step_1.safetensors"))
    out = tmp_path / "out.safetensors"
    _merge([tmp_path / "step_1.safetensors"], [1.0], out, dtype=dtype, allow_nonfinite=True)
    got, want = load_state(out)["w"], values.to(torch_dtype)
    assert got.dtype == torch_dtype
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)  # NaN stays NaN (torch canonicalises its payload)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


def _big_run(folder: Path, n: int = 3, numel: int = 4 * 2**20, nan_in: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        w = torch.full((numel,), float(k + 1))
        if k == nan_in:
            w[numel - 10] = float("nan")
        save_file({"a": torch.ones(1000) * k, "w": w}, str(folder / f"step_{k + 1}.safetensors"))
    return folder


def test_overlapped_writer_is_atomic_when_a_worker_fails_mid_stream(tmp_path, monkeypatch):
    """16 MB per input in 256 KiB units: the writer has already written direct-I/O blocks while workers
    compute later units, when a NaN near the end of one input stops the merge. Nothing is published, the
    temporary folder is gone and the worker threads are stopped."""
    from extramerge.io import raw as C

    blocks = []
    real = C.FileWriter._write_block
    monkeypatch.setattr(C.FileWriter, "_write_block", lambda self, n: (blocks.append(n), real(self, n))[1])
    cks = load_checkpoints([_big_run(tmp_path / "run", nan_in=1)])
    threads = threading.active_count()
    with pytest.raises(CheckpointError, match="'w' in step_2.safetensors contains NaN"):
        merge_weights(cks, [0.2, 0.3, 0.5], tmp_path / "out", fmt="hf-safetensors", chunk_bytes=2**18,
                      workers=2, direct_io=True, progress=False)  # fmt: skip
    assert sum(blocks) >= 8 * 2**20  # at least one full block was on disk when the failure came
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert threading.active_count() == threads


@pytest.mark.parametrize("where", ["writer", "io-thread"])
def test_overlapped_writer_is_atomic_when_the_disk_fails_mid_stream(tmp_path, monkeypatch, where):
    """The writer side fails (disk full on the second block, seen by the writer or by its direct-I/O
    thread) while workers are computing: the error surfaces, the workers and the I/O thread are stopped
    and nothing is left behind."""
    from extramerge.io import raw as C

    calls = []
    if where == "writer":
        real = C.FileWriter._write_block

        def full_disk(self, n):
            calls.append(n)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, n)

        monkeypatch.setattr(C.FileWriter, "_write_block", full_disk)
    else:
        real_pwrite = C.os.pwrite

        def pwrite(fd, data, offset):
            calls.append(offset)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(C.os, "pwrite", pwrite)
    cks = load_checkpoints([_big_run(tmp_path / "run")])
    threads = threading.active_count()
    with pytest.raises(OSError, match="No space left"):
        merge_weights(cks, [0.2, 0.3, 0.5], tmp_path / "out.safetensors", chunk_bytes=2**18, workers=2,
                      direct_io=True, progress=False)  # fmt: skip
    assert len(calls) >= 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert threading.active_count() == threads


def test_merge_bytes_do_not_depend_on_workers_chunking_or_io_mode(tmp_path):
    run = _big_run(tmp_path / "run", numel=3 * 2**20 + 5)
    cks = load_checkpoints([run])
    outs = []
    for k, kw in enumerate(
        [
            {"workers": 0, "direct_io": False},
            {"workers": 1, "direct_io": True, "chunk_bytes": 2**16},
            {"workers": 2, "direct_io": True},
            {"workers": 3, "fsync": False, "chunk_bytes": 1000, "zero_copy": False},
        ]
    ):
        out = tmp_path / f"out{k}.safetensors"
        merge_weights(cks, [0.25, 0.25, 0.5], out, progress=False, **kw)
        outs.append(out.read_bytes())
    assert all(o == outs[0] for o in outs[1:])
    got = load_state(tmp_path / "out0.safetensors")
    assert torch.equal(got["w"], torch.full((3 * 2**20 + 5,), 2.25))


# --------------------------------------------------------------------------------------- dry run, summary


def test_dry_run_writes_nothing_and_projects(tmp_path):
    paths = make_safetensors_files(tmp_path / "run", n=4)
    cks = load_checkpoints(paths)
    s = merge_weights(cks, [0, 0, 0.5, 0.5], tmp_path / "out", dry_run=True, fmt="hf-safetensors")
    assert not (tmp_path / "out").exists() and s.dry_run
    floats = sum(i.nbytes for i in cks[0].infos.values() if i.is_float)
    ints = cks[0].nbytes - floats
    assert s.bytes_read == 2 * floats + ints and s.bytes_written == cks[0].nbytes
    assert s.projected_peak_rss_bytes > 0 and s.n_read == 2
    text = str(s)
    assert "dry run" in text and "would read" in text


def test_summary_reports_timings_bandwidth_memory(tmp_path):
    paths = make_safetensors_files(tmp_path / "run", n=3)
    s = _merge(paths, [1.5, -1.0, 0.4], tmp_path / "out.safetensors")
    text = str(s)
    for word in ("read", "written", "time", "peak memory", "not an affine merge"):
        assert word in text
    assert s.read_bandwidth > 0 and s.peak_rss_bytes > 0 and s.seconds > 0
    assert set(s.timings) == {"read_wait", "compute", "write", "fsync", "publish", "total"}


# ------------------------------------------------------------------------------------------- properties

FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _write_run(folder: Path, states: list[dict]) -> list[Path]:
    paths = []
    for k, s in enumerate(states):
        p = folder / f"step_{k + 1:04d}.safetensors"
        save_file(s, str(p))
        paths.append(p)
    return paths


@FAST
@given(
    c=st.floats(-100, 100, allow_nan=False, width=32),
    raw=st.lists(st.floats(-3, 3, allow_nan=False), min_size=2, max_size=5),
)
def test_affine_weights_keep_a_constant(c, raw):
    w = np.asarray(raw)
    w[-1] = 1.0 - w[:-1].sum()  # affine: Σw = 1
    with tempfile.TemporaryDirectory() as d:
        paths = _write_run(Path(d), [{"x": torch.full((5,), c)} for _ in w])
        _merge(paths, w, Path(d) / "out.safetensors", accumulate="float64")
        got = load_state(Path(d) / "out.safetensors")["x"]
    assert torch.allclose(got.double(), torch.full((5,), float(c), dtype=torch.float64), rtol=1e-5, atol=1e-4)


@FAST
@given(n=st.integers(2, 6), data=st.data())
def test_extra_with_alpha_zero_is_sma(n, data):
    window = data.draw(st.integers(1, n))
    offset = data.draw(st.integers(0, n - window))
    g = torch.Generator().manual_seed(n)
    with tempfile.TemporaryDirectory() as d:
        paths = _write_run(Path(d), [{"x": torch.randn(7, generator=g)} for _ in range(n)])
        _merge(paths, W.extra(n, window, offset, 0.0), Path(d) / "e.safetensors")
        _merge(paths, W.sma(n, window), Path(d) / "s.safetensors")
        assert torch.equal(
            load_state(Path(d) / "e.safetensors")["x"], load_state(Path(d) / "s.safetensors")["x"]
        )


@FAST
@given(n=st.integers(3, 6), data=st.data())
def test_exact_lines_extrapolate_exactly(n, data):
    window = data.draw(st.integers(2, n - 1))
    offset = data.draw(st.integers(1, n - window))
    a, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.25, 0.5, -1.0])
    with tempfile.TemporaryDirectory() as d:
        paths = _write_run(Path(d), [{"x": a + k * b} for k in range(1, n + 1)])
        alpha = (window - 1) / (2 * offset)  # returns θ_N on an exact line
        _merge(paths, W.extra(n, window, offset, alpha), Path(d) / "e.safetensors", accumulate="float64")
        got = load_state(Path(d) / "e.safetensors")["x"]
        _merge(paths, W.trend(n, window, ahead=2.0), Path(d) / "t.safetensors", accumulate="float64")
        ahead = load_state(Path(d) / "t.safetensors")["x"]
    assert torch.allclose(got, a + n * b, atol=1e-5)
    assert torch.allclose(ahead, a + (n + 2) * b, atol=1e-5)


@FAST
@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32]),
    fmt=st.sampled_from(["safetensors", "torch"]),
)
def test_newest_only_weights_round_trip_every_dtype_bitwise(dtype, fmt):
    g = torch.Generator().manual_seed(0)
    states = [
        {"x": (torch.randn(6, generator=g) * 10).to(dtype), "y": torch.randn(2, generator=g)}
        for _ in range(3)
    ]
    with tempfile.TemporaryDirectory() as d:
        paths = _write_run(Path(d), states)
        out = Path(d) / ("out.safetensors" if fmt == "safetensors" else "out.pt")
        _merge(paths, [0.0, 0.0, 1.0], out, fmt=fmt)
        got = load_state(out)
    assert got["x"].dtype == dtype and torch.equal(got["x"], states[-1]["x"])
