"""DCP input against the same model as safetensors (issue 12): N checkpoints of ~MB megabytes each,
written by torch's dcp.save (one chunk a tensor), by extramerge's DCP writer (FSDP2-like row blocks of
16 MB: several chunks a tensor) and by safetensors.save_file; then each run is read from the page cache by
`extramerge analyze`'s Gram pass and merged (sma) into a .safetensors file. Best of 3; seconds and GB/s.

    python -m benchmarks.bench_dcp_read [--mb 200] [--n 4] [--dir /tmp/bench_dcp]
    python -m benchmarks.bench_dcp_read --cover 40000   # only the chunk-cover check (issue 21 item 7)
"""

from __future__ import annotations

import argparse
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

import extramerge
from extramerge.io import load_checkpoints
from extramerge.io.dcp import save as dcp_save
from extramerge.io.dcp.cover import uncovered
from extramerge.trajectory import gram_pass


def _states(mb: int, n: int) -> list[dict]:
    rows = max(1, mb * 2**20 // (12 * 4096 * 4))
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(rows, 4096, generator=g) for i in range(12)}
    return [{k: v + 0.01 * j for k, v in base.items()} for j in range(n)]


def _write(root: Path, mb: int, n: int) -> None:
    for j, sd in enumerate(_states(mb, n)):
        step = 100 * (j + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(sd, checkpoint_id=str(root / "dcp" / f"step-{step}"), no_dist=True)
        (root / "st").mkdir(parents=True, exist_ok=True)
        save_file(sd, root / "st" / f"step_{step:06d}.safetensors")
    dcp_save.CHUNK_BYTES = 16 * 2**20  # row blocks: several chunks per tensor, as FSDP2 shards store them
    for j in range(n):  # a DCP input makes a DCP output: extramerge's writer, row blocks
        step = 100 * (j + 1)
        extramerge.merge([root / "dcp" / f"step-{step}"], method="custom", weights=[1.0],
                         output=root / "rows" / f"step-{step}", progress=False)  # fmt: skip
        (root / "rows" / f"step-{step}" / "merge.json").unlink()  # else skipped as a merge output


def _warm(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            p.read_bytes()


def _time(fn) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _cover(n: int) -> None:
    """The cover check of one tensor in n chunks sharing one dim-0 interval (a 5 MB .metadata at n = 40 000;
    the pairwise sweep before issue 21 took ~11 minutes), and of an n-chunk 2-D grid."""
    side = max(1, int(n**0.5))
    for what, shape, boxes in (
        ("one dim-0 interval", (4, n), [((0, i), (4, i + 1)) for i in range(n)]),
        (
            f"{side}×{side} grid",
            (side, side),
            [((i, j), (i + 1, j + 1)) for i in range(side) for j in range(side)],
        ),
    ):
        t = _time(lambda shape=shape, boxes=boxes: uncovered(shape, boxes))
        print(f"cover check, {len(boxes)} chunks, {what}: {t:.3f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--dir", default="/tmp/bench_dcp")
    ap.add_argument("--cover", type=int, default=None, help="time only the chunk-cover check of N chunks")
    args = ap.parse_args()
    if args.cover:
        return _cover(args.cover)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    _write(root, args.mb, args.n)
    total = None
    for kind in ("st", "dcp", "rows"):
        _warm(root / kind)

        def gram(kind=kind):
            cks = load_checkpoints([root / kind])
            try:
                gram_pass(cks, progress=False)
            finally:
                for c in cks:
                    c.close()

        def merge(kind=kind):
            extramerge.merge([root / kind], method="sma", output=root / f"out_{kind}.safetensors", force=True,
                             progress=False)  # fmt: skip

        cks = load_checkpoints([root / kind])
        total = sum(c.nbytes for c in cks)
        for c in cks:
            c.close()
        tg, tm = _time(gram), _time(merge)
        print(f"{kind:>5}: {total / 2**30:.2f} GiB read; gram pass {tg:.2f} s ({total / tg / 1e9:.2f} GB/s), "
              f"merge {tm:.2f} s ({total / tm / 1e9:.2f} GB/s)")  # fmt: skip


if __name__ == "__main__":
    main()
