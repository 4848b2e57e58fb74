"""Old import path of the output policy (checks, staging, publishing), kept working: it lives in
``extramerge.io.outputs``."""

from __future__ import annotations

from .io.outputs import *  # noqa: F403
from .io.outputs import __all__  # noqa: F401  (the same public names)
