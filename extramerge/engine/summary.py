"""What a merge did (``MergeSummary``) and the measurements behind it: resident memory now and at its
peak, and the progress bar.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field
from pathlib import Path

from rivervalley.common.formatting import format_bytes

__all__ = ["MergeSummary", "rss_now", "rss_peak", "progress_bar"]


def rss_now() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def rss_peak() -> int:
    """This process's resident high-water mark: VmHWM (per address space, so unlike ru_maxrss it does not
    carry over the parent's peak into an exec'ed child), falling back to ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if os.uname().sysname == "Darwin" else peak * 1024


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, progress: bool):
    """A tqdm bar over bytes read with ETA (in place on a terminal, a line at most every 30 s in a log);
    importing tqdm costs ~0.1 s, so only when shown."""
    if not progress:
        return _NoBar()
    from rivervalley.common.progress import progress_bar as bar

    return bar(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merge", mininterval=0.5)


@dataclass
class MergeSummary:
    """What a merge did (or, for a dry run, would do). Bytes are tensor data bytes."""

    output: Path
    files: list[Path]
    format: str
    weights: list[float]
    steps: list[int | None]
    n_checkpoints: int
    n_read: int
    n_tensors: int
    n_copied: int
    bytes_read: int
    bytes_written: int
    seconds: float
    read_bandwidth: float
    peak_rss_bytes: int
    merge_rss_bytes: int
    projected_peak_rss_bytes: int
    dtype: str
    accumulate: str
    dry_run: bool = False
    workers: int = 0
    processes: int = 1
    rank_peak_rss_bytes: list[int] = field(default_factory=list)  # per rank, when processes > 1
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        head = (
            "extramerge dry run (nothing written)" if self.dry_run else f"extramerge merged -> {self.output}"
        )
        ws = [f"{x:+.4g}" for x in self.weights]
        w = ", ".join(ws if len(ws) <= 12 else [*ws[:4], "...", *ws[-6:]])
        steps = [s for s in self.steps if s is not None]
        span = f", steps {steps[0]}..{steps[-1]}" if len(steps) == len(self.steps) and steps else ""
        lines = [
            head,
            f"  checkpoints   {self.n_checkpoints} given{span}, {self.n_read} read (weight != 0)",
            f"  weights       [{w}] (oldest first, sum {sum(self.weights):.6g})",
            f"  tensors       {self.n_tensors} ({self.n_copied} integer/bool copied from the newest)",
            f"  format        {self.format}, dtype {self.dtype}, accumulate {self.accumulate}",
        ]
        if self.dry_run:
            lines += [
                f"  would read    {format_bytes(self.bytes_read)}",
                f"  would write   {format_bytes(self.bytes_written)}",
                f"  peak memory   ~{format_bytes(self.projected_peak_rss_bytes)} projected",
            ]
        else:
            t = self.timings
            # Workers map pages in/out (read_wait) and compute while the writer writes: these overlap.
            threads = f"on {self.workers} worker thread(s)" if self.workers else "inline"
            if self.processes > 1:
                threads = f"on {self.processes} processes × {self.workers or 'no'} worker thread(s)"
            work = ", ".join(f"{k} {t[k]:.2f}s" for k in ("read_wait", "compute") if k in t)
            io = ", ".join(f"{k} {t[k]:.2f}s" for k in ("write", "fsync", "publish") if k in t)
            lines += [
                f"  read          {format_bytes(self.bytes_read)} at {format_bytes(self.read_bandwidth)}/s",
                f"  written       {format_bytes(self.bytes_written)} in {len(self.files)} file(s)",
                f"  time          {self.seconds:.2f}s ({work} {threads}; overlapped with {io})",
                f"  peak memory   {format_bytes(self.merge_rss_bytes)} during the merge "
                f"(process high-water mark {format_bytes(self.peak_rss_bytes)}; "
                f"projected {format_bytes(self.projected_peak_rss_bytes)})",
            ]
            if self.rank_peak_rss_bytes:
                peaks = ", ".join(format_bytes(x) for x in self.rank_peak_rss_bytes)
                lines.append(f"  per rank      peak memory during the merge: {peaks}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
