"""`extramerge eval`: its arguments and its command (held-out loss, bits/byte and cloze accuracy of causal
LM folders, optionally through lm-evaluation-harness; with --config or --model-factory, of checkpoints in
any format the merge engine reads, see :mod:`.checkpoints`). transformers is imported only when it runs."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rivervalley.common.publish import own_json

from .. import eval as E
from ..io import load_checkpoints, parse_step
from ..io.outputs import check_file, write_file
from . import lmeval

__all__ = ["add_arguments", "run_command"]


def add_arguments(e: argparse.ArgumentParser) -> None:
    """The eval subcommand's arguments."""
    e.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="Hugging Face model folders, or run folders of step_XXXX/ model folders (each is evaluated); "
        "with --config or --model-factory, checkpoints in any format the merge engine reads (.pt, "
        "safetensors files, DCP and Megatron folders) or folders of them",
    )
    e.add_argument(
        "--data", required=True, metavar="FILE", help="held-out text: .jsonl ({'text': ...} per line), .txt"
    )
    e.add_argument(
        "--config",
        dest="model_config",
        metavar="DIR",
        help="an HF config folder (config.json) to build the model from, for checkpoints in another format "
        "whose tensors carry that model's HF names (as extramerge study --config)",
    )
    e.add_argument(
        "--model-factory",
        metavar="MODULE:FN",
        help="a function building the model (a torch.nn.Module) from the last checkpoint, e.g. "
        "extramerge.study.factories:nanogpt for nanoGPT .pt files (as extramerge study --model-factory)",
    )
    e.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="tokenizer folder, with --config or --model-factory (default: the checkpoints' own)",
    )
    e.add_argument(
        "--cloze",
        type=_cloze_source,
        default=200,
        metavar="N|FILE.jsonl",
        help="cloze items: build N from --data (default 200; 0 = no cloze) or load a saved item set",
    )
    e.add_argument("--candidates", type=_positive, default=8, help="candidates per built item (default 8)")
    e.add_argument("--seed", type=int, default=0, help="seed of the built cloze items (default 0)")
    e.add_argument("--save-cloze", metavar="FILE.jsonl", help="save the cloze items used, to reuse later")
    e.add_argument(
        "--seq-len", type=_positive, help="tokens per evaluation block (default: model maximum, else 1024)"
    )
    e.add_argument("--batch-size", type=_positive, default=16, help="blocks per forward pass (default 16)")
    e.add_argument("--cloze-batch-size", type=_positive, default=32, help="cloze sequences per pass (32)")
    e.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    e.add_argument(
        "--threads", type=_positive, help="torch CPU threads (default torch's; 1 is best on a busy machine)"
    )
    e.add_argument("--json", metavar="OUT.json", help="also write all results here (atomically)")
    e.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --json / --save-cloze file that an earlier extramerge eval wrote",
    )
    e.add_argument(
        "--lm-eval",
        action="store_true",
        help="also run lm-evaluation-harness on the same items and documents (pip install 'lm-eval[hf]')",
    )


def _cloze_source(text: str) -> int | str:
    try:
        n = int(text)
    except ValueError:
        return text
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number of items >= 0 or a .jsonl file, got {text!r}")
    return n


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _model_folders(paths: list[str]) -> list[tuple[str, object, int | None]]:
    """(display name, folder, step) per model: a model folder as given, a run folder expanded to its step
    folders (oldest first, as `load_checkpoints` orders them). Every folder is checked before any work."""
    out = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise ValueError(f"{p}: no such file or folder")
        if path.is_dir() and not (path / "config.json").is_file():
            ckpts = load_checkpoints([path])
            for c in ckpts:
                c.close()
            out.extend((f"{path.name}/{c.path.name}", c.path, c.step) for c in ckpts)
        else:
            out.append((str(p), path, parse_step(path.name)))
    for _, folder, _ in out:
        E.check_model_folder(folder)
    return out


def _eval_inputs(args, models, checkpoints=None) -> list:
    """Everything eval reads (never written onto or into): the data and cloze files, each model folder and
    the tokenizer files it uses (possibly in its run folder), or the checkpoints and their tokenizer."""
    inputs = [Path(args.data)] + ([Path(args.cloze)] if isinstance(args.cloze, str) else [])
    if checkpoints is not None:
        return inputs + checkpoints.inputs
    for _, folder, _ in models:
        inputs += [Path(folder), *E.tokenizer_files(folder)]
    return inputs


def _checkpoint_model(args, device):
    """With --config or --model-factory: the checkpoints and the one model they are loaded into
    (:class:`.checkpoints.CheckpointModel`), everything checked; else None (HF folders, loaded whole)."""
    from ..study.models import ModelSource

    source = ModelSource(config=args.model_config, factory=args.model_factory)
    if not source.given:
        if args.tokenizer is not None:
            raise ValueError(
                f"--tokenizer {args.tokenizer}: goes with --config or --model-factory (an HF model folder "
                "is evaluated with its own tokenizer)"
            )
        return None
    if args.lm_eval:
        raise ValueError(
            "--lm-eval: lm-evaluation-harness loads HF model folders, not --config/--model-factory"
        )
    from .checkpoints import CheckpointModel

    return CheckpointModel(args.models, source, args.tokenizer, device=device, seq_len=args.seq_len)


def _is_eval_json(path) -> bool:
    return own_json(path, "kind", "eval")


def run_command(args) -> int:
    """`extramerge eval`: evaluate each model folder (or checkpoint), print one row each, optionally write
    --json."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    checkpoints = _checkpoint_model(args, device)
    try:
        return _evaluate(args, device, checkpoints)
    finally:
        if checkpoints is not None:
            checkpoints.close()


def _load(models, checkpoints, i: int, device):
    """(model, tokenizer, forward, context, tokenizer fingerprint) of model i: an HF folder loaded whole,
    or checkpoint i's tensors put into the one model."""
    if checkpoints is None:
        folder = models[i][1]
        model, tok = E.load_model(folder, device=device)
        return model, tok, None, None, E.tokenizer_fingerprint(folder)
    checkpoints.load(i)
    fp = E.tokenizer_fingerprint(checkpoints.tokenizer_folder)
    return checkpoints.model, checkpoints.tokenizer, checkpoints.forward, checkpoints.context, fp


def _evaluate(args, device, checkpoints) -> int:
    models = _model_folders(args.models) if checkpoints is None else checkpoints.entries
    inputs = _eval_inputs(args, models, checkpoints)
    for out, own in ((args.json, _is_eval_json), (args.save_cloze, E.is_cloze_file)):
        if out:  # before any work: refused outputs fail now, not after the evaluation
            check_file(out, force=args.force, own=own, inputs=inputs)
    texts = E.load_texts(args.data)
    items = None
    if isinstance(args.cloze, str):
        items = E.load_cloze(args.cloze)
    elif args.cloze > 0:
        items = E.build_cloze(texts, n_items=args.cloze, n_candidates=args.candidates, seed=args.seed)
    if items is not None and args.save_cloze:
        E.save_cloze(items, args.save_cloze, force=args.force, inputs=inputs)
    task_dir = None
    if args.lm_eval:
        import tempfile

        lmeval.require_lm_eval()
        task_dir = tempfile.mkdtemp(prefix="extramerge-lmeval-")
        lmeval.write_task(texts, task_dir)
        if items is not None:
            lmeval.write_task(items, task_dir)
    width = max(24, *(len(name) for name, _, _ in models))
    head = f"{len(texts)} documents from {args.data}"
    if items:
        head += f"; {len(items)} cloze items, chance {1 / len(items[0].candidates):.3f}"
    print(head)
    print(f"{'model':<{width}} {'loss':>7} {'bits/byte':>9} {'cloze acc ± se':>16} {'tokens/s':>9}")
    cache: dict = {}
    rows = []
    try:
        for i, (name, folder, step) in enumerate(models):
            t0 = time.perf_counter()
            model, tok, forward, context, fingerprint = _load(models, checkpoints, i, device)
            load_s = time.perf_counter() - t0
            seq_len = args.seq_len or context or E.seq_len_of(model)
            key = (fingerprint, seq_len)
            if key not in cache or key[0] is None:
                cache[key] = E.token_blocks(texts, tok, seq_len)
            row = E.evaluate_model(
                model,
                texts,
                tokenizer=tok,
                blocks=cache[key],
                cloze_items=items,
                batch_size=args.batch_size,
                cloze_batch_size=args.cloze_batch_size,
                device=device,
                forward=forward,
                max_length=context,
            )
            row.update(name=name, path=str(folder), step=step, load_seconds=load_s)
            c = row["cloze"]
            acc = "-" if c is None else f"{c['accuracy']:.3f} ± {c['stderr']:.3f}"
            print(
                f"{name:<{width}} {row['loss']:>7.4f} {row['bits_per_byte']:>9.4f} {acc:>16} "
                f"{row['tokens_per_s']:>9.0f}",
                flush=True,
            )
            del model
            if task_dir is not None:
                lm = lmeval.run_lm_eval(folder, task_dir, device=device, batch_size=args.batch_size)
                row["lm_eval"] = lm
                res = lm["results"]
                parts = [f"{t}: " + ", ".join(f"{k}={v:.4g}" for k, v in r.items() if isinstance(v, float))
                         for t, r in res.items()]  # fmt: skip
                print(f"{'':<{width}} lm-eval {'; '.join(parts)}", flush=True)
            rows.append(row)
    finally:
        if task_dir is not None:
            import shutil

            shutil.rmtree(task_dir, ignore_errors=True)
    if args.json:
        record = {
            "tool": "extramerge",
            "kind": "eval",
            "data": str(args.data),
            "documents": len(texts),
            "device": device,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "model_config": args.model_config,
            "model_factory": args.model_factory,
            "tokenizer": None if checkpoints is None else str(checkpoints.tokenizer_folder),
            "cloze": None
            if items is None
            else {
                "source": args.cloze if isinstance(args.cloze, str) else "built",
                "items": len(items),
                "candidates": len(items[0].candidates),
                "seed": args.seed,
            },
            "models": rows,
        }
        write_file(
            args.json, json.dumps(record, indent=1) + "\n", force=args.force, own=_is_eval_json, inputs=inputs
        )
        print(f"wrote {args.json}")
    return 0
