"""Old import path of the input policy, kept working: it lives in ``extramerge.io.safety``."""

from __future__ import annotations

from .io.safety import (
    JSON_LIMIT,
    LINE_LIMIT,
    distinct,
    folder_files,
    inside,
    jsonl,
    kind,
    load_json,
    member,
    open_regular,
    parse_json,
    read_text,
    regular,
    shown,
)

__all__ = [
    "shown",
    "kind",
    "member",
    "inside",
    "regular",
    "open_regular",
    "read_text",
    "parse_json",
    "load_json",
    "jsonl",
    "folder_files",
    "distinct",
    "JSON_LIMIT",
    "LINE_LIMIT",
]
