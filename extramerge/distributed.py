"""Several processes on one merge or analysis: the process group, the split of the work, and agreement.

``torchrun --nproc-per-node N -m extramerge merge ...`` (or ``srun`` with MASTER_ADDR/MASTER_PORT exported)
starts N processes; each joins a gloo process group through the usual env:// variables (WORLD_SIZE, RANK,
MASTER_ADDR, MASTER_PORT; under Slurm SLURM_NTASKS and SLURM_PROCID stand in when RANK is unset), opens the
checkpoints' headers, computes the same unit plan, and works on its own contiguous block of units
(``split_by_bytes``). One process (no such variables) never imports torch.distributed.

Failures are collective: every phase of a distributed run ends in ``agreed()``, where the ranks exchange
whether their part failed (an all-gather of a few bytes per rank; no pickle); if any did, every rank raises
(its own error, or the lowest failing rank's, rebuilt with its type and message by
``io.errors.rebuild_error``), so all exit non-zero together and rank 0 can report the one line.

Python API: every rank runs the same code inside ``with process_group():`` (``extramerge.merge``,
``extramerge.analyze`` and the Gram pass then split their work); a process group the caller initialised
already is used (through a gloo subgroup if its backend is not gloo) and left running.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import sys
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

import numpy as np

from rivervalley.common.resources import available_cores

from .io.errors import error_bytes, rebuild_error

__all__ = [
    "Launch",
    "Group",
    "launch_from_env",
    "join",
    "leave",
    "end_process",
    "current",
    "process_group",
    "agreed",
    "split_by_bytes",
    "rank_block",
    "workers_per_rank",
]

_MSG_BYTES = 2048  # an error message crossing ranks (commandline cuts them at 2000 characters anyway)


@dataclass(frozen=True)
class Launch:
    """Where this process stands in a multi-process launch, read from the environment."""

    rank: int
    world: int
    master_addr: str
    master_port: int


def _int_var(env: Mapping[str, str], key: str) -> int:
    raw = env.get(key, "")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {key}={raw!r} is not a whole number") from None


def launch_from_env(env: Mapping[str, str] | None = None) -> Launch | None:
    """This process's place from torchrun's variables (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT) or, when
    MASTER_ADDR is set but RANK is not, from Slurm's (SLURM_NTASKS, SLURM_PROCID); None for one process.

    Raises ValueError naming the variable that is missing or malformed."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env:
        world = _int_var(env, "WORLD_SIZE")
        keys = ("RANK",)
    elif "MASTER_ADDR" in env and "SLURM_NTASKS" in env and "RANK" not in env:
        world = _int_var(env, "SLURM_NTASKS")
        keys = ("SLURM_PROCID",)
    else:
        return None
    if world <= 1:
        return None
    for key in (*keys, "MASTER_ADDR", "MASTER_PORT"):
        if not env.get(key):
            raise ValueError(
                f"{world} processes (WORLD_SIZE/SLURM_NTASKS) but {key} is not set: launch with torchrun, "
                "or export MASTER_ADDR and MASTER_PORT for srun"
            )
    rank = _int_var(env, keys[0])
    if not 0 <= rank < world:
        raise ValueError(f"{keys[0]}={rank} is outside 0..{world - 1}")
    return Launch(rank, world, env["MASTER_ADDR"], _int_var(env, "MASTER_PORT"))


class Group:
    """The ranks of one run and the few collectives it needs, on CPU tensors over gloo."""

    def __init__(self, rank: int, world: int, pg=None):
        self.rank, self.world, self.pg = rank, world, pg
        hosts = self.all_gather_int(zlib.crc32(os.uname().nodename.encode()))
        self.local_world = hosts.count(hosts[rank])  # processes sharing this machine's cores

    @property
    def leader(self) -> bool:
        """Whether this is rank 0, which checks and publishes outputs and prints."""
        return self.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.pg)

    def all_gather_int(self, value: int) -> list[int]:
        import torch
        import torch.distributed as dist

        out = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(out, torch.tensor([value], dtype=torch.int64), group=self.pg)
        return [int(t) for t in out]

    def all_reduce_sum(self, array: np.ndarray) -> None:
        """Sum a C-contiguous float64 numpy array over the ranks, in place."""
        import torch
        import torch.distributed as dist

        if not (array.dtype == np.float64 and array.flags.c_contiguous):
            raise ValueError("all_reduce_sum needs a C-contiguous float64 array")
        if array.size:
            dist.all_reduce(torch.from_numpy(array.reshape(-1)), op=dist.ReduceOp.SUM, group=self.pg)

    def broadcast_bytes(self, data: bytes | None, limit: int = 4096) -> bytes:
        """``data`` of rank 0 (at most ``limit`` bytes) on every rank."""
        import torch
        import torch.distributed as dist

        buf = torch.zeros(limit + 8, dtype=torch.uint8)
        if self.leader:
            raw = data or b""
            if len(raw) > limit:
                raise ValueError(f"broadcast of {len(raw)} bytes exceeds {limit}")
            buf[:8] = torch.frombuffer(bytearray(len(raw).to_bytes(8, "little")), dtype=torch.uint8)
            if raw:
                buf[8 : 8 + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        dist.broadcast(buf, src=0, group=self.pg)
        n = int.from_bytes(buf[:8].numpy().tobytes(), "little")
        return buf[8 : 8 + n].numpy().tobytes()

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data`` (any length), in rank order, on every rank."""
        import torch
        import torch.distributed as dist

        sizes = self.all_gather_int(len(data))
        width = max(max(sizes), 1)
        mine = torch.zeros(width, dtype=torch.uint8)
        if data:
            mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        got = [torch.zeros(width, dtype=torch.uint8) for _ in range(self.world)]
        dist.all_gather(got, mine, group=self.pg)
        return [t[:n].numpy().tobytes() for t, n in zip(got, sizes, strict=True)]

    def settle(self, error: BaseException | None) -> None:
        """Collective: if any rank's part failed, raise on every rank (``error`` itself where it is not None,
        else the lowest failing rank's error rebuilt); otherwise return."""
        import torch
        import torch.distributed as dist

        mine = torch.zeros(_MSG_BYTES, dtype=torch.uint8)
        if error is not None:
            raw = error_bytes(error, _MSG_BYTES - 1) or b"?"
            mine[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        got = [torch.zeros(_MSG_BYTES, dtype=torch.uint8) for _ in range(self.world)]
        dist.all_gather(got, mine, group=self.pg)
        if error is not None:
            raise error
        for r, t in enumerate(got):
            if int(t[0]):
                raise rebuild_error(t.numpy().tobytes(), where=f"rank {r}")


_ACTIVE: list = []  # [(Group, owns the torch process group)] while joined


def current() -> Group | None:
    """The group this process has joined (``join``/``process_group``), or None: one process."""
    return _ACTIVE[0][0] if _ACTIVE else None


@contextlib.contextmanager
def _quiet_stdout():
    """Silence what C++ prints to the process's stdout meanwhile (torch 2.9's gloo prints "[Gloo] Rank 0 is
    connected to 1 peer ranks ..." from every rank); Python-level errors still propagate."""
    import ctypes

    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).fflush(None)  # C stdio (and std::cout, synced with it) into /dev/null
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def join() -> Group | None:
    """Join the run's process group (idempotent): gloo through env:// for a launch ``launch_from_env`` sees,
    the caller's own if torch.distributed is initialised already; None for one process."""
    if _ACTIVE:
        return _ACTIVE[0][0]
    launch = launch_from_env()
    import sys

    dist = sys.modules.get("torch.distributed")
    if launch is None and not (dist is not None and dist.is_available() and dist.is_initialized()):
        return None
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        try:
            with _quiet_stdout():
                dist.init_process_group(
                    "gloo", init_method="env://", rank=launch.rank, world_size=launch.world
                )
        except (RuntimeError, ValueError, OSError) as e:  # torch's DistNetworkError is a RuntimeError
            raise OSError(
                f"rank {launch.rank} of {launch.world} could not join the process group at "
                f"{launch.master_addr}:{launch.master_port}: {e}"
            ) from None
    world = dist.get_world_size()
    if world <= 1:
        if owned:
            dist.destroy_process_group()
        return None
    with _quiet_stdout():
        pg = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    _ACTIVE.append((Group(dist.get_rank(), world, pg), owned))
    return _ACTIVE[0][0]


def leave() -> None:
    """Leave the group ``join`` joined: wait for the other ranks (so none exits before rank 0 has reported),
    then destroy the process group if ``join`` created it. A no-op when not joined."""
    if not _ACTIVE:
        return
    group, owned = _ACTIVE.pop()
    import torch.distributed as dist

    with contextlib.suppress(Exception):  # a rank that died already: nothing left to wait for
        group.barrier()
    if owned and dist.is_initialized():
        dist.destroy_process_group()


def end_process(code: int) -> NoReturn:
    """End a launched rank's process now, with exit status ``code``, after ``leave``: flush stdout and
    stderr, then ``os._exit``, skipping the interpreter's teardown.

    That teardown is where torch's gloo backend can abort a process whose work is done and published
    (SIGABRT, "terminate called without an active exception": a C++ worker thread of a process group
    still joinable when it is destroyed during finalization), so a merge that succeeded on every rank
    exits non-zero on one. Seen once in CI on ``torchrun ... -m extramerge analyze``. Measured with
    ``python scripts/gloo_exit_abort.py --tries 60`` (torch 2.13, 2 cores): of 120 ranks that exit without
    ``destroy_process_group`` 3 aborted, of 120 that end through ``os._exit`` none. Nothing in this
    package relies on ``atexit``; logging is flushed here."""
    import logging

    with contextlib.suppress(Exception):
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


@contextlib.contextmanager
def process_group():
    """``with process_group() as group:`` joins (None for one process) and leaves at the end."""
    already = bool(_ACTIVE)
    group = join()
    try:
        yield group
    finally:
        if not already:
            leave()


@contextlib.contextmanager
def agreed(group: Group | None = None):
    """``with agreed():`` — the block's exception (if any) is exchanged with the other ranks at its end, and
    every rank raises if any rank's block failed. In one process a plain block. Interrupts
    (KeyboardInterrupt, signals) pass straight through: the launcher stops the others."""
    group = group or current()
    if group is None:
        yield
        return
    error = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - every failure is reported to the other ranks
        error = e
    group.settle(error)


def split_by_bytes(sizes: Sequence[int], world: int) -> list[tuple[int, int]]:
    """Contiguous blocks [lo, hi) of the items, one per rank, covering each item once: rank r starts at the
    item boundary nearest to r/world of the total bytes, so each block holds total/world bytes within
    one item's size (by count if every size is 0)."""
    if world < 1:
        raise ValueError(f"world size must be at least 1, got {world}")
    sizes = [max(0, int(s)) for s in sizes]
    if not any(sizes):
        sizes = [1] * len(sizes)
    cum = [0]
    for s in sizes:
        cum.append(cum[-1] + s)
    bounds = [0]
    for r in range(1, world):
        target = cum[-1] * r / world
        i = bisect.bisect_left(cum, target)
        if i > 0 and (i == len(cum) or target - cum[i - 1] <= cum[i] - target):
            i -= 1
        bounds.append(min(max(i, bounds[-1]), len(sizes)))
    bounds.append(len(sizes))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def rank_block(sizes: Sequence[int], group: Group | None = None) -> range:
    """This rank's block of ``split_by_bytes(sizes, world)`` — work units of a pass, or whole files of an
    output that each rank writes alone — as a range of item indices (all of them in one process)."""
    group = group or current()
    if group is None:
        return range(len(sizes))
    return range(*split_by_bytes(sizes, group.world)[group.rank])


def workers_per_rank(workers: int, group: Group | None = None) -> int:
    """Worker threads for one rank: ``workers``, but no more than this machine's cores divided among the
    ranks running on it (at least 1)."""
    group = group or current()
    if group is None:
        return workers
    return max(1, min(workers, available_cores() // group.local_world))
