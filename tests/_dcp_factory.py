"""Checkpoint runs in torch.distributed.checkpoint formats for the tests: a torchtitan-style DCP run and a
Megatron-core ``torch_dist`` run root, each beside the same states as safetensors files."""

from __future__ import annotations

import argparse
import io
import json
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from _ckpt_factory import toy_state, trajectory
from safetensors.torch import save_file

# ----------------------------------------------------------------------------------------- DCP (torchtitan)

STEPS = (100, 200, 300)
OPT = "optimizer.state.transformer.wte.weight.exp_avg"


def dcp_save(state: dict, folder: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)


def dcp_load(state: dict, folder: Path, **kw) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(folder), no_dist=True, **kw)
    return state


def make_dcp_run(root: Path, nan_in: str | None = None, more: dict | None = None) -> list[dict]:
    """The same trajectory as a torchtitan-style DCP run root/dcp/step-100/ ... (with optimizer state, a
    train state and a transposed tensor) and as safetensors files root/st/step_000100.safetensors ...;
    returns the states. ``nan_in`` puts a NaN at the end of that tensor of the newest checkpoint; ``more``
    (name → shape) adds float tensors after the others."""
    base = toy_state(with_int=True)
    base["transformer.h.0.attn.c_proj.weight"] = torch.randn(6, 8).t()  # stored transposed (strided)
    g = torch.Generator().manual_seed(7)
    base |= {name: torch.randn(shape, generator=g) for name, shape in (more or {}).items()}
    states = trajectory(base, len(STEPS), steps=STEPS)
    if nan_in is not None:
        t = states[-1][nan_in]
        t[(-1,) * t.dim()] = float("nan")  # its last element, whatever its strides
    for step, state in zip(STEPS, states, strict=True):
        sd = dict(state)
        sd[OPT] = torch.full((16, 8), float(step))
        sd["train_state"] = io.BytesIO(f"step={step}".encode())
        dcp_save(sd, root / "dcp" / f"step-{step}")
        flat = {k: v.contiguous() for k, v in state.items()}
        (root / "st").mkdir(exist_ok=True)
        save_file(flat, root / "st" / f"step_{step:06d}.safetensors")
    return states


# ------------------------------------------------------------------------------------ Megatron torch_dist

ITERS = (100, 200, 300)
L, H, F, V = 2, 4, 8, 11
SHAPES = {
    "embedding.word_embeddings.weight": (V, H),
    "decoder.layers.self_attention.linear_qkv.weight": (L, 3 * H, H),
    "decoder.layers.mlp.linear_fc2.weight": (L, H, F),
    "decoder.final_layernorm.weight": (H,),
    "output_layer.weight": (V, H),
}
OPTIMIZER = (
    "optimizer.state.exp_avg.decoder.layers.self_attention.linear_qkv.weight",
    "optimizer.state.fp32_param.embedding.word_embeddings.weight",
)
OBJECTS = ("common_state/shard_0_1", "decoder.layers.self_attention.linear_qkv._extra_state/shard_0.0_1.2")


def quiet(fn, *a, **kw):
    """fn(*a, **kw) without dcp's single-process warning; returns the state dict dcp.load filled in."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn(*a, **kw)
    return a[0]


def megatron_states() -> list[dict]:
    g = torch.Generator().manual_seed(3)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    step = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    return [{k: (base[k] + 0.1 * i * step[k]).to(torch.bfloat16) for k in SHAPES} for i in range(len(ITERS))]


def make_megatron_run(root: Path) -> list[dict]:
    """A Megatron run root root/ckpt (iter_0000100/ ... with optimizer state, byte entries, metadata.json,
    common.pt; the tracker file) and the same states as root/st_0000100.safetensors ...; returns them."""
    states = megatron_states()
    for it, state in zip(ITERS, states, strict=True):
        folder = root / "ckpt" / f"iter_{it:07d}"
        sd = dict(state)
        sd[OPTIMIZER[0]] = torch.full(SHAPES["decoder.layers.self_attention.linear_qkv.weight"], float(it))
        sd[OPTIMIZER[1]] = torch.zeros(SHAPES["embedding.word_embeddings.weight"])
        sd[OBJECTS[0]] = io.BytesIO(f"common {it}".encode())
        sd[OBJECTS[1]] = io.BytesIO(b"")
        quiet(dcp.save, sd, checkpoint_id=str(folder), no_dist=True)
        (folder / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "iteration": it}))
        torch.save(
            {"args": argparse.Namespace(lr=3e-4, iteration=it), "checkpoint_version": 3.0},
            folder / "common.pt",
        )
        save_file(state, root / f"st_{it:07d}.safetensors")
    (root / "ckpt" / "latest_checkpointed_iteration.txt").write_text(f"{ITERS[-1]}")
    return states
