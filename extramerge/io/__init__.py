"""Checkpoint I/O: lazy readers and streaming, atomic writers for every common layout, and the policies
for what is read (``safety``) and what may be written or replaced (``outputs``).

Readers never load tensor data up front: opening a checkpoint parses headers only (safetensors JSON
headers, validated against the file size; PyTorch files memory-mapped with ``torch.load(mmap=True)``),
so a malformed input fails in milliseconds, before any merge work starts.

Formats (``Checkpoint.format``; each an entry of ``formats.REGISTRY``):
    hf-safetensors  folder with model.safetensors, or model-0000k-of-0000K.safetensors + index json
    hf-bin          folder with pytorch_model.bin, or sharded pytorch_model-*.bin + index json
    safetensors     a single .safetensors file
    torch           a .pt/.pth/.bin/.ckpt file: a state dict, or a training checkpoint that nests one
                    ({'model': ...} as nanoGPT/nanochat write, {'state_dict': ...}, ...); ``_orig_mod.``
                    (torch.compile) and ``module.`` (DDP) prefixes are stripped
    dcp             a torch.distributed.checkpoint folder (.metadata + __R_I.distcp; torchtitan, FSDP2 loops)
    megatron        a Megatron-core torch_dist iteration folder (a DCP folder with metadata.json); a run
                    root of iter_XXXXXXX/ folders and latest_checkpointed_iteration.txt expands to them
                    (optimizer and other training-state keys of both are not merged: ``state_tensors``)

Safetensors files are read and written with numpy alone (bfloat16 and float8 through ``ml_dtypes``):
torch is imported only when a PyTorch file is read or written, or when a caller asks for a torch tensor
(``Checkpoint.read``/``read_range``/``view_range`` return torch tensors unless ``numpy=True``). Dtypes
are held as safetensors codes (``TensorInfo.dtype_str``: 'F32', 'BF16', ...).

Modules, one concern each: ``errors`` (CheckpointError), ``safety`` (input policy), ``pickles`` (every
untrusted pickle scanned before it is unpickled: a memory budget, BUILD limits, no compressed zip records),
``layout`` (names on disk), ``formats`` (the format registry: each format's suffixes, reader, writer and what
a merge writing it plans for), ``dtypes``, ``raw`` (madvise, direct I/O), ``mapped`` (a memory-mapped input
file), ``safetensors`` and ``torchfile`` (the two file formats: readers, and the torch writer), ``dcp/`` (DCP
and Megatron folders: reader and writer; ``dcp/cover`` checks that chunks tile a tensor), ``checkpoint``
(Checkpoint), ``discovery`` (open/load checkpoints), ``outputs`` (output policy, staging and publishing),
``shards`` (the safetensors file layout: shards, headers, offsets, index; the streaming safetensors writer),
``writer`` (write_checkpoint) and ``ranged`` (preallocated outputs written at byte offsets by several
processes).
"""

from __future__ import annotations

from .checkpoint import Checkpoint, check_compatible
from .discovery import load_checkpoints, open_all, open_checkpoint
from .dtypes import TensorInfo, numpy_dtype, to_numpy, to_torch
from .errors import CheckpointError
from .formats import FORMATS
from .layout import TORCH_SUFFIXES, WEIGHT_SUFFIXES, parse_step
from .outputs import check_merge_output, check_output, publish
from .writer import WriteResult, default_format, output_layout, safetensors_order, write_checkpoint

__all__ = [
    "CheckpointError",
    "TensorInfo",
    "Checkpoint",
    "WriteResult",
    "FORMATS",
    "TORCH_SUFFIXES",
    "WEIGHT_SUFFIXES",
    "parse_step",
    "open_checkpoint",
    "load_checkpoints",
    "open_all",
    "check_compatible",
    "check_output",
    "check_merge_output",
    "publish",
    "output_layout",
    "default_format",
    "safetensors_order",
    "write_checkpoint",
    "numpy_dtype",
    "to_numpy",
    "to_torch",
]
