"""The memory a simulation will take, projected from its sizes before anything is allocated: checkpoints,
the [S, p] state (θ, gradient, step temporaries, optimizer buffers), the noise buffers, the results per
seed, the per-step schedule and, where the caller has not built it yet, the landscape itself. One check,
:func:`require_simulation_memory`, refuses through :func:`rivervalley.common.resources.require_memory`.
"""

from __future__ import annotations

from rivervalley.common.formatting import format_bytes
from rivervalley.common.resources import require_memory

__all__ = ["optimizer_buffers", "landscape_bytes", "simulation_bytes", "require_simulation_memory"]


def optimizer_buffers(optimizer, momentum: float = 0.0) -> int:
    """[S, p] buffers an optimizer keeps (or allocates per step beyond the simulator's own); ``optimizer``
    an instance, or the CLI's name for one (``momentum``: SGD's, for a name)."""
    from rivervalley.optimizers import SGD, Adam, Muon

    if isinstance(optimizer, str):
        return {"adam": 2, "adamw": 2, "muon": 5}.get(optimizer.lower(), 1 if momentum else 0)
    if isinstance(optimizer, SGD):
        return 0 if optimizer.momentum == 0 else 1
    if isinstance(optimizer, Adam):
        return 2
    if isinstance(optimizer, Muon):
        return 5  # momentum buffer and the Newton-Schulz iterates
    return 3  # an unknown optimizer: a guess on the safe side


def landscape_bytes(landscape: str, dim: int, *, rotate: bool = False, shape=None, item: int = 8) -> int:
    """Bytes the CLI's landscape takes to build: its vectors, and its random orthogonal matrices (the
    Gaussian, QR's two factors, the result and the Hessian built from them) where it has any."""
    if landscape == "matrix":
        a, b = shape
        return item * (6 * (a * a + b * b) + 4 * a * b)
    return item * (4 * dim + (6 * dim * dim if rotate else 0))


def simulation_bytes(
    *,
    seeds: int,
    dim: int,
    n_ckpts: int,
    steps: int,
    item: int = 8,
    noise_item: int = 4,
    buffers: int = 0,
    exact: bool = False,
    native: bool = False,
    checkpoints: bool = True,
    setup: int = 0,
) -> dict[str, int]:
    """Bytes by part of a simulation of ``seeds`` x ``dim`` parameters (``item`` bytes each, noise drawn in
    ``noise_item`` bytes), ``n_ckpts`` checkpoints and ``steps`` steps; ``buffers``: the optimizer's
    [S, p] buffers; ``native``: the compiled noise kernel (one buffer of draws at most);
    ``checkpoints=False`` where the caller gives the checkpoint tensor; ``setup``: the landscape, where it
    is still to be built."""
    sp = seeds * dim
    parts = {
        "checkpoints": item * sp * n_ckpts if checkpoints else 0,
        # θ, the gradient, two step temporaries (the initial draw, a rotation, an out-of-place step)
        "state": item * sp * (4 + buffers + (1 if exact else 0)),
        # native: one buffer; torch: two prefetched sets, raw in the noise dtype and in the parameter dtype
        "noise": item * sp if native else 2 * sp * (noise_item + (item if item != noise_item else 0)),
        # the loss of every checkpoint and the final point's, per seed
        "results per seed": item * seeds * (n_ckpts + 2),
        # the learning rate of every step (and its temporaries), the checkpoint steps
        "schedule": 8 * (3 * max(steps, 1) + n_ckpts),
    }
    if setup:
        parts["landscape"] = setup
    return parts


def require_simulation_memory(parts: dict[str, int], *, sizes: str, dtype, hint: str) -> int:
    """Refuse (ValueError, one line naming ``sizes`` and every part) a simulation whose projected ``parts``
    do not fit in the memory available now; returns the total otherwise."""
    total = sum(parts.values())
    items = ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items() if v)
    require_memory(total, f"simulate with {sizes} ({dtype}: {items}; {hint})")
    return total
