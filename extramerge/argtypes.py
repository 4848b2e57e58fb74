"""argparse types shared by the `extramerge` command line and its `study` subcommand."""

from __future__ import annotations

import argparse

__all__ = ["floats", "ints"]


def floats(text: str) -> list[float]:
    """Comma-separated numbers (spaces ignored): ``--alphas 0.5,1``."""
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def ints(text: str) -> list[int]:
    """Comma-separated integers (spaces ignored): ``--windows 1,2,4``."""
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
