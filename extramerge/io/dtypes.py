"""Tensor dtypes without torch: the safetensors dtype codes ('F32', 'BF16', ...) and their numpy dtypes
(bfloat16 and float8 through ``ml_dtypes``), ``TensorInfo`` (a stored tensor's name, shape and dtype), and
zero-copy conversions between numpy arrays and torch tensors (torch is imported only when one is asked for).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ST_DTYPES",
    "ST_RANK",
    "ST_ITEMSIZE",
    "TensorInfo",
    "dtype_code",
    "dtype_name",
    "numpy_dtype",
    "to_numpy",
    "to_torch",
    "is_torch",
    "bytes_of",
]

# Safetensors dtype codes -> (torch/numpy name, bytes per element). Insertion order is the safetensors
# library's dtype order; save_file writes tensors by descending dtype.
ST_DTYPES = {
    "BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1), "F8_E5M2": ("float8_e5m2", 1),
    "F8_E4M3": ("float8_e4m3fn", 1), "I16": ("int16", 2), "U16": ("uint16", 2), "F16": ("float16", 2),
    "BF16": ("bfloat16", 2), "I32": ("int32", 4), "U32": ("uint32", 4), "F32": ("float32", 4),
    "C64": ("complex64", 8), "F64": ("float64", 8), "I64": ("int64", 8), "U64": ("uint64", 8),
}  # fmt: skip
ST_RANK = {code: i for i, code in enumerate(ST_DTYPES)}
ST_ITEMSIZE = {code: nbytes for code, (_, nbytes) in ST_DTYPES.items()}
ST_METADATA = "__metadata__"  # the safetensors header key of its metadata: no tensor may have this name
_CODE_OF = {name: code for code, (name, _) in ST_DTYPES.items()}
_FLOAT_CODES = frozenset({"F8_E5M2", "F8_E4M3", "F16", "BF16", "F32", "F64"})
_ML_DTYPES = ("bfloat16", "float8_e5m2", "float8_e4m3fn")  # numpy has no such dtypes: ml_dtypes does


def dtype_code(dtype) -> str:
    """Safetensors code ('F32', 'BF16', ...) of a torch dtype, numpy dtype, code or name ('float32');
    a torch dtype safetensors cannot store keeps its torch name ('complex128')."""
    if isinstance(dtype, str):
        if dtype in ST_DTYPES:
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
    name = dtype_name(dtype_code(dtype))
    if name in _ML_DTYPES:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def dtype_name(code: str) -> str:
    """'float32', 'bfloat16', ...: torch's dtype name without the 'torch.' prefix."""
    return ST_DTYPES[code][0] if code in ST_DTYPES else code


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
        object.__setattr__(self, "dtype_str", dtype_code(dtype))

    @property
    def dtype(self):
        """The torch dtype (imports torch)."""
        import torch

        return getattr(torch, self.dtype_name)

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype_str)

    @property
    def np_dtype(self) -> np.dtype:
        return numpy_dtype(self.dtype_str)

    @property
    def itemsize(self) -> int:
        known = ST_DTYPES.get(self.dtype_str)
        return known[1] if known else self.dtype.itemsize

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def is_float(self) -> bool:
        if self.dtype_str in ST_DTYPES:
            return self.dtype_str in _FLOAT_CODES
        return self.dtype.is_floating_point


def to_torch(a: np.ndarray):
    """A torch tensor sharing ``a``'s memory (bfloat16/float8 through a byte view; imports torch)."""
    import torch

    tdt = getattr(torch, dtype_name(dtype_code(a.dtype)))
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


def is_torch(t) -> bool:
    return type(t).__module__.startswith("torch")


def bytes_of(buf) -> np.ndarray:
    """Flat uint8 numpy view of a contiguous numpy array or CPU tensor."""
    if is_torch(buf):
        import torch

        return buf.reshape(-1).view(torch.uint8).numpy()
    return buf.reshape(-1).view(np.uint8)
