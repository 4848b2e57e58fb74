"""PyTorch checkpoint files (.pt/.pth/.bin/.ckpt), read safely: ``TorchFile`` memory-maps a file with
``torch.load(weights_only=True, mmap=True)`` and finds its state dict, nested or not (nanoGPT/nanochat's
``{'model': ...}``, ``{'state_dict': ...}``, ...), stripping torch.compile and DDP name prefixes, keeping
small non-tensor entries for the writer and recognising tied weights."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from . import safety
from .dtypes import TensorInfo, to_numpy
from .errors import CheckpointError
from .layout import COPIED_STATE_KEYS, TRAINING_STATE_KEYS

__all__ = ["TorchFile"]

# Top-level entries of a training checkpoint named in layout.TRAINING_STATE_KEYS (optimizer state, ...) are
# dropped from a merged checkpoint, except layout.COPIED_STATE_KEYS; other non-tensor entries (iter_num,
# config, model_args, ...) are kept.
_KEEP_TENSOR_BYTES = 2**20  # extras holding more tensor bytes than this are dropped too
_PREFIXES = ("_orig_mod.", "module.")


class TorchFile:
    """A PyTorch pickle/zip file memory-mapped with torch.load(weights_only=True, mmap=True)."""

    def __init__(self, path: Path, root: Path | None = None):
        import torch

        self.path = path
        safety.regular(path, root=root)  # a FIFO/device would block torch.load
        obj = _torch_load(path)
        if not isinstance(obj, Mapping):
            raise CheckpointError(
                f"{path}: not a checkpoint (torch file holds a {type(obj).__name__}, not a dict)"
            )
        nest, state = None, obj
        if not _is_state_dict(obj):
            for key in ("model", "state_dict", "model_state_dict", "module", "model_state", "ema"):
                if isinstance(obj.get(key), Mapping) and _is_state_dict(obj[key]):
                    nest, state = key, obj[key]
                    break
            else:
                keys = ", ".join(map(repr, list(obj)[:8]))
                raise CheckpointError(f"{path}: no state dict of tensors found (top-level keys: {keys})")
        self.nest = nest
        self.top_keys = list(obj)
        self.extras = {}
        self.dropped = []
        if nest is not None:
            for k, v in obj.items():
                if k == nest:
                    continue
                if str(k) in TRAINING_STATE_KEYS - COPIED_STATE_KEYS or _tensor_bytes(v) > _KEEP_TENSOR_BYTES:
                    self.dropped.append(k)
                else:
                    self.extras[k] = v
        self.inner_extras = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
        self.prefixes = set()
        self.tensors: dict[str, torch.Tensor] = {}
        self.aliases: dict[str, str] = {}
        seen: dict[tuple, str] = {}
        for key, t in state.items():
            if not isinstance(t, torch.Tensor):
                continue
            name = _strip_prefixes(str(key), self.prefixes)
            if name in self.tensors or name in self.aliases:
                what = safety.shown(name)
                raise CheckpointError(f"{path}: tensor {what} appears twice once prefixes are stripped")
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if t.numel() > 0 and ident in seen:
                self.aliases[name] = seen[ident]  # tied weights, e.g. lm_head.weight = transformer.wte.weight
                continue
            seen[ident] = name
            self.tensors[name] = t
        self.infos = {n: TensorInfo(n, tuple(t.shape), t.dtype) for n, t in self.tensors.items()}
        self.metadata = {}

    def read(self, name: str, *, numpy: bool = False):
        t = self.tensors[name]
        return to_numpy(t) if numpy else t

    def read_range(self, name: str, start: int, stop: int, out=None, *, numpy: bool = False):
        # A view of the memory-mapped file: no copy (``out`` is not needed).
        t = self.tensors[name]
        if not t.is_contiguous():  # a saved transposed view: flatten once, not once per chunk
            t = self.tensors[name] = t.contiguous()
        piece = t.reshape(-1)[start:stop]
        return to_numpy(piece) if numpy else piece

    view_range = read_range


def _torch_load(path: Path):
    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except CheckpointError:
        raise
    except Exception as e:
        text = str(e)
        m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
        what = (m.group(1) if m else text.strip() or type(e).__name__).strip().splitlines()[0]
        if "Unsupported global" in text:
            what = safety.shown(re.sub(r" Please use .*", "", what), 200)[1:-1]  # names from the file
            raise CheckpointError(
                f"{path}: holds Python objects that torch.load(weights_only=True) refuses to unpickle "
                f"({what}); re-save the state dict alone"
            ) from e
        what = safety.shown(what, 200)[1:-1]
        raise CheckpointError(
            f"{path}: corrupt or not a PyTorch checkpoint ({type(e).__name__}: {what})"
        ) from e


def _is_state_dict(d: Mapping) -> bool:
    """A flat name -> tensor mapping (non-tensor leaves such as ``_extra_state`` allowed)."""
    import torch

    has_tensor = False
    for v in d.values():
        if isinstance(v, torch.Tensor):
            has_tensor = True
        elif isinstance(v, Mapping | list | tuple) and _tensor_bytes(v) > 0:
            return False
    return has_tensor


def _tensor_bytes(v) -> int:
    import torch

    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size() + 1
    if isinstance(v, Mapping):
        return sum(_tensor_bytes(x) for x in v.values())
    if isinstance(v, list | tuple):
        return sum(_tensor_bytes(x) for x in v)
    return 0


def _strip_prefixes(name: str, found: set) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p) :], True
                found.add(p)
    return name
