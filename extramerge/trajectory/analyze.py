"""``analyze``: the one-pass trajectory analysis of checkpoints and its outputs (analysis.json, gram.npz and
the figures, published atomically into an output folder).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from extramerge import distributed, plots
from extramerge.engine.parallel import can_fork, run_forked
from extramerge.io import CheckpointError, check_output, open_all, publish
from extramerge.io.outputs import MARKER, is_output, mark_output
from extramerge.trajectory.data import GramData
from extramerge.trajectory.gram import gram_pass
from extramerge.trajectory.report import DEFAULT_WINDOWS, project_scores, summarize
from rivervalley import weights as _weights
from rivervalley.common.publish import claim_folder, publishing

__all__ = ["analyze", "write_outputs"]

_FILES = {
    "analysis": "analysis.json",
    "gram": "gram.npz",
    "spectrum": "spectrum.png",
    "trajectory": "trajectory_pc12.png",
    "per_layer": "per_layer_fve1.png",
}


def _check_output_dir(output: Path, inputs: Sequence, force: bool) -> None:
    """Refuse an output overlapping an input (by inode) or that is not a folder; replace a non-empty
    folder only with ``force`` and only if an earlier analysis wrote it (its marker file, see
    extramerge.io.outputs): force never replaces a folder this package did not write."""
    check_output(output, inputs, force=True)  # overlap with the inputs, special files
    try:
        claim_folder(
            output, force, "analyze", ours=lambda p: is_output(p, "analysis"),
            owner="extramerge analyze", marker=MARKER,
        )  # fmt: skip
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _render(jobs: list) -> None:
    """Draw figures in parallel forked processes where that is safe (glyph rendering is most of their
    cost and holds the GIL), else one after another."""
    if can_fork() and (os.cpu_count() or 1) > 1:
        run_forked(jobs)
    else:
        for job in jobs:
            job()


def _pc_plane(data: GramData, windows) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Scores on the raw trajectory's first two PCs of the raw checkpoints and of each SMA-merged
    trajectory (windows K > 1), for the PC1–PC2 figure."""
    n = data.n
    raw = project_scores(data.gram, np.eye(n), k=2)
    merged = {K: project_scores(data.gram, _weights.merge_matrix(n, K), k=2) for K in windows if K != 1}
    return raw, merged


def _with_files(report: dict, output: Path) -> dict:
    return dict(report, files={k: str(output / v) for k, v in _FILES.items()})


def write_outputs(data: GramData, report: dict, output, *, inputs=(), force: bool = False) -> dict:
    """Write analysis.json, gram.npz and the PNG figures into ``output`` (temp folder, then rename)."""
    output = Path(output)
    _check_output_dir(output, list(inputs), force)
    report = _with_files(report, output)
    # force: _check_output_dir has vetted an existing output
    with publishing(output, force=True, commit=publish) as tmp:
        files = _FILES
        mark_output(tmp, "analysis")
        data.save(tmp / files["gram"])
        with open(tmp / files["analysis"], "w") as f:
            json.dump(report, f, indent=1)
        _render(
            [
                lambda: plots.per_layer(report, tmp / files["per_layer"]),
                lambda: (
                    plots.spectrum(report, tmp / files["spectrum"]),
                    plots.trajectory(*_pc_plane(data, report["windows"]), tmp / files["trajectory"]),
                ),
            ]
        )
    return report


def analyze(
    checkpoints,
    *,
    windows: Sequence[int] = DEFAULT_WINDOWS,
    output=None,
    progress: bool = True,
    force: bool = False,
    reference: int = -1,
) -> dict:
    """Trajectory diagnostics of checkpoints (paths, a folder of step_* checkpoints, or opened ones).

    One streaming pass builds the Gram matrices; returns the report dict (see ``summarize``). With
    ``output`` also writes analysis.json, gram.npz and three PNG figures there, atomically. An existing
    output folder is replaced only if an earlier analysis wrote it (its marker file); ``force`` is kept for
    compatibility and never replaces any other non-empty folder.

    Inside a process group (``extramerge.distributed``) every rank calls this: the Gram pass is split
    across the ranks, rank 0 alone checks and writes ``output``, and every rank returns the same report.
    """
    group = distributed.current()
    leader = group is None or group.leader
    ckpts, opened_here = [], False
    try:
        with distributed.agreed(group):  # a checkpoint one rank cannot open fails every rank here
            ckpts, opened_here = open_all(checkpoints)
            if output is not None and leader:
                _check_output_dir(Path(output), ckpts, force)  # fail before the long pass, not after
        # the figures' matplotlib import (~0.4 s) overlaps the pass where workers are processes
        background = plots.warm_up if output is not None else None
        data = gram_pass(ckpts, reference=reference, progress=progress, background=background)
    finally:
        if opened_here:
            for c in ckpts:
                c.close()
    report = summarize(data, windows)
    if output is not None:
        with distributed.agreed(group):
            if leader:
                report = write_outputs(data, report, output, inputs=ckpts, force=force)
            else:
                report = _with_files(report, Path(output))
    return report
