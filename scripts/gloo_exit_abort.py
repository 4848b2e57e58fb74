"""How often a 2-rank gloo process aborts at exit ("terminate called without an active exception"), by how
it ends: the measurement behind ``extramerge.distributed.end_process``.

    python scripts/gloo_exit_abort.py [--tries 40]

Each try starts 2 ranks (env://, as srun would) that all-gather and all-reduce a few times, meet at a
barrier and end in one of three ways: ``destroy`` (destroy_process_group, then the interpreter's
teardown), ``no-destroy`` (teardown only), ``os-exit`` (no destroy, then os._exit: no teardown). Prints the
count of ranks that exited non-zero for each.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

MODES = ("destroy", "no-destroy", "os-exit")


def rank(mode: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://")
    for _ in range(5):
        out = [torch.zeros(1024, dtype=torch.uint8) for _ in range(dist.get_world_size())]
        dist.all_gather(out, torch.zeros(1024, dtype=torch.uint8))
        dist.all_reduce(torch.ones(10_000, dtype=torch.float64))
    dist.barrier()
    if mode == "destroy":
        dist.destroy_process_group()
    if mode == "os-exit":
        sys.stdout.flush()
        os._exit(0)


def tries(mode: str, n: int) -> tuple[int, list[str]]:
    bad, lines = 0, []
    for _ in range(n):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = []
        for r in range(2):
            env = os.environ | {"WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r)}
            env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            cmd = [sys.executable, __file__, "--rank", mode]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        for p in procs:
            _, err = p.communicate(timeout=120)
            if p.returncode != 0:
                bad += 1
                lines.append(f"exit {p.returncode}: {err.decode(errors='replace').strip()[-120:]}")
    return bad, lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tries", type=int, default=40)
    ap.add_argument("--rank", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank:
        rank(args.rank)
        return
    for mode in MODES:
        bad, lines = tries(mode, args.tries)
        print(f"{mode:>10}: {bad} of {2 * args.tries} ranks exited non-zero", flush=True)
        for line in sorted(set(lines)):
            print(f"{'':>12}{line}")


if __name__ == "__main__":
    main()
