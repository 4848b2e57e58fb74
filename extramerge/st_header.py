"""Old import path of the safetensors header validation, kept working: it lives in
``extramerge.io.safetensors``."""

from __future__ import annotations

from .io.safetensors import Entry, Header, parse_header

__all__ = ["Entry", "Header", "parse_header"]
