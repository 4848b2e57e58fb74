"""The merge pass: ``merge_weights`` checks the inputs, weights, output and resources, then streams
Σ_j w_j θ_j unit by unit from worker threads to the checkpoint writer.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import resource
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rivervalley.common.formatting import format_bytes
from rivervalley.common.resources import require_memory

from .. import distributed
from ..io import (
    Checkpoint,
    CheckpointError,
    TensorInfo,
    check_compatible,
    check_merge_output,
    check_output,
    default_format,
    formats,
    output_layout,
    write_checkpoint,
)
from ..io.raw import DIRECT_BLOCK
from ..io.writer import carried_bytes
from . import ranked, units
from .arith import BLOCK, accumulate_name, all_finite, output_code, weighted_into
from .parallel import ordered_map
from .summary import MergeSummary, progress_bar, rss_now, rss_peak

__all__ = ["MERGE_CHUNK_BYTES", "merge_weights"]

MERGE_CHUNK_BYTES = 4 * 2**20  # per checkpoint and unit: 8 checkpoints x 4 MiB mapped per worker


def _raise_fd_limit(need: int) -> None:
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < need:
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY else min(hard, need), hard)
            )
    except (ValueError, OSError):
        pass


def _first_existing(p: Path) -> Path:
    p = Path(os.path.abspath(p))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _nonfinite_error(ckpts, active, name, a, b, acc_name) -> CheckpointError:
    for j in active:
        piece = ckpts[j].read_range(name, a, b, numpy=True)
        if not all_finite(piece):
            return CheckpointError(
                f"tensor '{name}' in {ckpts[j].name} contains NaN or Inf values (allow_nonfinite=True / "
                "--allow-nonfinite merges anyway)"
            )
    return CheckpointError(
        f"tensor '{name}': the merged values overflow {acc_name} (try accumulate='float64')"
    )


def merge_weights(
    ckpts: Sequence[Checkpoint],
    weights,
    output: str | os.PathLike,
    *,
    dtype: str = "same",
    accumulate: str = "float32",
    shard_size: int = 5 * 2**30,
    allow_nonfinite: bool = False,
    dry_run: bool = False,
    force: bool = False,
    progress: bool = True,
    metadata: dict[str, str] | None = None,
    record: dict | None = None,
    fmt: str | None = None,
    chunk_bytes: int = MERGE_CHUNK_BYTES,
    prefetch: int = 4,
    workers: int = 2,
    fsync: bool = True,
    zero_copy: bool = True,
    direct_io: bool | None = None,
) -> MergeSummary:
    """Write Σ_j w_j θ_j of ``ckpts`` (oldest first, one weight each) to ``output``, streaming.

    Floating tensors accumulate in ``accumulate`` (float32 or float64) and are written in ``dtype``
    ('same' keeps each tensor's dtype; 'float32', 'bfloat16', 'float16' cast floating tensors, rounding
    to nearest even). Integer and bool tensors are copied from the newest checkpoint; checkpoints with
    weight exactly 0 are not read. NaN/Inf in an input raises CheckpointError naming the tensor and file
    (unless ``allow_nonfinite``). Everything is validated before the first byte is read: compatibility
    of all checkpoints, the weights, the output path and the free disk space; ``dry_run`` stops there and
    returns projected bytes and memory. ``fmt`` defaults to the output's suffix (.safetensors, .pt, ...)
    or else the newest checkpoint's format family (see checkpoints.default_format); ``record`` extends the
    merge.json record.

    Tuning: units of ``chunk_bytes`` per checkpoint are computed on ``workers`` threads (0: inline), at
    most ``prefetch`` units ahead of the writer; ``zero_copy`` reads safetensors through memory maps
    (pages dropped after use) instead of pread into buffers; ``fsync=False`` skips flushing the output to
    disk before it is published; ``direct_io`` (None: automatic) writes large safetensors with O_DIRECT.

    Inside a process group (``extramerge.distributed``: torchrun, srun) every rank calls this with the
    same arguments: each computes the units of its contiguous block (balanced by bytes read) on
    ``workers_per_rank`` threads and writes them at their offsets into the output rank 0 prepared and
    publishes (safetensors outputs); for a DCP or Megatron output each rank merges and writes the tensor
    elements of its own whole ``.distcp`` files (``ranked.dcp_share``) and rank 0 writes ``.metadata``.
    Either way the output is byte-identical to one process's.
    """
    t0 = time.perf_counter()
    group = distributed.current()
    leader = group is None or group.leader
    workers = distributed.workers_per_rank(workers, group)
    with distributed.agreed(group):  # a failure on any rank stops every rank here
        ckpts = list(ckpts)
        if not ckpts:
            raise ValueError("no checkpoints given")
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.size != len(ckpts):
            raise ValueError(
                f"got {w.size} weights for {len(ckpts)} checkpoints: give exactly one per checkpoint"
            )
        if not np.all(np.isfinite(w)):
            raise ValueError(f"weights must be finite, got {w.tolist()}")
        active = [j for j in range(len(ckpts)) if w[j] != 0.0]
        if not active:
            raise ValueError("all weights are zero")
        acc_name = accumulate_name(accumulate)
        infos = check_compatible(ckpts)
        template = ckpts[-1]
        fmt = fmt or default_format(output, template)
        out_infos = {n: TensorInfo(n, i.shape, output_code(i, dtype)) for n, i in infos.items()}
        spec = formats.REGISTRY.get(fmt)  # None: unknown, refused by output_layout below
        if group is not None and (spec is None or not spec.ranked):
            raise ValueError(ranked.one_process_only(fmt))
        if leader:  # rank 0 alone checks (and cleans up beside) the output
            out_path = check_output(
                output, ckpts, force=force, clean=not dry_run
            )  # a dry run changes nothing
        else:
            out_path = Path(os.path.abspath(output))
        out_path, _ = output_layout(out_path, fmt, template)  # refuses an unknown format
        if leader:
            check_merge_output(out_path)  # what --force may replace: refused now, not after the merge

        notes = []
        if acc_name != "float64" and any(i.dtype_str == "F64" for i in infos.values()):
            acc_name = "float64"  # never accumulate below the inputs' precision
            notes.append("float64 inputs: accumulating in float64")
        acc = np.dtype(acc_name)
        if abs(w.sum() - 1.0) > 1e-6:
            notes.append(f"weights sum to {w.sum():.6g}, not 1: the result is not an affine merge")
        copied = [n for n, i in infos.items() if not i.is_float]
        resident = any(formats.get(ckpts[j].format).resident_reads for j in active)
        bytes_read = sum(i.nbytes * (len(active) if i.is_float else 1) for i in infos.values())
        carried, held = carried_bytes(template, fmt)  # side files, DCP byte entries: copied whole
        bytes_written = sum(i.nbytes for i in out_infos.values()) + carried
        chunk = max(1, chunk_bytes // 4)
        plan = units.plan_units(infos, chunk)
        share = None
        if group is not None and spec.whole_files_per_rank:  # each rank writes whole .distcp files
            share = ranked.dcp_share(out_infos, template, fmt=fmt, shard_size=shard_size, group=group)
        in_itemsize = max((i.itemsize for i in infos.values()), default=1)
        unit_bytes = max(
            (sum(units.align((b - a) * out_infos[n].itemsize) for n, a, b in u) for u in plan), default=1
        )
        read_bytes = max(
            (sum(units.align((b - a) * infos[n].itemsize) for n, a, b in u) for u in plan), default=1
        )
        collects = spec.collects
        n_workers = max(workers, 1)
        projected = (
            rss_now()
            + n_workers
            * len(active)
            * min(chunk, max((i.numel for i in infos.values()), default=0))
            * in_itemsize
            + (max(prefetch, n_workers) + 1) * unit_bytes
            + n_workers * 2 * BLOCK * acc.itemsize
            + (2 * DIRECT_BLOCK if not collects else 0)  # the direct-I/O blocks
            + (bytes_written - carried if collects else 0)
            + held
            + sum(ckpts[j].held_bytes(chunk, n_workers) for j in active)  # strided copies, DCP slabs
            + (bytes_read if resident else 0)  # e.g. torch-file inputs: pages read stay resident
        )
        free_disk = shutil.disk_usage(_first_existing(out_path.parent)).free
        if leader and bytes_written > free_disk:
            raise CheckpointError(
                f"output {output}: needs {format_bytes(bytes_written)} but only {format_bytes(free_disk)} "
                "is free there"
            )
        anon = projected - rss_now() - (bytes_read if resident else 0)  # mapped input pages can be reclaimed
        require_memory(
            anon, f"merge to {output} ({'buffers and the collected output' if collects else 'buffers'})"
        )
        if dtype == "float16" and any(i.dtype_str in ("BF16", "F32") for i in infos.values()):
            notes.append("casting to float16 can overflow values beyond ±65504; overflow raises an error")

    summary = MergeSummary(
        output=out_path,
        files=[],
        format=fmt,
        weights=[float(x) for x in w],
        steps=[c.step for c in ckpts],
        n_checkpoints=len(ckpts),
        n_read=len(active),
        n_tensors=len(infos),
        n_copied=len(copied),
        bytes_read=bytes_read,
        bytes_written=bytes_written,
        seconds=0.0,
        read_bandwidth=0.0,
        peak_rss_bytes=rss_peak(),
        merge_rss_bytes=rss_now(),
        projected_peak_rss_bytes=projected,
        dtype=dtype,
        accumulate=acc_name,
        dry_run=dry_run,
        workers=workers,
        notes=notes,
    )
    if dry_run:
        summary.seconds = time.perf_counter() - t0
        return summary

    newest = len(ckpts) - 1
    w_active = [acc.type(w[j]) for j in active]

    def sources(name: str) -> list[int]:
        return active if infos[name].is_float else [newest]

    scratch = units.Scratch()
    stats = {"read_wait": 0.0, "compute": 0.0, "wait": 0.0}
    stats_lock = threading.Lock()

    def run(item):
        """One unit on a worker: map its pages in, compute into the unit's output buffer, unmap."""
        segs, buf = item
        t_a = time.perf_counter()
        srcs, spans = units.unit_arrays(
            ckpts, infos, segs, sources, zero_copy=zero_copy, scratch=scratch, read_bytes=read_bytes
        )
        if spans:
            units.advise_spans(spans, "populate")  # page faults (and any disk reads) happen here, in one go
        t_b = time.perf_counter()
        pieces, off, nread = [], 0, 0
        try:
            for (name, a, b), xs in zip(segs, srcs, strict=True):
                oinfo = out_infos[name]
                n = b - a
                out = buf[off : off + n * oinfo.itemsize].view(oinfo.np_dtype)
                off += units.align(n * oinfo.itemsize)
                nread += sum(x.nbytes for x in xs)
                if not infos[name].is_float:
                    np.copyto(out, xs[0])
                    pieces.append((name, out))
                    continue
                with np.errstate(over="ignore", invalid="ignore"):  # non-finite results are checked
                    bad = weighted_into(out, xs, w_active, acc, scratch, not allow_nonfinite)
                if bad is not None and bad < 0:
                    raise CheckpointError(
                        f"tensor '{name}': merged values overflow float16; choose dtype float32 or bfloat16"
                    )
                if bad is not None:
                    raise _nonfinite_error(ckpts, active, name, a, b, acc_name)
                pieces.append((name, out))
        finally:
            t_c = time.perf_counter()
            if spans:
                units.advise_spans(spans, "drop")
            t_d = time.perf_counter()
            with stats_lock:
                stats["read_wait"] += (t_b - t_a) + (t_d - t_c)
                stats["compute"] += t_c - t_b
        return pieces, nread, buf

    _raise_fd_limit(sum(len(c.files) for c in ckpts) + 256)  # each memory-mapped file keeps a descriptor
    rss = [summary.merge_rss_bytes]

    def read_size(unit) -> int:
        return sum((b - a) * infos[n].itemsize * len(sources(n)) for n, a, b in unit)

    if share is not None:  # the parts of the units in this rank's files
        mine = units.clip_units(plan, share.extent)
    else:  # a block balanced by bytes read; all units in one process
        mine = [plan[u] for u in distributed.rank_block([read_size(u) for u in plan], group)]
    bar = progress_bar(sum(read_size(u) for u in mine), progress and leader)
    free: list[np.ndarray] = []

    def with_buffers():
        for segs in mine:
            yield segs, (free.pop() if free else np.empty(unit_bytes, dtype=np.uint8))

    def produce():
        results = ordered_map(run, with_buffers(), workers=workers, depth=max(prefetch, workers))
        sampled = time.perf_counter()
        with contextlib.closing(results):  # stop the workers now, even when the writer fails
            while True:
                t_a = time.perf_counter()
                item = next(results, None)
                t_b = time.perf_counter()
                stats["wait"] += t_b - t_a
                if item is None:
                    return
                pieces, nread, buf = item
                bar.update(nread)
                if t_b - sampled > 0.05:  # sample resident memory ~20 times a second
                    sampled = t_b
                    rss.append(rss_now())
                yield from pieces
                free.append(buf)  # the writer has consumed every piece of this unit

    full_record = {
        "tool": "extramerge",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "inputs": [
            {"path": str(c.path), "step": c.step, "format": c.format, "weight": float(x)}
            for c, x in zip(ckpts, w, strict=True)
        ],
        "weights": [float(x) for x in w],
        "output_format": fmt,
        "dtype": dtype,
        "accumulate": summary.accumulate,
        "tensors": len(infos),
        "copied_from_newest": copied,
        "aliases": dict(template.aliases),
        **(record or {}),
    }
    meta = {"extramerge.weights": ",".join(repr(float(x)) for x in w), **(metadata or {})}
    stream = produce()
    target = dict(infos=out_infos, template=template, fmt=fmt, shard_size=shard_size, metadata=meta)
    target.update(record=full_record, force=force, inputs=ckpts, fsync=fsync)
    try:
        if group is None:
            result = write_checkpoint(out_path, stream, direct_io=direct_io, **target)
        else:  # each rank writes its units at their offsets; rank 0 publishes
            result = ranked.write_ranked(group, mine, stream, output=out_path, share=share, **target)
    finally:
        stream.close()  # stops the workers now, not when the traceback lets go of the generator
        bar.close()
    rss.append(rss_now())
    seconds = time.perf_counter() - t0
    summary.files = result.files
    summary.bytes_written = result.bytes_written + carried  # as projected: side files, byte entries too
    summary.seconds = seconds
    summary.read_bandwidth = bytes_read / seconds if seconds > 0 else 0.0
    summary.peak_rss_bytes = rss_peak()
    summary.merge_rss_bytes = max(rss)
    if group is not None:
        summary.processes = group.world
        summary.rank_peak_rss_bytes = group.all_gather_int(max(rss))
    summary.timings = {
        "read_wait": stats["read_wait"],
        "compute": stats["compute"],
        "write": max(0.0, result.seconds - stats["wait"] - result.fsync_seconds - result.publish_seconds),
        "fsync": result.fsync_seconds,
        "publish": result.publish_seconds,
        "total": seconds,
    }
    return summary
