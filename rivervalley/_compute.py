"""Small compute-environment helpers shared by the simulator and the trainers."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def flush_denormals():
    """Flush denormal floats to zero on CPU for the duration of a block, then restore IEEE behaviour.

    Without it AdamW and long SGD runs slow down several-fold on CPU once values become tiny. It is scoped
    (not set globally) because the setting is process-wide and would break code that relies on subnormals,
    such as hypothesis' float strategies.
    """
    changed = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if changed:
            torch.set_flush_denormal(False)
