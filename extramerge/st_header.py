"""Strict validation of a safetensors header (untrusted input), before any field is used.

    header = parse_header(path, raw, data_start, size, itemsizes)   # -> Header(metadata, entries)

The header is ``{name: {"dtype": CODE, "shape": [ints], "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}``. Every rule below is checked and a violation raises one CheckpointError
naming the file and the offending field (tensor names escaped and shortened, never raw bytes):

* JSON: UTF-8, an object, no duplicate keys, no NaN/Infinity/overflowing numbers, bounded nesting;
* ``__metadata__``: absent, or an object of strings to strings;
* each entry: an object with exactly a known ``dtype`` code, a ``shape`` list of non-negative integers and
  ``data_offsets`` of two integers 0 <= begin <= end, with end - begin = numel · itemsize;
* byte ranges lie within the file's data section and do not overlap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from .safety import _error, parse_json, shown

__all__ = ["Entry", "Header", "parse_header"]

_FIELDS = frozenset({"dtype", "shape", "data_offsets"})


class Entry(NamedTuple):
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class Header(NamedTuple):
    metadata: dict[str, str]
    entries: list[Entry]  # sorted by begin (the stored order)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _metadata(path: Path, meta) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise _error(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    for k, v in meta.items():
        if not isinstance(v, str):
            raise _error(
                f"{path}: corrupt safetensors header (__metadata__ field {shown(k)} is not a string)"
            )
    return meta


def _entry(path: Path, name: str, meta, itemsizes: Mapping[str, int]) -> Entry:
    where = f"{path}: tensor {shown(name)}"
    if not isinstance(meta, dict) or set(meta) != _FIELDS:
        raise _error(f"{where}: corrupt header entry (expected exactly dtype, shape and data_offsets)")
    code, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(code, str) or code not in itemsizes:
        raise _error(f"{where}: unsupported or invalid dtype {shown(code, 20)}")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise _error(f"{where}: invalid shape (expected a list of non-negative integers)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise _error(f"{where}: invalid data_offsets (expected two integers)")
    begin, end = offsets
    if not 0 <= begin <= end or end - begin != math.prod(shape) * itemsizes[code]:
        raise _error(f"{where} has data offsets inconsistent with its shape and dtype ([{begin}, {end}])")
    return Entry(name, code, tuple(shape), begin, end)


def parse_header(path: Path, raw: bytes, data_start: int, size: int, itemsizes: Mapping[str, int]) -> Header:
    """Validated header of ``path`` (``size`` bytes) from its JSON bytes ``raw``; the data section starts
    at byte ``data_start``."""
    header = parse_json(raw, f"{path}: corrupt safetensors header")
    if not isinstance(header, dict):
        raise _error(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = _metadata(path, header.pop("__metadata__", None))
    entries = sorted((_entry(path, n, m, itemsizes) for n, m in header.items()), key=lambda e: e.begin)
    end = 0
    for e in entries:
        if data_start + e.end > size:
            raise _error(
                f"{path}: truncated file: tensor {shown(e.name)} ends at byte {data_start + e.end} but the "
                f"file has {size} bytes"
            )
        if e.begin < end and e.end > e.begin:
            raise _error(f"{path}: tensor {shown(e.name)}: data_offsets overlap another tensor's bytes")
        end = max(end, e.end)
    return Header(metadata, entries)
