"""The write phase of a merge run by several processes (``write_ranked``).

Rank 0 checks the output, creates the staging folder beside it and every output file at its final size
with its header (the layout of ``io.shards.safetensors_files``, the one the one-process writer streams);
the ranks learn the folder's path, then each writes the merged bytes of its own units at their offsets
and fsyncs; rank 0 writes the index, side files and merge.json and publishes (``io.writer
.publish_checkpoint``, under the output lock). Each step ends with ``distributed.agreed``: a failure on
any rank fails every rank, and rank 0 removes the staging folder.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from .. import distributed
from ..io import Checkpoint, TensorInfo, WriteResult, output_layout
from ..io.outputs import discard, staging_dir
from ..io.ranged import RangedWriter, create_files
from ..io.shards import safetensors_files, write_safetensors_index
from ..io.writer import output_aliases, prepare_output, publish_checkpoint

__all__ = ["RANKED_FORMATS", "one_process_only", "write_ranked"]

RANKED_FORMATS = ("safetensors", "hf-safetensors")


def one_process_only(fmt: str) -> str:
    """The error message for an output format several processes cannot write."""
    return (
        f"output format {fmt} is written by one process: run without torchrun/srun, or write safetensors "
        "(a .safetensors file or an hf-safetensors folder)"
    )


def write_ranked(
    group: distributed.Group,
    units: Sequence[list[tuple[str, int, int]]],
    pieces: Iterator[tuple[str, np.ndarray]],
    *,
    output: Path,
    fmt: str,
    template: Checkpoint | None,
    infos: Mapping[str, TensorInfo],
    shard_size: int,
    metadata: Mapping[str, str] | None,
    record: Mapping | None,
    force: bool,
    inputs: Iterable[Checkpoint],
    fsync: bool,
) -> WriteResult:
    """Write this rank's ``units`` (segments (name, start, stop) in elements) from ``pieces`` (one flat
    array per segment, in order) into the output every rank writes a part of; collective. Returns the
    whole output's bytes and, on rank 0, the published files."""
    if fmt not in RANKED_FORMATS:
        raise ValueError(one_process_only(fmt))
    t_start = time.perf_counter()
    fname = output_layout(output, fmt, template)[1]
    aliases = output_aliases(template, infos)
    files = safetensors_files(infos, fmt, fname, shard_size=shard_size, metadata=metadata, aliases=aliases)
    tmp: Path | None = None
    published: list[Path] = []
    t_sync = t_publish = 0.0
    try:
        with distributed.agreed(group):
            if group.leader:
                out, _ = prepare_output(output, fmt, template, inputs, force)
                tmp = staging_dir(out)
                create_files(tmp, files)
        folder = Path(os.fsdecode(group.broadcast_bytes(os.fsencode(tmp) if tmp is not None else None)))
        with distributed.agreed(group):
            writer = RangedWriter(folder, files, writeback=fsync)
            try:
                segments = (seg for segs in units for seg in segs)
                for (name, a, b), (got, arr) in zip(segments, pieces, strict=True):
                    if got != name or arr.size != b - a:
                        raise RuntimeError(f"merge produced {got} for segment {name}[{a}:{b}]")
                    writer.write(name, a * infos[name].itemsize, memoryview(arr.reshape(-1).view(np.uint8)))
                t_sync = writer.close(fsync)
            finally:
                writer.abort()
        with distributed.agreed(group):
            if group.leader:
                names = [f.name for f in files] + write_safetensors_index(tmp, files, infos)
                published, t_fin, t_publish = publish_checkpoint(
                    tmp, out, names, fmt=fmt, fname=fname, template=template, infos=infos, record=record,
                    force=force, fsync=fsync,
                )  # fmt: skip
                t_sync += t_fin
    except BaseException:
        if tmp is not None:
            discard(tmp)
        raise
    written = sum(i.nbytes for i in infos.values())
    return WriteResult(written, published, time.perf_counter() - t_start, t_sync, t_publish)
