"""How much memory a new allocation can get, and a guard that refuses one that cannot fit (no torch import:
extramerge's safetensors commands use it too)."""

from __future__ import annotations


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
    have = available_memory()
    if have is not None and nbytes > have:
        raise ValueError(
            f"{what} needs about {nbytes / 1e9:.3g} GB but only {have / 1e9:.3g} GB of memory is available"
        )
