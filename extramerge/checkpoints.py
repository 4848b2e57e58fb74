"""Old import path of the checkpoint readers and writer, kept working: they live in ``extramerge.io``."""

from __future__ import annotations

from .io import (
    FORMATS,
    TORCH_SUFFIXES,
    WEIGHT_SUFFIXES,
    Checkpoint,
    CheckpointError,
    TensorInfo,
    WriteResult,
    check_compatible,
    check_merge_output,
    check_output,
    default_format,
    load_checkpoints,
    numpy_dtype,
    open_checkpoint,
    output_layout,
    parse_step,
    publish,
    safetensors_order,
    staging_dir,
    to_numpy,
    to_torch,
    write_checkpoint,
)
from .io.outputs import check_record_path
from .io.raw import DIRECT_BLOCK, DIRECT_IO_MIN_BYTES

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
    "TORCH_SUFFIXES",
    "WEIGHT_SUFFIXES",
    "check_record_path",
    "DIRECT_BLOCK",
    "DIRECT_IO_MIN_BYTES",
]
