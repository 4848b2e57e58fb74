"""What the machine gives a run: memory a new allocation can get (and a guard that refuses one that cannot
fit), the CPU cores this process may use, and torch's numeric settings scoped to a block.

torch is imported only inside the two context managers, so extramerge's safetensors commands can use the
memory guard without loading torch.
"""

from __future__ import annotations

import contextlib
import functools
import os

from .formatting import format_bytes

__all__ = [
    "available_memory",
    "require_memory",
    "available_cores",
    "flush_denormals",
    "single_thread",
    "return_large_frees",
    "trim_heap",
]

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_large_frees(threshold: int = 256 << 10) -> bool:
    """Make glibc's malloc map every block of ``threshold`` bytes or more on its own, so that freeing it
    gives the memory back to the kernel. By default glibc raises that threshold to the size of each mapped
    block freed (up to 32 MiB), after which the tensors a loop frees and allocates again stay in the heap,
    fragmented: a streamed study's resident memory grew by a third that way (``bench_study_memory``).
    Process-wide and lasting; True where it was set (glibc), False elsewhere."""
    try:
        return _libc().mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1
    except (OSError, AttributeError):  # not glibc: no mallopt
        return False


def trim_heap() -> None:
    """Give the free pages inside glibc's heaps back to the kernel (``malloc_trim(0)``, every arena): what
    ``return_large_frees`` leaves behind, the fragments of smaller blocks freed between allocations that
    stay. A no-op where the C library has no malloc_trim."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


@functools.cache
def _libc():
    """The C library this process runs on (its own symbols: no search, no ldconfig subprocess per call)."""
    import ctypes

    return ctypes.CDLL(None)


def available_memory() -> int | None:
    """Bytes of memory the kernel says a new allocation can get without swapping (Linux ``MemAvailable``,
    capped by a cgroup v2 ``memory.max`` limit); None where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max", "rb") as f:
            limit = f.read().strip()
        if limit.isdigit():
            with open("/sys/fs/cgroup/memory.current", "rb") as f:
                found.append(int(limit) - int(f.read().strip()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def require_memory(nbytes: int, what: str) -> None:
    """Refuse (ValueError naming the bytes needed and available) an allocation of ``nbytes`` that does not
    fit in the memory available now; ``what`` says what would be allocated and how to make it smaller."""
    have, kind = available_memory(), "available"
    if have is None:  # unknown: at least nothing beyond the machine's physical memory
        have, kind = _installed_memory(), "installed"
    if have is not None and nbytes > have:
        raise ValueError(
            f"{what} needs about {format_bytes(nbytes)} but only {format_bytes(have)} of memory is {kind}"
        )


def _installed_memory() -> int | None:
    """The machine's physical memory in bytes; None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one), at least 1."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextlib.contextmanager
def flush_denormals():
    """Flush denormal floats to zero on CPU for the duration of a block, then restore IEEE behaviour.

    Without it AdamW and long SGD runs slow down several-fold on CPU once values become tiny. It is scoped
    (not set globally) because the setting is process-wide and would break code that relies on subnormals,
    such as hypothesis' float strategies.
    """
    import torch

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
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
