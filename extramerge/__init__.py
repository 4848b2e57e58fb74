"""extramerge: stream-merge, extrapolate and diagnose real training checkpoints.

Python API (the CLI `extramerge` is a thin layer over these):
    extramerge.merge(checkpoints, method="sma", window=4, ..., output="out/")   -> summary
    extramerge.analyze(checkpoints, windows=(1, 2, 4, 8), output="report/")    -> report dict
"""

from __future__ import annotations

__all__ = ["merge", "analyze"]


def __getattr__(name):
    # Imported lazily so `import extramerge` stays cheap (torch is imported only when needed).
    if name in ("merge", "analyze"):
        from extramerge import api

        return getattr(api, name)
    raise AttributeError(f"module 'extramerge' has no attribute {name!r}")
