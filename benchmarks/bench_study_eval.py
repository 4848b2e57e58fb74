"""The study's cost per merge, split into building the merge and evaluating it, against the plain way of
getting the same number (`extramerge merge` to a folder, then `from_pretrained` and `extramerge eval`'s
loss): GPT-2-124M-shaped checkpoints (bench_study_memory's, under .bench/data/).

    python -m benchmarks.bench_study_eval [--checkpoints 8] [--merges 3] [--tokens 8192] [--device cpu]
                                          [--dtype fp32|bf16] [--stream] [--threads 2]

Prints, per merge: the seconds building it (reading and summing the checkpoints into the model), the seconds
of its forwards and their tokens/s, and the plain way's seconds for one merge of the same text; writes
results/benchmarks/study_eval_<device>_<dtype>.json. The issue's target for a GPU: building a merge takes
less time than evaluating it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_study_memory import make_run


def _text(tokens: int) -> list[str]:
    words = "the river runs down the valley and the walls rise on either side ".split()
    rng = np.random.default_rng(0)
    docs, n = [], 0
    while n < tokens:  # byte-level tokenizer: one token per byte
        doc = " ".join(rng.choice(words, 200))
        docs.append(doc)
        n += len(doc) + 1
    return docs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", type=int, default=8)
    p.add_argument("--merges", type=int, default=3)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--stream", action="store_true", help="build merges from the files (default: stacked)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=Path(".bench/data/study-gpt2-124m"))
    a = p.parse_args()
    import torch

    from extramerge.api import merge
    from extramerge.eval import evaluate_loss, load_model, token_blocks
    from extramerge.study.evaluator import Evaluator
    from extramerge.study.inputs import read_checkpoints

    torch.set_num_threads(a.threads)
    paths = make_run(a.data, 16)[-a.checkpoints :]
    docs = _text(a.tokens)
    ckpts, infos = read_checkpoints([str(x) for x in paths])
    ev = Evaluator(
        ckpts, list(infos), str(a.data), device=a.device, stream=a.stream or None, dtype=a.dtype, batch_size=4
    )
    ev.add_half("h", docs)
    rng = np.random.default_rng(1)
    rows = []
    for _ in range(a.merges):
        w = rng.dirichlet(np.ones(a.checkpoints))
        before = dict(ev.timing)
        loss = ev.measure(w, "h").loss
        rows.append({k: ev.timing[k] - before[k] for k in ("build_seconds", "forward_seconds", "tokens")})
        rows[-1]["loss"] = loss
    for c in ckpts:
        c.close()
    # the plain way, one merge: write it, load it with from_pretrained, evaluate it
    with tempfile.TemporaryDirectory(dir=a.data) as tmp:
        t0 = time.perf_counter()
        out = Path(tmp) / "m"
        merge([str(x) for x in paths], output=out, method="custom", weights=list(w), dtype="float32")
        for f in ("tokenizer.json", "tokenizer_config.json"):  # the run keeps its tokenizer beside the steps
            shutil.copy(a.data / f, out / f)
        t1 = time.perf_counter()
        model, tok = load_model(out, device=a.device, dtype=torch.float32)
        blocks = token_blocks(docs, tok, 1024)
        t2 = time.perf_counter()
        plain = evaluate_loss(model, tok, None, blocks=blocks, batch_size=4)
        t3 = time.perf_counter()
    build = float(np.median([r["build_seconds"] for r in rows]))
    fwd = float(np.median([r["forward_seconds"] for r in rows]))
    tokens = rows[0]["tokens"]
    res = {
        "device": str(ev.device),
        "dtype": a.dtype,
        "mode": ev.plan["mode"],
        "checkpoints": a.checkpoints,
        "tokens_per_merge": tokens,
        "merges": rows,
        "build_seconds": build,
        "forward_seconds": fwd,
        "tokens_per_s": tokens / fwd,
        "build_over_forward": build / fwd,
        "plain": {
            "merge_seconds": t1 - t0,
            "load_seconds": t2 - t1,
            "eval_seconds": t3 - t2,
            "total_seconds": t3 - t0,
            "loss": plain.loss,
            "loss_study": rows[-1]["loss"],
        },
        "study_over_plain": (build + fwd) / (t3 - t0),
        "threads": a.threads,
        "command": "python -m benchmarks.bench_study_eval " + " ".join(sys.argv[1:]),
    }
    dest = Path("results/benchmarks") / f"study_eval_{str(a.device).split(':')[0]}_{a.dtype}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(res, indent=1) + "\n")
    print(
        f"{a.checkpoints} checkpoints, {res['mode']}, {res['device']} {a.dtype}: per merge, build "
        f"{build:.2f} s, forwards {fwd:.2f} s ({tokens} tokens, {res['tokens_per_s']:.0f} tokens/s); build / "
        f"forward = {res['build_over_forward']:.2f}"
    )
    print(
        f"plain way (merge to a folder {t1 - t0:.2f} s, from_pretrained {t2 - t1:.2f} s, eval "
        f"{t3 - t2:.2f} s): {t3 - t0:.2f} s; the study's {build + fwd:.2f} s = "
        f"{res['study_over_plain']:.2f}x; loss "
        f"{plain.loss:.6f} vs the study's {rows[-1]['loss']:.6f}"
    )
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
