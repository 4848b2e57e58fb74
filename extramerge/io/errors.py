"""The one error type of checkpoint input and output: ``CheckpointError``, a ValueError whose one-line message
names the culprit (the CLI prints it as one line and exits 2)."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A user-facing problem with a checkpoint or an output path; the one-line message names the culprit."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
