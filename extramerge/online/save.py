"""Saving an online merge, atomically, with the merge.json record the offline merges write.

Plain tensors stream through ``extramerge.io.write_checkpoint`` (one tensor in memory at a time; ``fmt`` is
passed through: safetensors, hf-safetensors with a ``template``, hf-bin, torch, and any format the writer
learns). DTensor shards (FSDP2) are saved with ``torch.distributed.checkpoint.save``, each rank its shard,
into a staging folder that rank 0 publishes after a barrier. Power-EMA snapshots (``save_snapshots``) carry
γ, step and update count in their record and safetensors metadata, for a post-hoc EMA fit.

The merges are read through the ``Merges`` protocol (``OnlineMerger`` is one), so imports run one way: the
merger imports this module, never the reverse.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

import torch

from extramerge.io import (
    TensorInfo,
    check_merge_output,
    check_output,
    publish,
    write_checkpoint,
)
from extramerge.io.layout import GAMMA_KEY, STEP_KEY
from rivervalley.common.publish import locked, publishing

from .averages import DTensor
from .spec import Average

__all__ = ["Merges", "save_merge", "save_snapshots", "record_of"]


class Merges(Protocol):
    """What saving reads of the merges kept online (``OnlineMerger`` is one): the parameters, each merge
    tensor by tensor or as a state dict, and what its record says. Saving never imports the merger."""

    named: list[tuple[str, torch.Tensor]]
    items: Mapping[str, Average]
    snapshot_dir: object
    fmt: str | None

    def describe(self, name: str) -> dict: ...

    def merged(self, name: str) -> Iterable[tuple[str, torch.Tensor]]: ...

    def state_dict_of(self, name: str) -> dict[str, torch.Tensor]: ...


def record_of(merger: Merges, name: str, fmt: str | None) -> dict:
    return {
        "tool": "extramerge",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **merger.describe(name),
        "output_format": fmt,
    }


def _sharded(merger: Merges) -> bool:
    return DTensor is not None and any(isinstance(p, DTensor) for _, p in merger.named)


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def save_merge(merger: Merges, name: str, output, *, fmt=None, template=None, force=False, metadata=None):
    """Write the merge ``name`` to ``output``: a DCP folder when the parameters are DTensors (collective:
    every rank calls it), else a checkpoint in ``fmt`` (None: from the output's suffix or ``template``;
    under torch.distributed only rank 0 writes). Returns the published path (None on other ranks)."""
    record = record_of(merger, name, "dcp" if _sharded(merger) else fmt)
    if _sharded(merger):
        return _save_dcp(merger, name, Path(output), record, force)
    if _rank() != 0:
        return None
    tensors = [(n, torch.Size(p.shape), p.dtype) for n, p in merger.named]
    infos = {n: TensorInfo(n, shape, dtype) for n, shape, dtype in tensors}
    meta = {f"extramerge.online.{k}": json.dumps(v) for k, v in record.items() if not isinstance(v, list)}
    write_checkpoint(
        output,
        ((n, t.cpu()) for n, t in merger.merged(name)),
        infos=infos,
        template=template,
        fmt=fmt,
        metadata={**meta, **(metadata or {})},
        record=record,
        force=force,
    )
    return Path(output)


def _save_dcp(merger: Merges, name: str, out: Path, record: dict, force: bool) -> Path:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    state = merger.state_dict_of(name)
    group = dist.is_available() and dist.is_initialized()
    leader = _rank() == 0
    box: list = [None]
    with contextlib.ExitStack() as stage:  # rank 0's staging folder, removed with its parents on failure
        if leader:
            try:
                out = check_output(out, force=force)
                check_merge_output(out)
                box[0] = str(stage.enter_context(publishing(out, commit=None)))  # published below, locked
            except Exception as e:  # every rank must learn of it, or the others wait forever
                box[0] = e
        if group:
            dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], Exception):
            raise box[0]
        tmp = Path(box[0])
        dcp.save(state, checkpoint_id=str(tmp))
        if group:
            dist.barrier()
        if leader:
            (tmp / "merge.json").write_text(json.dumps(record, indent=1) + "\n")
            with locked(out):
                checked = check_merge_output(out)
                publish(tmp, out, force, expect=checked[out])  # only the output checked is replaced
        if group:
            dist.barrier()
    return out


def save_snapshots(merger: Merges, step: int) -> list:
    """Save every power-EMA (pema) as ``snapshot_dir/NAME/step_XXXXXX`` (its record holds γ, the step and
    the update count: what a post-hoc EMA fit needs)."""
    out = []
    for name, a in merger.items.items():
        if a.kind == "pema":
            dst = Path(merger.snapshot_dir) / name / f"step_{step:06d}"
            meta = {GAMMA_KEY: repr(float(a.value)), STEP_KEY: str(int(step))}  # for --method posthoc-ema
            out.append(save_merge(merger, name, dst, fmt=merger.fmt, force=True, metadata=meta))
    return out
