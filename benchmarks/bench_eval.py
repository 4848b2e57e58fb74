"""Benchmark: held-out evaluation (``extramerge.eval``) vs a plain ``model(..., labels=)`` loop.

    python -m benchmarks.bench_eval                   # writes results/benchmarks/eval.{txt,json}
    python -m benchmarks.bench_eval --quick           # smaller token budget, prints only

What is measured, per model (GPT-2, random init, byte-level vocabulary of 257, float32, CPU unless CUDA):

* ``evaluate_loss(model, tok, None, blocks=blocks)``: the study's reuse path (blocks tokenized once);
  tokens/s = predicted tokens / wall time.
* plain loop over the SAME blocks and batch size: ``model(input_ids=x, labels=y)`` under ``torch.no_grad()``
  in eval mode, the HF loss averaged per batch (what one writes without this module). HF shifts the labels
  itself, so it scores seq_len − 1 tokens per block instead of seq_len; its tokens/s counts what it scored.
* tokenization (``token_blocks``) once, to show what the reuse path saves per weight set.
* ``cloze_accuracy`` on items built from the same text: items/s (8 candidates per item), both paths:
  shared context (context once, candidates from its KV cache; the CPU default) and batched rows.

Each contender runs ``--repeats`` times, alternating; the best wall time is reported. Held-out text: the
repository's own tracked ``*.md`` and ``*.py`` files (real, deterministic; one document per file),
truncated to the token budget for the loss. The machine is shared: the load average before and after is
recorded, and the thread count is stated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "benchmarks"

MODELS = {  # preset of extramerge.lm.models (the shapes): (loss tokens, cloze items)
    "tiny": (1 << 17, 64),
    "small": (1 << 16, 32),
}


def _texts() -> list[str]:
    files = subprocess.run(
        ["git", "ls-files", "*.md", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return [
        t for f in sorted(files) if (t := (ROOT / f).read_text(encoding="utf-8", errors="ignore")).strip()
    ]


def _budget(texts: list[str], n_bytes: int) -> list[str]:
    out, total = [], 0
    for t in texts:
        b = len(t.encode())
        if total + b >= n_bytes:
            out.append(t.encode()[: max(1, n_bytes - total)].decode(errors="ignore"))
            break
        out.append(t)
        total += b + 1
    return out


def _plain_loop(model, blocks, batch_size: int, device) -> tuple[float, int]:
    """What one writes without this module: HF's own loss per batch, averaged by scored tokens."""
    ids = blocks.ids
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch_size):
            b = ids[i : i + batch_size, :-1].to(device)
            x = b.clamp_min(0)
            y = b.clone()  # PAD (-100) is HF's ignore index too
            n = int((y[:, 1:] != -100).sum())
            loss = model(input_ids=x, labels=y).loss
            total += loss.item() * n
            count += n
    return total / count, count


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return float("nan")


def run(args) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from extramerge import eval as E
    from extramerge.lm.models import resolve_size
    from extramerge.lm.tokenizer import EOS_ID, build_tokenizer

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok = build_tokenizer()
    texts = _texts()
    record = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(device)
            + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "load_before": _load(),
        },
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "models": {},
    }
    for name in args.models:
        n_tokens, n_items = MODELS[name]
        if args.quick:
            n_tokens, n_items = n_tokens // 8, max(8, n_items // 4)
        shape = resolve_size(name)  # the trainer's preset shapes
        n_layer, n_embd, n_head, seq_len = shape.n_layer, shape.d_model, shape.n_head, shape.seq_len
        torch.manual_seed(0)
        # GPT2Config built here (transformers' defaults, as in the measurements so far), not build_config
        cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=seq_len, vocab_size=257,
                         bos_token_id=EOS_ID, eos_token_id=EOS_ID)  # fmt: skip
        model = GPT2LMHeadModel(cfg).to(device).eval()
        params = sum(p.numel() for p in model.parameters())
        held = _budget(texts, n_tokens)
        t_tok = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            blocks = E.token_blocks(held, tok, seq_len)
            t_tok.append(time.perf_counter() - t0)

        ours_s, plain_s = [], []
        for _ in range(args.repeats):  # alternate, so drifting machine load hits both alike
            t0 = time.perf_counter()
            ours = E.evaluate_loss(model, tok, None, blocks=blocks, batch_size=args.batch_size, device=device)
            ours_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            plain_loss, plain_tokens = _plain_loop(model, blocks, args.batch_size, device)
            plain_s.append(time.perf_counter() - t0)
        ctx_bytes = min(300, seq_len - 24)  # context + candidate must fit the model's positions
        items = E.build_cloze(texts, n_items=n_items, n_candidates=8, context_bytes=ctx_bytes, seed=0)
        cloze_s: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for share in (True, False):
                c = E.cloze_accuracy(model, tok, items, batch_size=32, device=device, share_context=share)
                cloze_s[share].append(c.seconds)
                if share:
                    cloze = c
        cloze_tokens = sum(len(it.context.encode()) + len(c) + 1 for it in items for c in it.candidates)
        rec = {
            "n_layer": n_layer,
            "n_embd": n_embd,
            "seq_len": seq_len,
            "params": params,
            "blocks": int(blocks.ids.shape[0]),
            "tokens": ours.tokens,
            "tokenize_s": min(t_tok),
            "ours_s": min(ours_s),
            "ours_tokens_per_s": ours.tokens / min(ours_s),
            "ours_loss": ours.loss,
            "plain_s": min(plain_s),
            "plain_tokens": plain_tokens,
            "plain_tokens_per_s": plain_tokens / min(plain_s),
            "plain_loss": plain_loss,
            "speedup": (ours.tokens / min(ours_s)) / (plain_tokens / min(plain_s)),
            "cloze_items": len(items),
            "cloze_context_bytes": ctx_bytes,
            "cloze_s": min(cloze_s[True]),
            "cloze_items_per_s": len(items) / min(cloze_s[True]),
            "cloze_batched_s": min(cloze_s[False]),
            "cloze_batched_items_per_s": len(items) / min(cloze_s[False]),
            "cloze_tokens_per_s": cloze_tokens / min(cloze_s[False]),
            "cloze_accuracy": cloze.accuracy,
        }
        record["models"][name] = rec
        print(
            f"{name}: {n_layer}x{n_embd}, seq {seq_len}, {params / 1e6:.2f}M params, {rec['tokens']} tokens: "
            f"ours {rec['ours_tokens_per_s']:.0f} tok/s, plain {rec['plain_tokens_per_s']:.0f} tok/s, "
            f"cloze {rec['cloze_items_per_s']:.2f} items/s ({rec['cloze_batched_items_per_s']:.2f} batched)",
            flush=True,
        )
    record["machine"]["load_after"] = _load()
    return record


def report(record: dict) -> str:
    m = record["machine"]
    lines = [
        f"extramerge.eval throughput; device {m['device']}, {m['cpus']} CPUs, {m['torch_threads']} torch "
        f"thread(s), torch {m['torch']}; load average {m['load_before']:.2f} -> {m['load_after']:.2f} "
        "(shared machine)",
        f"GPT-2, random init, byte vocabulary 257, float32; batch {record['batch_size']} blocks; best of "
        f"{record['repeats']} (ours and plain alternate)",
        "",
        f"{'model':<8} {'shape':>8} {'params':>8} {'seq':>4} {'tokens':>7} {'ours tok/s':>11} "
        f"{'plain tok/s':>12} {'ratio':>6} {'tokenize s':>11} {'eval s':>7} {'cloze it/s':>10} "
        f"{'batched':>8}",
    ]
    for name, r in record["models"].items():
        lines.append(
            f"{name:<8} {r['n_layer']:>3}x{r['n_embd']:<4} {r['params'] / 1e6:>7.2f}M {r['seq_len']:>4} "
            f"{r['tokens']:>7} {r['ours_tokens_per_s']:>11.0f} {r['plain_tokens_per_s']:>12.0f} "
            f"{r['speedup']:>6.2f} {r['tokenize_s']:>11.3f} {r['ours_s']:>7.2f} "
            f"{r['cloze_items_per_s']:>10.2f} {r['cloze_batched_items_per_s']:>8.2f}"
        )
    lines += [
        "",
        "ours   = evaluate_loss(model, tok, None, blocks=...) (inference_mode, no KV cache, float64 sums)",
        "plain  = model(input_ids=x, labels=x) under no_grad, same blocks (scores seq_len - 1 per block)",
        "tokenize s = token_blocks once (the reuse path skips it for every further weight set)",
        "cloze it/s = cloze_accuracy items/s, 8 candidates, contexts of min(300, seq - 24) bytes, "
        "shared-context path (CPU default); batched = one row per candidate, 32 rows per forward",
    ]
    for name, r in record["models"].items():
        lines.append(
            f"{name}: loss ours {r['ours_loss']:.4f} vs plain {r['plain_loss']:.4f} nats/token (random init, "
            f"ln 257 = {math.log(257):.4f}); cloze acc {r['cloze_accuracy']:.3f} on {r['cloze_items']} items "
            f"(batched: {r['cloze_tokens_per_s']:.0f} tokens/s)"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="1/8 of the tokens, print only")
    p.add_argument("--out", type=Path, default=OUT, help="folder for eval.txt / eval.json")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    record = run(args)
    text = report(record)
    print(text)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "eval.txt").write_text(text)
        (args.out / "eval.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out / 'eval.txt'} and eval.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
