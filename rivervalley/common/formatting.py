"""How numbers leave the program: one bytes formatter for every message and summary, one JSON converter
for every report and record both packages write."""

from __future__ import annotations

import math
from pathlib import PurePath

__all__ = ["format_bytes", "jsonable"]


def format_bytes(n: float) -> str:
    """Bytes in binary units: ``512 B``, ``1.50 KiB``, ``2.00 GiB`` (two decimals above bytes)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def jsonable(x, *, finite: bool = False):
    """``x`` with every value JSON can hold as it is and the rest converted: numpy arrays, torch tensors and
    numpy scalars to lists and numbers, mapping keys to strings, paths to strings. With ``finite`` NaN and
    ±inf become None (strict JSON); without, they stay floats (Python's json writes NaN/Infinity).
    Anything else raises TypeError naming its type."""
    if isinstance(x, dict):
        return {str(k): jsonable(v, finite=finite) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v, finite=finite) for v in x]
    if x is None or isinstance(x, (str, bool)):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return None if finite and not math.isfinite(x) else float(x)
    if isinstance(x, PurePath):
        return str(x)
    if hasattr(x, "tolist"):  # numpy arrays and scalars, torch tensors
        return jsonable(x.tolist(), finite=finite)
    raise TypeError(f"cannot write a {type(x).__name__} as JSON")
