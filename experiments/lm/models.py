"""Moved to ``extramerge.lm.models`` (GPT-2 and LLaMA presets); this name re-exports it."""

from extramerge.lm.models import (
    ARCHS,
    PRESETS,
    Preset,
    build_config,
    build_model,
    count_params,
    preset_param_count,
    resolve_size,
)

__all__ = [
    "ARCHS",
    "PRESETS",
    "Preset",
    "resolve_size",
    "build_config",
    "build_model",
    "count_params",
    "preset_param_count",
]
