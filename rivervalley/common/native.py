"""Compiled kernels both packages may use: the public face of :mod:`rivervalley._native`, which builds them
(system C compiler on first use, cached, checked, loaded with ctypes; ``RIVERVALLEY_NATIVE=0`` opts out).

``gram_kernel`` loads ``rv_gram_diff`` (``rivervalley/_native/gram.c``); ``gram_of_differences`` runs it on
numpy arrays: Σ_k (x_i − x_ref)(x_j − x_ref) and ‖x_ref‖² in float64, in one pass over float32, bfloat16,
float16 or float64 inputs (widened exactly, products accumulated in registers).
"""

from __future__ import annotations

import ctypes

import numpy as np

from rivervalley import _native

__all__ = ["gram_kernel", "gram_kernel_status", "gram_of_differences"]

_DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2, "float64": 3}  # gram.c's codes


def gram_kernel():
    """gram.c's library (ctypes.CDLL), or None: no C compiler, ``RIVERVALLEY_NATIVE=0`` or a failed build
    (:func:`gram_kernel_status` says which). Built or loaded once per process: call it before forking."""
    return _native.load(_native.GRAM)


def gram_kernel_status() -> dict:
    """``{'available': bool, 'detail': str}`` for :func:`gram_kernel`."""
    return _native.status(_native.GRAM)


def gram_of_differences(lib, xs: list, ref: int) -> tuple[np.ndarray, float] | None:
    """For flat arrays ``xs`` of equal length (one per checkpoint) and d_i = x_i − x_ref: the (N−1) × (N−1)
    matrix Σ_k d_i[k] d_j[k] (rows and columns: the indices other than ``ref``, in order) and Σ_k x_ref[k]²,
    in float64, from ``lib`` (:func:`gram_kernel`). None for inputs it does not take (another dtype, a
    strided or misaligned array). The same inputs always give the same bits (a fixed summation order)."""
    codes = []
    for x in xs:
        code = _DTYPE_CODES.get(x.dtype.name)
        if code is None or x.ndim != 1 or not x.flags.c_contiguous or x.ctypes.data % x.itemsize:
            return None
        codes.append(code)
    n, m = len(xs), xs[0].size
    if n < 2 or any(x.size != m for x in xs) or not 0 <= ref < n:
        raise ValueError(f"need at least 2 arrays of equal length and 0 <= ref < {n}")
    out = np.empty((n - 1) * (n - 1) + 1)
    ptrs = (ctypes.c_void_p * n)(*[x.ctypes.data for x in xs])
    code_arr = np.asarray(codes, dtype=np.int32)
    if lib.rv_gram_diff(ptrs, code_arr.ctypes.data, n, ref, m, out.ctypes.data) != 0:
        raise MemoryError("rv_gram_diff: no memory for its work buffer")
    return out[:-1].reshape(n - 1, n - 1), float(out[-1])
