"""Checkpoints on disk: lazy readers and streaming, atomic writers for every common layout.

Readers never load tensor data up front: opening a checkpoint parses headers only (safetensors JSON
headers, validated against the file size; PyTorch files memory-mapped with ``torch.load(mmap=True)``),
so a malformed input fails in milliseconds, before any merge work starts.

Formats (``Checkpoint.format``):
    hf-safetensors  folder with model.safetensors, or model-0000k-of-0000K.safetensors + index json
    hf-bin          folder with pytorch_model.bin, or sharded pytorch_model-*.bin + index json
    safetensors     a single .safetensors file
    torch           a .pt/.pth/.bin/.ckpt file: a state dict, or a training checkpoint that nests one
                    ({'model': ...} as nanoGPT/nanochat write, {'state_dict': ...}, ...); ``_orig_mod.``
                    (torch.compile) and ``module.`` (DDP) prefixes are stripped

Safetensors files are read and written with numpy alone (bfloat16 and float8 through ``ml_dtypes``):
torch is imported only when a PyTorch file is read or written, or when a caller asks for a torch tensor
(``Checkpoint.read``/``read_range``/``view_range`` return torch tensors unless ``numpy=True``). Dtypes
are held as safetensors codes (``TensorInfo.dtype_str``: 'F32', 'BF16', ...).

The writer streams safetensors (header first, computed from the output infos, then each tensor's bytes as
they arrive), so a merge holds one tensor chunk in memory, not a model. Large safetensors outputs are
written with direct I/O (O_DIRECT: no page-cache copy, nothing left to flush at the end), falling back to
buffered writes with early writeback. PyTorch-file output necessarily collects the whole state dict and
``torch.save``s it. Every write goes to a temporary folder beside the output (same filesystem), is
fsynced and renamed into place: an interrupted merge leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import mmap
import os
import re
import shutil
import struct
import threading
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import outputs, safety
from .outputs import check_output, publish, staging_dir
from .st_header import parse_header

__all__ = [
    "CheckpointError",
    "TensorInfo",
    "Checkpoint",
    "WriteResult",
    "FORMATS",
    "parse_step",
    "open_checkpoint",
    "load_checkpoints",
    "check_compatible",
    "check_output",
    "check_merge_output",
    "publish",
    "staging_dir",
    "output_layout",
    "default_format",
    "safetensors_order",
    "write_checkpoint",
    "numpy_dtype",
    "to_numpy",
    "to_torch",
]

FORMATS = ("hf-safetensors", "hf-bin", "safetensors", "torch")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
# Files in a checkpoint folder or run folder that hold training state, not weights.
_STATE_STEMS = ("optim", "optimizer", "scheduler", "rng_state", "scaler", "training_args", "meta")
# Top-level entries of a training checkpoint that are dropped from a merged checkpoint (optimizer state is
# meaningless for a merged model); other non-tensor entries (iter_num, config, model_args, ...) are kept.
_DROP_KEYS = ("optimizer", "optimizers", "optimizer_states", "optim", "lr_scheduler", "lr_schedulers",
              "scheduler", "scaler", "grad_scaler", "rng_state", "rng_states")  # fmt: skip
_KEEP_TENSOR_BYTES = 2**20  # extras holding more tensor bytes than this are dropped too
_PREFIXES = ("_orig_mod.", "module.")
_INDEXES = {"hf-safetensors": "model.safetensors.index.json", "hf-bin": "pytorch_model.bin.index.json"}
_ST_HEADER_LIMIT = 100 * 2**20  # the safetensors library refuses larger headers too

# Safetensors dtype codes -> (torch/numpy name, bytes per element). Insertion order is the safetensors
# library's dtype order; save_file writes tensors by descending dtype.
_ST_DTYPES = {
    "BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1), "F8_E5M2": ("float8_e5m2", 1),
    "F8_E4M3": ("float8_e4m3fn", 1), "I16": ("int16", 2), "U16": ("uint16", 2), "F16": ("float16", 2),
    "BF16": ("bfloat16", 2), "I32": ("int32", 4), "U32": ("uint32", 4), "F32": ("float32", 4),
    "C64": ("complex64", 8), "F64": ("float64", 8), "I64": ("int64", 8), "U64": ("uint64", 8),
}  # fmt: skip
_ST_RANK = {code: i for i, code in enumerate(_ST_DTYPES)}
_ST_ITEMSIZE = {code: nbytes for code, (_, nbytes) in _ST_DTYPES.items()}
_CODE_OF = {name: code for code, (name, _) in _ST_DTYPES.items()}
_FLOAT_CODES = frozenset({"F8_E5M2", "F8_E4M3", "F16", "BF16", "F32", "F64"})
_ML_DTYPES = ("bfloat16", "float8_e5m2", "float8_e4m3fn")  # numpy has no such dtypes: ml_dtypes does


class CheckpointError(ValueError):
    """A user-facing problem with a checkpoint or an output path; the one-line message names the culprit."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def _dtype_code(dtype) -> str:
    """Safetensors code ('F32', 'BF16', ...) of a torch dtype, numpy dtype, code or name ('float32');
    a torch dtype safetensors cannot store keeps its torch name ('complex128')."""
    if isinstance(dtype, str):
        if dtype in _ST_DTYPES:
            return dtype
        name = dtype.removeprefix("torch.")
    elif type(dtype).__module__ == "torch":  # a torch.dtype: known without importing torch
        name = str(dtype).removeprefix("torch.")
        return _CODE_OF.get(name, name)
    else:
        name = np.dtype(dtype).name
    try:
        return _CODE_OF[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}") from None


def numpy_dtype(dtype) -> np.dtype:
    """The numpy dtype of a safetensors code, name, torch or numpy dtype (bfloat16 and float8 from
    ml_dtypes)."""
    name = _dtype_name(_dtype_code(dtype))
    if name in _ML_DTYPES:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def _dtype_name(code: str) -> str:
    """'float32', 'bfloat16', ...: torch's dtype name without the 'torch.' prefix."""
    return _ST_DTYPES[code][0] if code in _ST_DTYPES else code


@dataclass(frozen=True, init=False)
class TensorInfo:
    """Name, shape and dtype of a stored tensor, known without reading its data.

    ``dtype_str`` is the safetensors code ('F32', 'BF16', ...; the torch name for the few torch dtypes
    safetensors cannot store). ``TensorInfo(name, shape, dtype)`` accepts a code, a name ('float32'), a
    numpy or a torch dtype. ``dtype`` (the torch dtype) imports torch; ``np_dtype`` does not.
    """

    name: str
    shape: tuple[int, ...]
    dtype_str: str

    def __init__(self, name: str, shape, dtype):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "shape", tuple(int(s) for s in shape))
        object.__setattr__(self, "dtype_str", _dtype_code(dtype))

    @property
    def dtype(self):
        """The torch dtype (imports torch)."""
        import torch

        return getattr(torch, self.dtype_name)

    @property
    def dtype_name(self) -> str:
        return _dtype_name(self.dtype_str)

    @property
    def np_dtype(self) -> np.dtype:
        return numpy_dtype(self.dtype_str)

    @property
    def itemsize(self) -> int:
        known = _ST_DTYPES.get(self.dtype_str)
        return known[1] if known else self.dtype.itemsize

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def is_float(self) -> bool:
        if self.dtype_str in _ST_DTYPES:
            return self.dtype_str in _FLOAT_CODES
        return self.dtype.is_floating_point


def to_torch(a: np.ndarray):
    """A torch tensor sharing ``a``'s memory (bfloat16/float8 through a byte view; imports torch)."""
    import torch

    tdt = getattr(torch, _dtype_name(_dtype_code(a.dtype)))
    flat = np.ascontiguousarray(a).reshape(-1)
    with warnings.catch_warnings():  # torch warns (once) that a memory-mapped array is read-only
        warnings.simplefilter("ignore")
        t = torch.from_numpy(flat.view(np.uint8)).view(tdt)
    return t.reshape(a.shape)


def to_numpy(t) -> np.ndarray:
    """A numpy array sharing a CPU torch tensor's memory (bfloat16/float8 as ml_dtypes); numpy arrays
    pass through."""
    if isinstance(t, np.ndarray):
        return t
    t = t.detach()
    name = str(t.dtype).removeprefix("torch.")
    if name in _ML_DTYPES:
        import torch

        return t.contiguous().view(torch.uint8).numpy().view(numpy_dtype(name)).reshape(tuple(t.shape))
    return t.numpy()


def _is_torch(t) -> bool:
    return type(t).__module__.startswith("torch")


def _bytes_of(buf) -> np.ndarray:
    """Flat uint8 numpy view of a contiguous numpy array or CPU tensor."""
    if _is_torch(buf):
        import torch

        return buf.reshape(-1).view(torch.uint8).numpy()
    return buf.reshape(-1).view(np.uint8)


def parse_step(name: str) -> int | None:
    """Training step in a checkpoint's name: step_001000, checkpoint-2000, iter_0003000, model_004000.pt,
    ckpt-5000.pt, global_step6000, step7000, 8000 ... ; None when the name carries no step."""
    stem = Path(str(name).rstrip("/")).name
    for suffix in (*WEIGHT_SUFFIXES, ".index.json"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    hits = re.findall(r"(?:step|iter|iteration|checkpoint|ckpt|model|it|epoch)[_\-.]?(\d+)", stem, re.I)
    if hits:
        return int(hits[-1])
    m = re.fullmatch(r"(?:.*[_\-])?(\d+)", stem)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------------------------------- readers


class _SafetensorsFile:
    """One .safetensors file: header parsed and validated up front, tensor bytes read with pread or
    through a shared read-only memory map."""

    def __init__(self, path: Path, root: Path | None = None):
        self.path = path
        fd = safety.open_regular(path, root=root)  # refuses a FIFO/device before reading a byte
        try:
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                size, self._id = st.st_size, (st.st_dev, st.st_ino, st.st_size)
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header)")
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, _ST_HEADER_LIMIT):
                    raise CheckpointError(
                        f"{path}: truncated or not a safetensors file (header length {n} exceeds the file's "
                        f"{size} bytes)"
                    )
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e
        self.data_start = 8 + n
        header = parse_header(path, raw, self.data_start, size, _ST_ITEMSIZE)
        self.metadata = header.metadata
        # stored order = data order, the order to read sequentially
        self.infos = {e.name: TensorInfo(e.name, e.shape, e.dtype) for e in header.entries}
        self.offsets = {e.name: self.data_start + e.begin for e in header.entries}
        self._mm = None
        self._base = 0
        self._lock = threading.Lock()
        self._drop = (0, 0)  # pending page range to unmap, batched (see advise)
        self.mappable = True

    def _open(self) -> int:
        """A descriptor of the very file whose header was validated, at the size it had (a file swapped in
        or truncated since, or a FIFO, is refused rather than read)."""
        fd = safety.open_regular(self.path)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino, st.st_size) != self._id:
            os.close(fd)
            raise CheckpointError(f"{self.path}: replaced or resized while open; run again")
        return fd

    def read_array(self, name: str, start: int, stop: int, out=None) -> np.ndarray:
        """Elements [start, stop) read with pread into ``out`` (any contiguous array or tensor with enough
        bytes, reused by the caller) or a fresh array."""
        info = self.infos[name]
        count = stop - start
        dt = info.np_dtype
        if out is None:
            arr = np.empty(count, dtype=dt)
        else:
            arr = _bytes_of(out)[: count * dt.itemsize].view(dt)
        view = memoryview(arr.view(np.uint8))
        pos, done = self.offsets[name] + start * dt.itemsize, 0
        fd = self._open()
        try:
            while done < len(view):
                got = os.preadv(fd, [view[done:]], pos + done)
                if got <= 0:
                    what = safety.shown(name)
                    raise CheckpointError(f"{self.path}: unexpected end of file reading tensor {what}")
                done += got
        finally:
            os.close(fd)
        return arr

    def read_range(self, name: str, start: int, stop: int, out=None, *, numpy: bool = False):
        arr = self.read_array(name, start, stop, out)
        if numpy:
            return arr
        if out is not None and _is_torch(out):  # keep the caller's tensor as the storage
            import torch

            tdt = self.infos[name].dtype
            return out.view(torch.uint8).reshape(-1)[: arr.nbytes].view(tdt)
        return to_torch(arr)

    def read(self, name: str, *, numpy: bool = False):
        info = self.infos[name]
        arr = self.read_array(name, 0, info.numel).reshape(info.shape)
        return arr if numpy else to_torch(arr)

    # Zero-copy path for the engine: a read-only shared mapping of the file. Pages are populated ahead of
    # use (madvise POPULATE_READ, off the arithmetic's critical path) and dropped from this process again
    # once consumed (madvise DONTNEED), so resident memory stays a few chunks although nothing is copied.

    def _map(self):
        if self._mm is None:
            with self._lock:
                if self._mm is None and self.mappable:
                    try:
                        with os.fdopen(self._open(), "rb") as f:
                            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                        anchor = np.frombuffer(mm, dtype=np.uint8, count=1)
                        self._base = anchor.__array_interface__["data"][0]
                        self._mm = mm
                    except (OSError, ValueError):
                        self.mappable = False  # e.g. a filesystem without mmap: fall back to pread
        return self._mm

    def view_array(self, name: str, start: int, stop: int) -> np.ndarray | None:
        """Elements [start, stop) as a read-only view of the mapped file, or None when it cannot be
        mapped."""
        info = self.infos[name]
        if stop <= start:
            return np.empty(0, dtype=info.np_dtype)
        mm = self._map()
        if mm is None:
            return None
        self.check_size()
        offset = self.offsets[name] + start * info.itemsize
        return np.frombuffer(mm, dtype=info.np_dtype, count=stop - start, offset=offset)

    def check_size(self) -> None:
        """CheckpointError if the mapped file has shrunk: touching a mapped page past its new end would raise
        SIGBUS, which kills the process. One fstat (``mmap.size``), called before mapped bytes are used; a
        truncation between this check and the access is not caught."""
        try:
            now = self._mm.size() if self._mm is not None else self._id[2]
        except (OSError, ValueError):  # closed meanwhile: nothing is read from it any more
            return
        if now < self._id[2]:
            raise CheckpointError(f"{self.path}: shrank from {self._id[2]} to {now} bytes while being read")

    def view_range(self, name: str, start: int, stop: int, *, numpy: bool = False):
        arr = self.view_array(name, start, stop)
        return arr if arr is None or numpy else to_torch(arr)

    def span(self, name: str, start: int, stop: int) -> tuple[int, int]:
        """File byte range [lo, hi) of elements [start, stop)."""
        info = self.infos[name]
        base = self.offsets[name]
        return base + start * info.itemsize, base + stop * info.itemsize

    def madvise_span(self, lo: int, hi: int, advice: str) -> None:
        """madvise the mapped pages of file bytes [lo, hi): 'populate' or 'drop' (thread-safe)."""
        if self._mm is None or hi <= lo:
            return
        lo -= lo % mmap.PAGESIZE
        _madvise(self._base + lo, hi - lo, advice)

    def advise(self, name: str, start: int, stop: int, advice: str) -> None:
        """madvise the pages of elements [start, stop): 'populate' (map them now), 'drop' (unmap; adjacent
        small ranges are batched into one call of at least _DROP_BATCH bytes) or 'flush' (pending drops)."""
        if self._mm is None:
            return
        if advice == "flush":
            lo, hi = self._drop
            if hi > lo:
                _madvise(self._base + lo, hi - lo, "drop")
            self._drop = (0, 0)
            return
        if stop <= start:
            return
        lo, hi = self.span(name, start, stop)
        lo -= lo % mmap.PAGESIZE
        if advice != "drop":
            _madvise(self._base + lo, hi - lo, advice)
            return
        plo, phi = self._drop
        if phi > plo and plo <= hi and lo <= phi + mmap.PAGESIZE:  # touches the pending range: extend it
            lo, hi = min(lo, plo), max(hi, phi)
        elif phi > plo:
            _madvise(self._base + plo, phi - plo, "drop")
        self._drop = (lo, hi)
        if hi - lo >= _DROP_BATCH:
            self.advise(name, 0, 0, "flush")


_DROP_BATCH = 2 * 2**20
_LIBC = None
_MADV = {
    "populate": 22,
    "willneed": getattr(mmap, "MADV_WILLNEED", 3),
    "drop": getattr(mmap, "MADV_DONTNEED", 4),
}


def _madvise(addr: int, length: int, advice: str) -> None:
    """madvise through ctypes, which releases the GIL (mmap.madvise does not): populating pages may read
    from disk, and that must overlap the main thread's arithmetic."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
            _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC:
        return
    if _LIBC.madvise(addr, length, _MADV[advice]) != 0 and advice == "populate":
        _LIBC.madvise(addr, length, _MADV["willneed"])  # kernels before 5.14: asynchronous read-ahead


class _TorchFile:
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
                if str(k) in _DROP_KEYS or _tensor_bytes(v) > _KEEP_TENSOR_BYTES:
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


class Checkpoint:
    """One checkpoint (file or folder), opened lazily: tensor metadata now, tensor data on ``read``.

    Attributes: ``path`` (what was opened), ``name`` (for messages), ``format`` (see FORMATS), ``step``
    (from the name, or None), ``infos`` (name -> TensorInfo of the distinct tensors, in stored order),
    ``aliases`` (tied/shared tensor name -> canonical name in ``infos``), ``extras`` (non-tensor entries of
    a training checkpoint, kept for the writer), ``metadata`` (safetensors ``__metadata__``), ``files``
    (the weight files), ``config`` (config.json of an HF folder, else None).
    """

    def __init__(self, path: Path, fmt: str, sources: list, *, name: str | None = None, step=None, root=None):
        self.path = Path(path)
        self.root = Path(root) if root is not None else self.path  # every file read lies inside it
        self.format = fmt
        self.name = name or (self.path.name + ("/" if self.path.is_dir() else ""))
        self.step = parse_step(self.path.name) if step is None else step
        self.files = [s.path for s in sources]
        self._sources = sources
        self._dropping = None  # the shard with batched 'drop' advice pending
        self._where: dict = {}
        self.infos: dict[str, TensorInfo] = {}
        self.aliases: dict[str, str] = {}
        self.metadata: dict[str, str] = {}
        for src in sources:
            for n, info in src.infos.items():
                if n in self._where:
                    what = safety.shown(n)
                    raise CheckpointError(f"{self.path}: tensor {what} is stored twice ({src.path.name})")
                self._where[n] = src
                self.infos[n] = info
            self.aliases.update(getattr(src, "aliases", {}))
            self.metadata.update(src.metadata)
        if "extramerge.aliases" in self.metadata:  # written by our safetensors writer for untied aliases
            with contextlib.suppress(CheckpointError):
                found = safety.parse_json(self.metadata["extramerge.aliases"], f"{self.path}: aliases")
                if isinstance(found, dict):
                    self.aliases.update({a: c for a, c in found.items() if isinstance(c, str)})
        self.aliases = {a: c for a, c in self.aliases.items() if c in self.infos and a not in self.infos}
        first = sources[0] if sources else None
        self.extras: dict = dict(getattr(first, "extras", {})) if isinstance(first, _TorchFile) else {}
        self.config = None
        if self.path.is_dir() and (self.path / "config.json").is_file():
            try:
                self.config = safety.load_json(self.path / "config.json", root=self.root)
            except CheckpointError:
                self.config = None

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    def _source(self, name: str):
        name = self.aliases.get(name, name)
        try:
            return self._where[name], name
        except KeyError:
            raise CheckpointError(f"{self.name}: no tensor {safety.shown(name)}") from None

    def _copies(self, name: str) -> bool:
        """Whether ranged reads of ``name`` copy into a caller's buffer (safetensors) or return views."""
        return isinstance(self._source(name)[0], _SafetensorsFile)

    def _mappable(self, name: str) -> bool:
        src, _ = self._source(name)
        return not isinstance(src, _SafetensorsFile) or src._map() is not None

    def view_range(self, name: str, start: int, stop: int, *, numpy: bool = False):
        """Elements [start, stop) of the flattened tensor as a zero-copy view of the memory-mapped file
        (None if the file cannot be mapped; use ``read_range``), a torch tensor or, with ``numpy``, an
        array. Never modify it. Pair with ``advise(..., 'populate')`` before use and
        ``advise(..., 'drop')`` after, to keep RSS bounded."""
        src, name = self._source(name)
        return src.view_range(name, start, stop, numpy=numpy)

    def span(self, name: str, start: int, stop: int):
        """(file, lo, hi): the memory-mapped safetensors file holding elements [start, stop) and their
        byte range in it, for ``file.madvise_span(lo, hi, 'populate' | 'drop')``; None for files that are
        not mapped by us (torch files, unmappable files)."""
        src, name = self._source(name)
        if not isinstance(src, _SafetensorsFile) or src._map() is None:
            return None
        return (src, *src.span(name, start, stop))

    def advise(self, name: str, start: int, stop: int, advice: str) -> None:
        """Map ('populate') or unmap ('drop') the pages behind elements [start, stop); safetensors only
        (torch-file tensors are mapped by torch and left alone)."""
        src = self._where.get(self.aliases.get(name, name))  # None once closed: nothing left to advise
        if isinstance(src, _SafetensorsFile):
            if advice == "drop" and self._dropping is not src:
                if self._dropping is not None:  # moved on to the next shard: at most one batch pending
                    self._dropping.advise("", 0, 0, "flush")
                self._dropping = src
            src.advise(self.aliases.get(name, name), start, stop, advice)

    def flush_advice(self) -> None:
        """Unmap any pages whose 'drop' advice is still batched."""
        for src in self._sources:
            if isinstance(src, _SafetensorsFile):
                src.advise("", 0, 0, "flush")

    def read(self, name: str, *, numpy: bool = False):
        """The whole tensor on CPU, shaped: a torch tensor or, with ``numpy``, an array. Safetensors: read
        with pread into fresh memory; torch files: a view of the memory-mapped file. Do not modify it."""
        src, name = self._source(name)
        return src.read(name, numpy=numpy)

    def read_range(self, name: str, start: int, stop: int, out=None, *, numpy: bool = False):
        """Elements [start, stop) of the flattened tensor (a torch tensor or, with ``numpy``, an array).
        Safetensors: read into ``out`` (any contiguous array or CPU tensor with enough bytes, reused by the
        caller) or fresh memory; torch files: a view."""
        src, name = self._source(name)
        return src.read_range(name, start, stop, out, numpy=numpy)

    @property
    def torch_layout(self) -> dict:
        """How a torch-file checkpoint nests its state dict (for the writer): nest key, prefixes, extras."""
        src = self._sources[0] if self._sources else None
        if not isinstance(src, _TorchFile):
            return {"nest": None, "prefixes": [], "top_keys": [], "inner_extras": {}, "dropped": []}
        return {
            "nest": src.nest,
            "prefixes": sorted(src.prefixes),
            "top_keys": src.top_keys,
            "inner_extras": src.inner_extras,
            "dropped": src.dropped,
        }

    def close(self) -> None:
        """Release the memory maps (tensors already returned stay valid: each keeps its map alive)."""
        for src in self._sources:
            if isinstance(src, _TorchFile):
                src.tensors = {}
            else:
                src._mm = None
        self._sources = []
        self._where = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (
            f"Checkpoint({str(self.path)!r}, format={self.format!r}, step={self.step}, "
            f"tensors={len(self.infos)}, bytes={self.nbytes})"
        )


def _hf_weights(folder: Path, root: Path | None = None) -> tuple[str, list[Path], dict | None] | None:
    """(format, weight files, index weight map or None) of an HF-style folder, or None. Every file named
    by the index must be a plain name whose real path stays inside ``root`` (default: the folder)."""
    root = folder if root is None else root
    for fmt, single, index in (
        ("hf-safetensors", "model.safetensors", "model.safetensors.index.json"),
        ("hf-bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (folder / index).is_file() or (folder / index).is_symlink():
            weight_map = _weight_map(folder / index, root)
            files = [safety.member(folder, f, index) for f in sorted(set(weight_map.values()))]
            for f in files:
                if not f.exists():
                    raise CheckpointError(
                        f"{folder}: shard {safety.shown(f.name)} listed in {index} is missing"
                    )
                safety.regular(f, root=root)
            return fmt, files, weight_map
        if (folder / single).is_file():
            return fmt, [folder / single], None
    return None


def _weight_map(index: Path, root: Path) -> dict[str, str]:
    """The ``weight_map`` of an index file: an object of tensor names to shard file names (strings)."""
    doc = safety.load_json(index, root=root)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: corrupt index file (no 'weight_map' object)")
    for tname, fname in weight_map.items():
        if not isinstance(fname, str):
            raise CheckpointError(
                f"{index}: corrupt index file (tensor {safety.shown(tname)} maps to a non-string shard name)"
            )
    return weight_map


def _is_weight_file(p: Path) -> bool:
    name = p.name.lower()
    if not name.endswith(WEIGHT_SUFFIXES) or name.startswith("."):
        return False
    return not name.startswith(_STATE_STEMS)


def _folder_weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and _is_weight_file(p))


def _is_checkpoint(path: Path) -> bool:
    if path.is_file():
        return _is_weight_file(path)
    if path.is_dir():
        return _hf_weights(path) is not None or len(_folder_weight_files(path)) == 1
    return False


def open_checkpoint(
    path: str | os.PathLike, *, name: str | None = None, step: int | None = None, root=None
) -> Checkpoint:
    """Open one checkpoint: an HF folder, a folder holding exactly one weight file, or a weight file.

    Every file read must resolve inside ``root`` (default: a folder checkpoint's own folder; a run folder
    when expanding one; none for a file named directly).
    Raises CheckpointError for a path that is not a checkpoint or a corrupt/truncated one.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        root = path if root is None else Path(root)
        hf = _hf_weights(path, root)
        if hf is not None:
            fmt, files, weight_map = hf
            opener = _SafetensorsFile if fmt == "hf-safetensors" else _TorchFile
            sources = [opener(f, root) for f in files]
            if fmt == "hf-safetensors" and weight_map is not None:
                sources = _restrict_to_index(path, sources, weight_map)
            _check_side_files(path, root)
            return Checkpoint(path, fmt, sources, name=name, step=step, root=root)
        files = _folder_weight_files(path)
        if len(files) != 1:
            what = "no weight files" if not files else f"{len(files)} weight files"
            raise CheckpointError(
                f"{path}: not a checkpoint ({what}; expected model.safetensors, pytorch_model.bin, a sharded "
                "index, or exactly one .safetensors/.pt/.pth/.bin file)"
            )
        safety.regular(files[0], root=root)
        inner = open_checkpoint(files[0], name=name or f"{path.name}/{files[0].name}", step=step)
        if inner.step is None:
            inner.step = parse_step(path.name)
        return inner
    if not _is_weight_file(path):
        raise CheckpointError(
            f"{path}: not a checkpoint (expected a .safetensors, .pt, .pth, .bin or .ckpt file, or a folder)"
        )
    if path.name.endswith(".safetensors"):
        return Checkpoint(path, "safetensors", [_SafetensorsFile(path, root)], name=name, step=step)
    return Checkpoint(path, "torch", [_TorchFile(path, root)], name=name, step=step)


def _restrict_to_index(folder: Path, sources: list, weight_map: Mapping[str, str]) -> list:
    """Keep, per shard, the tensors the index assigns to it (and check each listed tensor exists);
    ``sources`` are the shards in the order of their sorted names."""
    by_file = dict(zip(sorted(set(weight_map.values())), sources, strict=True))
    for tname, fname in weight_map.items():
        if tname not in by_file[fname].infos:
            raise CheckpointError(
                f"{folder}: tensor {safety.shown(tname)} is listed in the index but missing from "
                f"{safety.shown(fname)}"
            )
    for fname, s in by_file.items():
        s.infos = {n: i for n, i in s.infos.items() if weight_map.get(n) == fname}
    return sources


def _side_files(folder: Path) -> list[Path]:
    """Config, generation config, tokenizer files ... of an HF folder: everything but weights, indexes,
    records and training state (what a merged HF folder gets a copy of)."""
    skip = {"trainer_state.json", "merge.json", _INDEXES["hf-safetensors"], _INDEXES["hf-bin"]}
    out = []
    for p in sorted(folder.iterdir()):
        n = p.name
        if n.startswith(".") or n in skip or n.endswith(WEIGHT_SUFFIXES):
            continue
        if not (p.is_file() or p.is_symlink()):
            continue
        if n.lower().startswith(_STATE_STEMS) and not n.lower().startswith("meta"):
            continue  # optimizer/scheduler/rng state: meaningless for a merged model
        out.append(p)
    return out


def _check_side_files(folder: Path, root: Path) -> None:
    """Refuse side files that are links leaving ``root`` (they would be copied into the output)."""
    for p in _side_files(folder):
        if not safety.inside(p, root):
            raise CheckpointError(
                f"{p}: a link that leaves the checkpoint folder {root}; refusing to read or copy it"
            )


def _is_merge_output(p: Path) -> bool:
    """Our own outputs carry a merge.json record: never mistake them for training checkpoints."""
    if p.is_dir():
        return (p / "merge.json").is_file()
    return _record_path(p).is_file()


def _expand_folder(folder: Path) -> list[Checkpoint]:
    children = [
        c
        for c in sorted(folder.iterdir())
        if not c.name.startswith(".") and not _is_merge_output(c) and _is_checkpoint(c)
    ]
    if not children:
        raise CheckpointError(
            f"{folder}: not a checkpoint and holds no checkpoints (expected step_XXXX/ or checkpoint-XXXX/ "
            "folders, or .safetensors/.pt files)"
        )
    steps = [parse_step(c.name) for c in children]
    if len(children) > 1 and None in steps:
        bad = children[steps.index(None)]
        raise CheckpointError(
            f"{folder}: cannot order its checkpoints: '{bad.name}' has no step number in its name (list the "
            "checkpoints explicitly, oldest first)"
        )
    order = sorted(range(len(children)), key=lambda i: (steps[i] or 0, children[i].name))
    for i, j in zip(order, order[1:], strict=False):
        if steps[i] is not None and steps[i] == steps[j]:
            raise CheckpointError(
                f"{folder}: '{children[i].name}' and '{children[j].name}' both carry step {steps[i]}; "
                "list the checkpoints explicitly, oldest first"
            )
    # root=folder: a step folder or file that is a link leaving the run folder is refused
    return [open_checkpoint(children[i], step=steps[i], root=folder) for i in order]


_HUB_REF = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")


def _open_hub(ref: str) -> Checkpoint:
    repo, _, revision = ref.partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise CheckpointError(f"{ref}: no such path, and huggingface_hub is not installed to fetch it") from e
    try:
        folder = snapshot_download(
            repo,
            revision=revision or None,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"],
        )
    except Exception as e:
        raise CheckpointError(
            f"{ref}: no such path, and fetching it from the Hugging Face Hub failed ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); if offline, download it first"
        ) from e
    # A hub snapshot's files are links into the repository cache's blobs/: that cache is the root.
    root = Path(folder).parents[1] if Path(folder).parent.name == "snapshots" else None
    return open_checkpoint(folder, name=ref, step=parse_step(revision) if revision else None, root=root)


def load_checkpoints(paths: Sequence[str | os.PathLike]) -> list[Checkpoint]:
    """Open checkpoints, oldest first.

    Each path is a checkpoint (see ``open_checkpoint``), a folder OF checkpoints (expanded to its children
    step_001000/, checkpoint-2000/, iter_0003000/, model_004000.pt, ... sorted by the step in their names;
    our own merge outputs and optimizer/meta files are skipped), or a Hugging Face Hub reference
    ``org/name[@revision]`` fetched with huggingface_hub when online. Otherwise the given order is kept.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    out: list[Checkpoint] = []
    for p in paths:
        path = Path(p)
        if path.exists():
            out.extend(
                [open_checkpoint(path)] if _is_checkpoint(path) or not path.is_dir() else _expand_folder(path)
            )
        elif _HUB_REF.match(str(p)) and not str(p).startswith((".", "/")):
            out.append(_open_hub(str(p)))
        else:
            raise CheckpointError(f"{p}: no such file or folder")
    if not out:
        raise CheckpointError("no checkpoints given")
    try:
        safety.distinct(c.path for c in out)
    except CheckpointError:
        for c in out:
            c.close()
        raise
    return out


def check_compatible(ckpts: Sequence[Checkpoint]) -> dict[str, TensorInfo]:
    """Same tensor names, shapes and dtypes in every checkpoint; returns the newest one's infos.

    Raises CheckpointError naming the first offending tensor and the two checkpoints.
    """
    if not ckpts:
        raise CheckpointError("no checkpoints given")
    ref = ckpts[0]
    for other in ckpts[1:]:
        a, b = ref.infos, other.infos
        for name, info in a.items():
            o, shown = b.get(name), safety.shown(name)
            if o is None:
                raise CheckpointError(f"tensor {shown} is in {ref.name} but missing from {other.name}")
            if o.shape != info.shape:
                raise CheckpointError(
                    f"tensor {shown} has shape {info.shape} in {ref.name} but {o.shape} in {other.name}"
                )
            if o.dtype_str != info.dtype_str:
                raise CheckpointError(
                    f"tensor {shown} has dtype {info.dtype_name} in {ref.name} but "
                    f"{o.dtype_name} in {other.name}"
                )
        for name in b:
            if name not in a:
                what = safety.shown(name)
                raise CheckpointError(f"tensor {what} is in {other.name} but missing from {ref.name}")
    return dict(ckpts[-1].infos)


# --------------------------------------------------------------------------------------------------- writers


@dataclass
class WriteResult:
    """What a write produced: bytes of tensor data written and the published files."""

    bytes_written: int
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    fsync_seconds: float = 0.0
    publish_seconds: float = 0.0


def safetensors_order(infos: Mapping[str, TensorInfo]) -> dict[str, TensorInfo]:
    """``infos`` in the order safetensors.save_file lays tensors out (dtype rank descending, then name);
    a streamed file in this order is byte-identical to save_file's."""
    items = sorted(infos.items(), key=lambda kv: (-_ST_RANK.get(kv[1].dtype_str, -1), kv[0]))
    return dict(items)


def _record_path(output: Path) -> Path:
    """merge.json beside the output: inside an output folder, or <stem>.merge.json next to an output file."""
    if output.suffix in WEIGHT_SUFFIXES:
        return output.with_name(output.name[: -len(output.suffix)] + ".merge.json")
    return output / "merge.json"


def check_record_path(output: Path) -> None:
    """X.merge.json beside an output file X.safetensors is replaced only when it is our own record."""
    rec = _record_path(output)
    outputs.refuse_special(rec)
    if (rec.exists() or rec.is_symlink()) and (rec.is_symlink() or not _is_record(rec)):
        raise CheckpointError(
            f"{rec} exists and is not an extramerge record; refusing to replace it (move it, or choose "
            "another output)"
        )


def check_merge_output(out: Path) -> None:
    """What ``--force`` may replace: an existing output only when it is extramerge's own earlier merge (a
    folder holding an extramerge merge.json, or a file with its extramerge X.merge.json beside it), never
    a user's folder or file that merely has the name; and X.merge.json only when it is our own record."""
    if out.suffix in WEIGHT_SUFFIXES:
        check_record_path(out)
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return  # an empty folder holds nothing to lose
    rec = _record_path(out)
    if out.is_symlink() or not _is_record(rec):
        raise CheckpointError(
            f"output {out} exists and was not written by an extramerge merge (it has no extramerge "
            f"record {rec.name}); refusing to replace it, even with --force"
        )


def _is_record(path: Path) -> bool:
    return outputs._own_json(path, "tool", "extramerge")


def default_format(output: str | os.PathLike, template: Checkpoint | None) -> str:
    """The output format when none is asked for: a .safetensors file name means one safetensors file,
    .pt/.pth/.bin/.ckpt a PyTorch file; otherwise the template's (newest input's) format family."""
    suffix = Path(output).suffix
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    return template.format if template is not None else "safetensors"


def output_layout(
    output: str | os.PathLike, fmt: str, template: Checkpoint | None = None
) -> tuple[Path, str]:
    """(published path, file name) of an output: HF formats are folders; ``safetensors``/``torch`` go to the
    given file when it ends in .safetensors/.pt/.pth/.bin/.ckpt, else into that folder as model.safetensors
    / model.pt, or under the template's file name when that carries no step (nanoGPT's ckpt.pt)."""
    output = Path(output)
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt.startswith("hf-"):
        if output.suffix in WEIGHT_SUFFIXES:
            raise CheckpointError(f"{output}: format {fmt} writes a folder; give a folder name, not a file")
        return output, ""
    if output.suffix in WEIGHT_SUFFIXES:
        return output, output.name
    ext = ".safetensors" if fmt == "safetensors" else ".pt"
    keep = template is not None and template.format == fmt and template.files
    # nanoGPT's out_dir/ckpt.pt stays ckpt.pt; a step-named file (step_000400.pt) is not reused, so the
    # merged file is not mistaken for that training checkpoint.
    name = template.files[0].name if keep else ""
    fname = name if name and parse_step(name) is None else f"model{ext}"
    return output, fname


def _byte_view(t) -> memoryview:
    """The bytes of a numpy array or CPU tensor, flattened (a copy only if it is not contiguous)."""
    if _is_torch(t):
        t = t.contiguous().reshape(-1)
        return memoryview(to_numpy(t).view(np.uint8)) if t.numel() else memoryview(b"")
    return memoryview(np.ascontiguousarray(t).reshape(-1).view(np.uint8))


def _write_all(f, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += f.write(data[done:])


def _shard_plan(infos: Mapping[str, TensorInfo], shard_size: int) -> list[list[str]]:
    """Greedy split in order: a new shard starts when the next tensor would exceed ``shard_size``."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, info in infos.items():
        if shards[-1] and used + info.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += info.nbytes
    return shards


def _shard_names(stem: str, ext: str, n: int) -> list[str]:
    if n == 1:
        return [f"{stem}{ext}"]
    return [f"{stem}-{k + 1:05d}-of-{n:05d}{ext}" for k in range(n)]


def _safetensors_header(infos: Sequence[TensorInfo], metadata: Mapping[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for info in infos:
        if info.dtype_str not in _ST_DTYPES:
            raise CheckpointError(
                f"tensor '{info.name}': dtype {info.dtype_name} cannot be stored in safetensors"
            )
        header[info.name] = {
            "dtype": info.dtype_str,
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header with spaces to 8-byte alignment
    return struct.pack("<Q", len(raw)) + raw


class _PieceStream:
    """Checks that (name, tensor) items arrive in ``infos`` order; a tensor (numpy array or torch tensor)
    may come in flat pieces."""

    def __init__(self, items: Iterable[tuple[str, object]], infos: Mapping[str, TensorInfo]):
        self._it = iter(items)
        self._infos = infos

    def pieces(self, name: str):
        """Yield the pieces of tensor ``name`` (flat, contiguous) until its numel is complete."""
        info = self._infos[name]
        need = info.numel
        while True:
            if need == 0 and info.numel > 0:
                return
            try:
                got_name, t = next(self._it)
            except StopIteration:
                raise ValueError(f"tensor stream ended before tensor '{name}' was complete") from None
            if got_name != name:
                raise ValueError(f"tensor stream out of order: expected '{name}', got '{got_name}'")
            if not _has_dtype(t, info.dtype_str):
                raise ValueError(
                    f"tensor '{name}': expected dtype {info.dtype_name}, got {getattr(t, 'dtype', t)}"
                )
            numel = math.prod(t.shape)
            if numel == info.numel and tuple(t.shape) not in (info.shape, (info.numel,)):
                raise ValueError(f"tensor '{name}': expected shape {info.shape}, got {tuple(t.shape)}")
            if numel > need and info.numel > 0:
                raise ValueError(f"tensor '{name}': pieces exceed its {info.numel} elements")
            need -= numel
            yield t.reshape(-1)
            if info.numel == 0:
                return

    def finish(self) -> None:
        extra = next(self._it, None)
        if extra is not None:
            raise ValueError(f"tensor stream has an unexpected extra tensor '{extra[0]}'")


def _has_dtype(t, code: str) -> bool:
    if not (isinstance(t, np.ndarray) or _is_torch(t)):
        return False
    try:
        return _dtype_code(t.dtype) == code
    except (ValueError, TypeError):
        return False


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_WRITEBACK_EVERY = 64 * 2**20
_SYNC_FILE_RANGE = None


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask Linux to start writing [offset, offset+length) to disk now, without waiting
    (sync_file_range(SYNC_FILE_RANGE_WRITE)), so the final fsync finds little left to do and disk writes
    overlap the merge. A no-op where unavailable."""
    global _SYNC_FILE_RANGE
    if _SYNC_FILE_RANGE is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            _SYNC_FILE_RANGE = fn
        except (OSError, AttributeError):
            _SYNC_FILE_RANGE = False
    if _SYNC_FILE_RANGE:
        _SYNC_FILE_RANGE(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE


_DIRECT_BLOCK = 8 * 2**20  # bytes per direct write: large, page-aligned
_DIRECT_ALIGN = 4096  # O_DIRECT needs offsets, lengths and addresses aligned to the logical block size
DIRECT_IO_MIN_BYTES = 64 * 2**20  # smaller files are written through the page cache


class _FileWriter:
    """Appends bytes to a new file, either through the page cache (starting writeback every
    _WRITEBACK_EVERY bytes, so the final fsync is short) or with direct I/O.

    Direct I/O (O_DIRECT) gathers the bytes into page-aligned blocks and writes whole blocks straight to
    the device from a background thread, while the next block fills: no page-cache copy to make and
    later flush, and no fresh page-cache memory to allocate, which on a VM whose free memory was handed
    back to the host costs more than the disk write itself. Where the filesystem refuses O_DIRECT
    (tmpfs, some network filesystems) the file continues through the page cache."""

    def __init__(self, path: Path, *, direct: bool, writeback: bool):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self.direct = bool(direct and hasattr(os, "O_DIRECT"))
        self.fd = -1
        if self.direct:
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, 0o666)
            except OSError:
                self.direct = False
        if self.fd < 0:
            self.fd = os.open(path, flags, 0o666)
        self.writeback = writeback
        self.pos = 0  # file offset of the next byte
        self.synced = 0
        self.fill = 0  # bytes gathered in the current direct-I/O block
        self._blocks: list = []
        self._io = None  # the direct writes' thread and the write in flight
        self._inflight = None
        if self.direct:
            from concurrent.futures import ThreadPoolExecutor

            self._blocks = [mmap.mmap(-1, _DIRECT_BLOCK) for _ in range(2)]  # anonymous maps: page-aligned
            self._arr = np.frombuffer(self._blocks[0], dtype=np.uint8)
            self._io = ThreadPoolExecutor(1, thread_name_prefix="extramerge-write")

    def write(self, data: memoryview) -> None:
        if not self.direct:
            self._write_buffered(data)
            return
        src = np.frombuffer(data, dtype=np.uint8) if len(data) else None
        done = 0
        while done < len(data):
            n = min(len(data) - done, _DIRECT_BLOCK - self.fill)
            np.copyto(self._arr[self.fill : self.fill + n], src[done : done + n])  # releases the GIL
            self.fill += n
            done += n
            if self.fill == _DIRECT_BLOCK:
                self._write_block(_DIRECT_BLOCK)

    def _write_buffered(self, data: memoryview) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], self.pos + done)
        self.pos += len(data)
        if self.writeback and self.pos - self.synced >= _WRITEBACK_EVERY:
            _start_writeback(self.fd, self.synced, self.pos - self.synced)
            self.synced = self.pos

    def _write_block(self, length: int) -> None:
        """Hand the gathered block (``length``: a multiple of _DIRECT_ALIGN, the tail padded) to the I/O
        thread and switch to the other block once its previous write is done."""
        block = self._blocks[0]
        fut = self._io.submit(_pwrite_direct, self.fd, memoryview(block)[:length], self.pos, self.fill)
        self.pos += self.fill
        self.fill = 0
        self._wait()  # the other block's write: it must be done before that block is refilled
        self._inflight = fut
        self._blocks.reverse()
        self._arr = np.frombuffer(self._blocks[0], dtype=np.uint8)

    def _wait(self) -> None:
        fut, self._inflight = self._inflight, None
        if fut is not None:
            fut.result()  # re-raises the I/O thread's error here

    def close(self, fsync: bool) -> float:
        """Write what is left, fsync (if asked) and close; returns the seconds spent in fsync."""
        try:
            if self.direct:
                size = self.pos + self.fill
                if self.fill:
                    padded = -(-self.fill // _DIRECT_ALIGN) * _DIRECT_ALIGN
                    self._arr[self.fill : padded] = 0
                    self._write_block(padded)
                self._wait()
                os.ftruncate(self.fd, size)  # drop the padding of the last block
            t_sync = 0.0
            if fsync:
                t0 = time.perf_counter()
                os.fsync(self.fd)
                t_sync = time.perf_counter() - t0
            return t_sync
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop: let a write in flight finish (it uses the descriptor), then close everything."""
        if self._io is not None:
            with contextlib.suppress(BaseException):
                self._wait()
            self._io.shutdown(wait=True)
            self._io = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._arr = None
        self._blocks = []  # unmapped once unreferenced (a failed write's traceback may still hold one)


def _pwrite_direct(fd: int, view: memoryview, pos: int, size: int) -> None:
    """Write a direct-I/O block at ``pos`` (``size`` bytes of it are data, the rest padding). A filesystem
    that refuses it (EINVAL) or writes short gets the file switched to the page cache for good."""
    try:
        done = os.pwrite(fd, view, pos)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        done = 0  # the filesystem accepted O_DIRECT at open but not for writes
    if done < min(size, len(view)):
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        while done < size:
            done += os.pwrite(fd, view[done:size], pos + done)


def _write_safetensors_shards(
    folder, stream, infos, shards, names, metadata, fsync, direct_io
) -> tuple[int, float]:
    written, t_sync = 0, 0.0
    for shard, fname in zip(shards, names, strict=True):
        size = sum(infos[n].nbytes for n in shard)
        direct = fsync and size >= DIRECT_IO_MIN_BYTES if direct_io is None else direct_io
        f = _FileWriter(folder / fname, direct=direct, writeback=fsync)
        try:
            f.write(memoryview(_safetensors_header([infos[n] for n in shard], metadata)))
            for name in shard:
                for piece in stream.pieces(name):
                    data = _byte_view(piece)
                    f.write(data)
                    written += len(data)
        except BaseException:
            f.abort()
            raise
        t_sync += f.close(fsync)
    return written, t_sync


def _collect(stream, infos) -> dict:
    """PyTorch-file output: the whole state dict must be in memory for torch.save."""
    import torch

    out = {}
    for name, info in infos.items():
        t = torch.empty(info.shape, dtype=info.dtype)
        flat, pos = t.view(-1), 0
        for piece in stream.pieces(name):
            piece = piece if _is_torch(piece) else to_torch(piece)
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


def _copy_hf_files(template: Checkpoint, folder: Path, infos: Mapping[str, TensorInfo]) -> list[str]:
    """Copy config, generation config, tokenizer files ... (everything but weights and training state);
    only regular files inside the template's folder are read."""
    copied = []
    if not template.path.is_dir() or template.format not in ("hf-safetensors", "hf-bin"):
        return copied
    for p in _side_files(template.path):
        if not p.is_file():
            continue  # a dangling link (one leaving the folder was refused when the checkpoint was opened)
        safety.regular(p, root=template.root)
        shutil.copyfile(p, folder / p.name)
        copied.append(p.name)
    if "config.json" in copied:
        _set_config_dtype(folder / "config.json", infos)
    return copied


def _set_config_dtype(path: Path, infos: Mapping[str, TensorInfo]) -> None:
    """Keep config.json's dtype truthful (transformers loads in it), avoiding a silent dtype surprise."""
    dtypes = {i.dtype_name for i in infos.values() if i.is_float}
    if len(dtypes) != 1:
        return
    name = dtypes.pop()
    try:
        config = json.loads(path.read_text())
    except ValueError:
        return
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    if all(config.get(k) == name for k in keys):
        return
    for k in keys:
        config[k] = name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _torch_object(template: Checkpoint | None, state: dict, aliases: Mapping[str, str]):
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


def write_checkpoint(
    output: str | os.PathLike,
    tensors: Iterable[tuple[str, object]],
    *,
    infos: Mapping[str, TensorInfo],
    template: Checkpoint | None = None,
    fmt: str | None = None,
    shard_size: int = 5 * 2**30,
    metadata: Mapping[str, str] | None = None,
    record: Mapping | None = None,
    force: bool = False,
    inputs: Iterable[Checkpoint | str | os.PathLike] = (),
    fsync: bool = True,
    direct_io: bool | None = None,
) -> WriteResult:
    """Stream ``tensors`` into a new checkpoint at ``output``, atomically.

    ``infos`` are the output tensors (names, shapes, dtypes) in write order, known before the first tensor
    arrives; ``tensors`` yields (name, tensor) in that order (numpy arrays or torch tensors), where a
    tensor may also come as consecutive flat pieces whose sizes add up. Each item is consumed before the
    next is requested, so a producer may reuse its buffers. ``fmt`` defaults to
    ``default_format(output, template)``. ``template`` (the newest input) gives the config and tokenizer
    files copied into HF folders, and the nesting, non-tensor entries and tied aliases of torch files.
    Safetensors outputs shard above ``shard_size`` bytes (HF index json); torch outputs are one file.
    ``metadata`` goes into the safetensors header; ``record`` is written as merge.json beside the output.

    The output is built in a temporary folder beside it, fsynced, then renamed into place (``force``
    replaces an existing output: old renamed aside, new renamed in, old deleted). On any exception the
    temporary folder is removed and nothing is published. Inputs (``template`` and ``inputs``) are never
    written, and an output equal to, inside, or containing one of them is refused. ``direct_io`` writes
    safetensors files with O_DIRECT (None: when fsync is on and the file has at least
    DIRECT_IO_MIN_BYTES).
    """
    t_start = time.perf_counter()
    fmt = fmt or default_format(output, template)
    out = check_output(output, [*([template] if template is not None else []), *inputs], force=force)
    out, fname = output_layout(out, fmt, template)
    check_merge_output(out)
    infos = dict(infos)
    aliases = {a: c for a, c in (template.aliases if template is not None else {}).items() if c in infos}
    tmp = staging_dir(out)
    stream = _PieceStream(tensors, infos)
    files: list[str] = []
    try:
        folder_out = fmt.startswith("hf-") or not fname or out.suffix not in WEIGHT_SUFFIXES
        meta = dict(metadata or {})
        written, t_sync = 0, 0.0
        if fmt in ("hf-safetensors", "safetensors"):
            if fmt == "hf-safetensors":
                meta = {"format": "pt", **meta}
                shards = _shard_plan(infos, shard_size)
                files = _shard_names("model", ".safetensors", len(shards))
            else:
                shards, files = [list(infos)], [fname]
                if aliases:
                    meta["extramerge.aliases"] = json.dumps(aliases, sort_keys=True)
                meta = {"format": "pt", **meta} if meta else meta
            written, t_sync = _write_safetensors_shards(
                tmp, stream, infos, shards, files, meta, fsync, direct_io
            )
            if len(shards) > 1:
                files.append(_write_index(tmp, "model.safetensors.index.json", infos, shards, files, {}))
        else:
            state = _collect(stream, infos)
            written = sum(i.nbytes for i in infos.values())
            if fmt == "hf-bin":
                shards = _shard_plan(infos, shard_size)
                files = _shard_names("pytorch_model", ".bin", len(shards))
                extra_names: dict[str, list[str]] = {}
                for shard, f in zip(shards, files, strict=True):
                    part = {n: state[n] for n in shard}
                    part_aliases = {a: c for a, c in aliases.items() if c in part}
                    extra_names[f] = list(part_aliases)
                    t_sync += _torch_save(_torch_object(None, part, part_aliases), tmp / f, fsync)
                if len(shards) > 1:
                    full = [shard + extra_names[f] for shard, f in zip(shards, files, strict=True)]
                    files.append(_write_index(tmp, "pytorch_model.bin.index.json", infos, full, files, {}))
            else:
                t_sync += _torch_save(_torch_object(template, state, aliases), tmp / fname, fsync)
                files = [fname]
            del state
        stream.finish()
        if fmt.startswith("hf-") and template is not None:
            files += _copy_hf_files(template, tmp, infos)
        rec_name = "merge.json" if folder_out else _record_path(out).name
        if record is not None:
            (tmp / rec_name).write_text(json.dumps(dict(record), indent=1, default=_jsonable) + "\n")
            files.append(rec_name)
        if fsync:
            t0 = time.perf_counter()
            _fsync_path(tmp)
            t_sync += time.perf_counter() - t0
        t_publish = time.perf_counter()
        with outputs.locked(out):  # a concurrent merge to the same output publishes before or after us
            check_merge_output(out)  # again: another run may have published there while we merged
            if folder_out:
                publish(tmp, out, force)
                published = [out / f for f in files]
            else:
                if record is not None:
                    publish(tmp / rec_name, _record_path(out), force=True)  # vetted by check_merge_output
                publish(tmp / fname, out, force)
                tmp.rmdir()
                published = [out] + ([_record_path(out)] if record is not None else [])
        if fsync:
            _fsync_path(out.parent)
        t_publish = time.perf_counter() - t_publish
    except BaseException:
        outputs.discard(tmp)
        raise
    return WriteResult(written, published, time.perf_counter() - t_start, t_sync, t_publish)


def _jsonable(o):
    """numpy arrays/scalars and tensors as numbers, Paths and the rest as strings."""
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _write_index(folder, index_name, infos, shards, files, extra_meta) -> str:
    weight_map = {n: f for shard, f in zip(shards, files, strict=False) for n in shard}
    total = sum(i.nbytes for i in infos.values())
    params = sum(i.numel for i in infos.values())
    doc = {
        "metadata": {"total_size": total, "total_parameters": params, **extra_meta},
        "weight_map": weight_map,
    }
    (folder / index_name).write_text(json.dumps(doc, indent=2) + "\n")
    return index_name
