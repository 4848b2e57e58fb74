"""torch.distributed.checkpoint (DCP) folders and Megatron ``torch_dist`` iterations: read lazily per
tensor without a process group, and written so that torch's own ``dcp.load`` (and the trainer that wrote
the input) loads the merge back.

Modules: ``metadata`` (the ``.metadata`` pickle, read with an allowlist and validated), ``chunks`` (where
a chunk's elements lie in its ``.distcp`` file), ``source`` (DcpSource: a Checkpoint's source), ``save``
(the output layout and the writing of files and metadata), ``folder`` (recognising, opening and writing
DCP and Megatron folders).
"""

from __future__ import annotations

from .folder import (
    DcpOutput,
    finish_output,
    is_dcp_folder,
    megatron_backend,
    open_dcp,
    plan_output,
    write_files,
    write_output,
)
from .metadata import DcpIndex, read_index
from .save import (
    OutChunk,
    Written,
    chunk_feed,
    distcp_name,
    plan_dcp,
    write_distcp,
    write_metadata,
    written_from_json,
    written_json,
)
from .source import DcpSource

__all__ = [
    "DcpIndex",
    "DcpOutput",
    "DcpSource",
    "OutChunk",
    "Written",
    "chunk_feed",
    "distcp_name",
    "finish_output",
    "is_dcp_folder",
    "megatron_backend",
    "open_dcp",
    "plan_dcp",
    "plan_output",
    "read_index",
    "write_distcp",
    "write_files",
    "write_metadata",
    "write_output",
    "written_from_json",
    "written_json",
]
