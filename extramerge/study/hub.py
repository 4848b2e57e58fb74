"""Checkpoints published as revisions of one Hugging Face Hub repository (Pythia's ``step140000``, ...),
found in huggingface_hub's cache and never downloaded: ``REPO --revisions step1000,step2000`` (or the range
``step1000:step3000:1000``), or ``REPO@step1000`` arguments.

A revision's step is the one its name carries (``stepN``); when some name carries none, every revision's
step is its place in the order given (1, 2, ...). A cached snapshot's files are links into the repository's
``blobs/``: the repository's cache folder (``models--org--name``), not the snapshot, is the folder every
read must stay inside. Bad input raises ``CheckpointError`` (a ValueError) naming the revision or flag.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..io import CheckpointError, open_checkpoint, safety
from ..io.layout import parse_step

__all__ = ["parse_revisions", "hub_ref", "open_revisions", "snapshot_root", "snapshot_step", "MAX_REVISIONS"]

MAX_REVISIONS = 10_000  # a range spelling more than this is a typo, not a study
_REPO = r"[A-Za-z0-9][\w.\-]*/[\w.\-]+"
_REF = re.compile(rf"^(?P<repo>{_REPO})(?:@(?P<rev>[\w.\-/]+))?$")
_RANGE = re.compile(r"^(?P<a>.*?)(?P<i>\d+):(?P<b>.*?)(?P<j>\d+):(?P<s>\d+)$")


def parse_revisions(spec: str) -> list[str]:
    """Revision names of ``--revisions``: comma-separated names, each also possibly a range
    ``PREFIX<i>:PREFIX<j>:<stride>`` (i, i+stride, ... up to j inclusive; zero padding of i kept)."""
    out: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        out.extend(_expand(item, spec) if ":" in item else [item])
        if len(out) > MAX_REVISIONS:
            raise CheckpointError(f"--revisions {safety.shown(spec)}: more than {MAX_REVISIONS} revisions")
    if not out:
        raise CheckpointError(f"--revisions {safety.shown(spec)}: no revisions named")
    for r in out:
        if not re.fullmatch(r"[\w.\-/]+", r):
            raise CheckpointError(
                f"--revisions: {safety.shown(r)} is not a revision name (branch, tag or commit)"
            )
    twice = sorted({r for r in out if out.count(r) > 1})
    if twice:
        raise CheckpointError(f"--revisions: {twice[0]} is named twice")
    return out


def _expand(item: str, spec: str) -> list[str]:
    m = _RANGE.match(item)
    if not m or m["a"] != m["b"]:
        raise CheckpointError(
            f"--revisions {safety.shown(spec)}: {safety.shown(item)} is not a range START:STOP:STRIDE "
            "with one prefix (e.g. step1000:step3000:1000)"
        )
    i, j, s = int(m["i"]), int(m["j"]), int(m["s"])
    if s < 1 or j < i:
        raise CheckpointError(
            f"--revisions {safety.shown(item)}: needs START <= STOP and a stride of at least 1"
        )
    if (j - i) // s + 1 > MAX_REVISIONS:
        raise CheckpointError(f"--revisions {safety.shown(item)}: more than {MAX_REVISIONS} revisions")
    width = len(m["i"]) if m["i"].startswith("0") and len(m["i"]) > 1 else 0
    return [f"{m['a']}{k:0{width}d}" for k in range(i, j + 1, s)]


def hub_ref(text: str) -> tuple[str, str] | None:
    """(repository, revision) of ``org/name[@revision]`` (revision 'main' when none) when ``text`` is not a
    local path; else None."""
    if os.path.lexists(text) or str(text).startswith((".", "/", "~")):
        return None
    m = _REF.match(str(text))
    return (m["repo"], m["rev"] or "main") if m else None


def _cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _snapshot(repo: str, revision: str) -> Path:
    """The cached snapshot folder of one revision (huggingface_hub resolves the branch or tag through the
    cache's refs/), never fetched: a missing revision is one line naming it."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{repo}@{revision}: huggingface_hub is not installed to find it") from None
    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, IncompleteSnapshotError, HFValidationError, OSError
        why = "incomplete in" if "incomplete" in str(e).lower() else "not in"
        if revision == "main" and why == "not in":
            why = "no such file or folder, and not in"  # perhaps a mistyped local path
        raise CheckpointError(
            f"{repo}@{revision}: {why} the Hugging Face cache {_cache()} (download it first: hf download "
            f"{repo} --revision {revision})"
        ) from None


def snapshot_root(folder: Path) -> Path | None:
    """The repository cache folder (``models--org--name``) of a snapshot folder of huggingface_hub's cache
    (``<cache>/models--org--name/snapshots/<commit>``), else None: only there may a file be a link out of
    its folder (into the repository's ``blobs/``)."""
    folder = Path(folder)
    repo = folder.parent.parent
    if folder.parent.name != "snapshots" or not repo.name.startswith("models--"):
        return None
    try:
        same = os.path.samefile(repo.parent, _cache())
    except OSError:
        return None
    return repo if same else None


def snapshot_step(folder: Path) -> int | None:
    """The step named by a branch or tag (``refs/step140000``) pointing at a cached snapshot folder, or None
    (how a study's recorded snapshot paths find their steps again)."""
    root = snapshot_root(folder)
    if root is None or not (root / "refs").is_dir():
        return None
    steps = set()
    for where, _, names in os.walk(root / "refs"):
        for n in names:
            ref = Path(where) / n
            try:
                target = safety.read_text(ref).strip()
            except (CheckpointError, OSError):
                continue
            if target == Path(folder).name and parse_step(ref.name) is not None:
                steps.add(parse_step(ref.name))
    return steps.pop() if len(steps) == 1 else None


def _steps(refs: list[tuple[str, str]], by_order: bool) -> list[int]:
    steps = [parse_step(rev) for _, rev in refs]
    if None not in steps:
        return steps
    if not by_order:
        bad = next(f"{r}@{v}" for (r, v), s in zip(refs, steps, strict=True) if s is None)
        raise CheckpointError(
            f"{bad}: no training step in the revision name (stepN); beside local checkpoints, every "
            "revision must name its step"
        )
    return list(range(1, len(refs) + 1))


def open_revisions(refs: list[tuple[str, str]], *, by_order: bool = True) -> list:
    """Open each (repository, revision) from the cache, in the order given, with its step (see the module's
    docstring; with ``by_order`` False a revision whose name carries no step is refused). Every revision is
    found before any is opened, so a missing one is reported first."""
    steps = _steps(refs, by_order)
    folders = [_snapshot(repo, rev) for repo, rev in refs]
    out: list = []
    try:
        for (repo, rev), folder, step in zip(refs, folders, steps, strict=True):
            name = f"{repo}@{rev}"
            try:
                out.append(open_checkpoint(folder, name=name, step=step, root=snapshot_root(folder)))
            except (CheckpointError, OSError) as e:
                raise CheckpointError(f"{name}: {e}") from None
        return out
    except BaseException:
        for c in out:
            c.close()
        raise
