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


@contextlib.contextmanager
def single_thread():
    """Run a block on one torch thread, then restore the caller's count.

    For small batches (a few thousand seeds of a 2-D landscape) one thread is as fast as several, and on a
    busy machine OpenMP's waiting makes a multi-threaded elementwise op hundreds of times slower (measured:
    torch.cos on 2000 float64 values, 11 µs on one thread, 1.9 ms on two with another job running).
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
