"""Old import path of the output policy (checks, staging, publishing), kept working: it lives in
``extramerge.io.outputs``."""

from __future__ import annotations

from .io.outputs import (
    MARKER,
    Terminated,
    check_file,
    check_merge_output,
    check_output,
    check_record_path,
    clean_stale,
    discard,
    interruptible,
    locked,
    mark,
    marked,
    overlap,
    own_json,
    publish,
    refuse_special,
    staging_dir,
    write_file,
)

__all__ = [
    "MARKER",
    "Terminated",
    "check_output",
    "check_merge_output",
    "check_record_path",
    "overlap",
    "refuse_special",
    "staging_dir",
    "discard",
    "locked",
    "publish",
    "clean_stale",
    "mark",
    "marked",
    "own_json",
    "check_file",
    "write_file",
    "interruptible",
]
