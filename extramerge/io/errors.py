"""The one error type of checkpoint input and output: ``CheckpointError``, a ValueError whose one-line message
names the culprit (the CLI prints it as one line and exits 2), and how an error crosses a process boundary
(``error_bytes`` / ``rebuild_error``: forked workers, the ranks of a distributed run)."""

from __future__ import annotations

__all__ = ["CheckpointError", "error_bytes", "rebuild_error"]


class CheckpointError(ValueError):
    """A user-facing problem with a checkpoint or an output path; the one-line message names the culprit."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def error_bytes(e: BaseException, limit: int = 4096) -> bytes:
    """``e`` as at most ``limit`` bytes, b"TYPE\\0MESSAGE", for ``rebuild_error`` in another process."""
    return f"{type(e).__name__}\0{e}".encode(errors="replace")[:limit]


def rebuild_error(raw: bytes, where: str = "worker process") -> BaseException:
    """The exception ``error_bytes`` encoded: CheckpointError, ValueError, OSError and MemoryError keep their
    type and message (so a command line reports them as it would in one process); any other becomes a
    RuntimeError naming ``where`` it happened."""
    kind, _, msg = raw.rstrip(b"\0").decode(errors="replace").partition("\0")
    for cls in (CheckpointError, ValueError, OSError, MemoryError):
        if kind == cls.__name__:
            return cls(msg)
    if not kind:
        return RuntimeError(f"a {where} died without reporting an error (out of memory?)")
    return RuntimeError(f"{where} failed: {kind}: {msg}")
