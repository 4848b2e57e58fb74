"""The arithmetic of a merge: Σ_j w_j x_j accumulated in float32 or float64 block by block (in L2), the
dtype names of outputs and accumulators, and finiteness checks.
"""

from __future__ import annotations

import numpy as np

from ..io import TensorInfo
from .units import Scratch

__all__ = ["BLOCK", "all_finite", "output_code", "accumulate_name", "weighted_into"]

BLOCK = 64 * 2**10  # elements per arithmetic block: acc and tmp (float32) take 512 KiB of L2
_DTYPES = {
    "float32": "F32", "fp32": "F32", "float": "F32",
    "bfloat16": "BF16", "bf16": "BF16",
    "float16": "F16", "fp16": "F16", "half": "F16",
    "float64": "F64", "fp64": "F64", "double": "F64",
}  # fmt: skip



def all_finite(a: np.ndarray) -> bool:
    if a.dtype.kind != "f":  # bfloat16 / float8 (ml_dtypes): check in float32
        a = a.astype(np.float32)
    return bool(np.isfinite(a).all())



def output_code(info: TensorInfo, dtype: str) -> str:
    if dtype == "same" or not info.is_float:
        return info.dtype_str
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; choose same, float32, bfloat16, float16 or float64"
        ) from None



def accumulate_name(accumulate) -> str:
    name = str(accumulate).removeprefix("torch.")
    name = {"F32": "float32", "F64": "float64"}.get(name, name)
    name = {"fp32": "float32", "float": "float32", "fp64": "float64", "double": "float64"}.get(name, name)
    if name not in ("float32", "float64"):
        raise ValueError(f"accumulate must be float32 or float64, got {accumulate!r}")
    return name


def weighted_into(out: np.ndarray, xs: list, ws: list, acc: np.dtype, scratch: Scratch, check: bool):
    """out = Σ_k ws[k] xs[k], accumulated in ``acc`` block by block so the block's acc and tmp stay in
    L2; cast to out's dtype (round-to-nearest-even) per block. Returns the first block start whose
    result is not finite (when ``check``), else None."""
    n = out.size
    direct = out.dtype == acc
    blk = min(BLOCK, max(n, 1))
    tmp_all = scratch.get("tmp", (blk,), acc)
    acc_all = tmp_all if direct else scratch.get("acc", (blk,), acc)
    for s in range(0, n, blk):
        e = min(s + blk, n)
        m = e - s
        a = out[s:e] if direct else acc_all[:m]
        tmp = tmp_all[:m]
        for k, x in enumerate(xs):
            xb = x[s:e]
            if xb.dtype != acc:
                np.copyto(tmp, xb)  # exact widening: bfloat16/float16/float8 -> float32, float32 -> float64
                xb = tmp
            if k == 0:
                np.multiply(xb, ws[k], out=a)
            else:
                np.multiply(xb, ws[k], out=tmp)
                np.add(a, tmp, out=a)
        if check and not np.isfinite(a.sum()) and not np.isfinite(a).all():
            return s
        if not direct:
            ob = out[s:e]
            np.copyto(ob, a, casting="unsafe")
            if check and ob.dtype == np.float16 and not np.isfinite(ob).all():
                return -1 - s  # finite in the accumulator, overflowed in float16
    return None
