"""Progress bars that read well in a terminal and in a log.

On a terminal a tqdm bar updates in place. Anywhere else (a file, a pipe, a CI log) the same bar writes
plain lines, one at most every ``LOG_INTERVAL_S`` seconds, and never a carriage return: a long job leaves a
few readable lines in its log instead of one line of thousands of overwritten updates.
"""

from __future__ import annotations

import sys

__all__ = ["LOG_INTERVAL_S", "progress_bar", "is_terminal"]

LOG_INTERVAL_S = 30.0


def is_terminal(file) -> bool:
    """Whether ``file`` is an interactive terminal (False for files, pipes and objects without isatty)."""
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or closed
        return False


def progress_bar(*, enabled: bool = True, file=None, **kwargs):
    """A tqdm bar on ``file`` (default: stderr at the time of the call); ``kwargs`` go to tqdm (total, desc,
    unit, ...). Not a terminal: lines without carriage returns, at most one per ``LOG_INTERVAL_S``
    (tqdm's first and, with ``leave``, its last state included). ``enabled=False``: a bar that shows
    nothing."""
    from tqdm import tqdm

    file = sys.stderr if file is None else file
    if not enabled:
        return tqdm(disable=True, **kwargs)
    if is_terminal(file):
        return tqdm(file=file, dynamic_ncols=True, **kwargs)
    kwargs.pop("mininterval", None)
    kwargs.pop("dynamic_ncols", None)
    # maxinterval too: tqdm's monitor thread otherwise forces a refresh every 10 s
    return tqdm(file=_Lines(file), mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S, **kwargs)


class _Lines:
    """A file for tqdm that turns each in-place update into one whole line (and a cleared bar into none)."""

    def __init__(self, file):
        self._file = file

    @property
    def encoding(self):  # tqdm draws unicode blocks only where the file's encoding allows them
        return getattr(self._file, "encoding", None)

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self._file.write(line + "\n")

    def flush(self) -> None:
        flush = getattr(self._file, "flush", None)
        if flush is not None:
            flush()
