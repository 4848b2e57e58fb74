"""Held-out evaluation of causal LMs: a re-export of ``extramerge.eval`` (where the code now lives), kept
so that ``extramerge.evaluate`` imports keep working."""

from __future__ import annotations

from .eval import *  # noqa: F403
from .eval import __all__  # noqa: F401  (the same public names)
