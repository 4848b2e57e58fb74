"""Moved to ``extramerge.lm.models`` (GPT-2 and LLaMA presets); this name re-exports it."""

from extramerge.lm.models import *  # noqa: F403
from extramerge.lm.models import __all__  # noqa: F401  (the same public names)
