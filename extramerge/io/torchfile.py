"""PyTorch checkpoint files (.pt/.pth/.bin/.ckpt), read safely: ``TorchFile`` memory-maps a file with
``torch.load(weights_only=True, mmap=True)`` and finds its state dict, nested or not (nanoGPT/nanochat's
``{'model': ...}``, ``{'state_dict': ...}``, ...), stripping torch.compile and DDP name prefixes, keeping
small non-tensor entries for the writer and recognising tied weights. ``write_torch`` writes them: the
whole state dict collected in memory (``torch.save`` needs it), one file or HF .bin shards."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

from . import pickles, safety
from .dtypes import TensorInfo, is_torch, to_numpy, to_torch
from .errors import CheckpointError
from .layout import COPIED_STATE_KEYS, TRAINING_STATE_KEYS
from .shards import shard_names, shard_plan, write_index

__all__ = ["TorchFile", "write_torch"]

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
        fd = safety.open_regular(path, root=root)  # a FIFO/device would block torch.load
        try:
            with os.fdopen(os.dup(fd), "rb") as f:  # its pickle bounded before torch unpickles it
                pickles.check_torch_file(f, path, os.fstat(fd).st_size)
            obj = _torch_load(path, f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else path)
        finally:
            os.close(fd)
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

    def held_bytes(self, chunk: int = 0, workers: int = 1) -> int:
        """Memory that reading takes besides the mapped file: a tensor saved as a strided view (a
        transpose, or an expand with stride 0 whose storage is far smaller than the tensor) is copied
        contiguous once and kept (``read_range``)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values() if not t.is_contiguous())

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


def _torch_load(path: Path, source: Path | str):
    """torch.load of ``source`` (the file checked, through its descriptor where /proc has it), errors
    naming ``path``."""
    import torch

    try:
        try:
            return torch.load(source, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(source, map_location="cpu", weights_only=True)  # legacy (non-zip) format
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


# ----------------------------------------------------------------------------------------------- writing


def write_torch(
    folder: Path,
    stream,
    infos: Mapping[str, TensorInfo],
    *,
    fname: str,
    shard_stem: str | None = None,
    template=None,
    aliases: Mapping[str, str],
    shard_size: int,
    fsync: bool,
) -> tuple[list[str], int, float]:
    """Collect the tensors of ``infos`` (``stream.pieces(name)``, in order) and ``torch.save`` them into
    ``folder``: as ``fname`` inside the ``template``'s nesting and with its non-tensor entries, or with a
    ``shard_stem`` as an HF folder's STEM.bin, or STEM-0000k-of-0000K.bin shards above ``shard_size`` and
    their index. Tied ``aliases`` share storage again. Returns (files, tensor bytes, seconds in fsync)."""
    state = _collect(stream, infos)
    written = sum(i.nbytes for i in infos.values())
    t_sync = 0.0
    if shard_stem is None:
        t_sync += _torch_save(_torch_object(template, state, aliases), folder / fname, fsync)
        return [fname], written, t_sync
    shards = shard_plan(infos, shard_size)
    files = shard_names(shard_stem, ".bin", len(shards))
    extra_names: dict[str, list[str]] = {}
    for shard, f in zip(shards, files, strict=True):
        part = {n: state[n] for n in shard}
        part_aliases = {a: c for a, c in aliases.items() if c in part}
        extra_names[f] = list(part_aliases)
        t_sync += _torch_save(_torch_object(None, part, part_aliases), folder / f, fsync)
    if len(shards) > 1:
        full = [shard + extra_names[f] for shard, f in zip(shards, files, strict=True)]
        files.append(write_index(folder, f"{shard_stem}.bin.index.json", infos, full, files, {}))
    return files, written, t_sync


def _collect(stream, infos) -> dict:
    """PyTorch-file output: the whole state dict must be in memory for torch.save."""
    import torch

    out = {}
    for name, info in infos.items():
        t = torch.empty(info.shape, dtype=info.dtype)
        flat, pos = t.view(-1), 0
        for piece in stream.pieces(name):
            piece = piece if is_torch(piece) else to_torch(piece)
            flat[pos : pos + piece.numel()].copy_(piece)
            pos += piece.numel()
        out[name] = t
    return out


def _torch_save(obj, path: Path, fsync: bool) -> float:
    import torch

    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        if not fsync:
            return 0.0
        t0 = time.perf_counter()
        os.fsync(f.fileno())
        return time.perf_counter() - t0


def _torch_object(template, state: dict, aliases: Mapping[str, str]):
    """Rebuild the template's nesting around the merged state dict; aliases share storage again."""
    sd: dict = {}
    canon_to_alias: dict[str, list[str]] = {}
    for a, c in aliases.items():
        canon_to_alias.setdefault(c, []).append(a)
    layout = template.torch_layout if template is not None else {"nest": None, "inner_extras": {}}
    for name, t in state.items():
        sd[name] = t
        for a in canon_to_alias.get(name, []):
            sd[a] = t
    for k, v in layout.get("inner_extras", {}).items():
        sd.setdefault(k, v)
    nest = layout.get("nest")
    if nest is None:
        return sd
    obj = {}
    for k in layout["top_keys"]:
        if k == nest:
            obj[k] = sd
        elif k in template.extras:
            obj[k] = template.extras[k]
    return obj
