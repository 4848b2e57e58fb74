"""Optional adapter to EleutherAI's lm-evaluation-harness (``pip install 'lm-eval[hf]'``), fully offline.

    from extramerge.eval import build_cloze, load_texts
    from extramerge.eval.lmeval import write_task, run_lm_eval
    texts = load_texts("data/val.jsonl")
    write_task(build_cloze(texts, n_items=200), "tasks/")      # task "extramerge_cloze" (multiple choice)
    write_task(texts, "tasks/")                                  # task "extramerge_ppl" (rolling perplexity)
    run_lm_eval("runs/gpt2/step_004000", "tasks/")               # -> {"results": {...}, ...}

A task is a YAML file plus a JSONL data file in one folder, loaded with lm-eval's ``include_path``
(``dataset_path: json`` with absolute ``data_files``: nothing is downloaded; the folder must stay where it
was written, or be written again).

The cloze task reproduces ``extramerge.eval.cloze_accuracy`` exactly: each doc's ``query`` is the
context without its trailing whitespace and each choice is that whitespace + candidate, with an empty
``target_delimiter``, which is precisely how lm-eval itself would split "context ␣" / "word"; the metric is
``acc`` (summed log-likelihood, not length-normalised). The perplexity task scores each held-out document
separately with ``loglikelihood_rolling`` (lm-eval's word_perplexity, byte_perplexity, bits_per_byte):
unlike ``evaluate_loss`` it predicts no EOS after a document and gives a document no context from the
previous one, so its bits/byte differs slightly.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from ..io import safety
from ..io.outputs import write_file
from .cloze_items import ClozeItem
from .model import check_model_folder, tokenizer_folder

__all__ = ["write_task", "run_lm_eval", "require_lm_eval"]

CLOZE_TASK = "extramerge_cloze"
PPL_TASK = "extramerge_ppl"


def require_lm_eval():
    """Import lm_eval (and accelerate, which its ``hf`` model needs), or raise a one-line ValueError
    telling how to install them."""
    try:
        import accelerate  # noqa: F401
        import lm_eval
    except ImportError as e:
        raise ValueError(
            f"lm-evaluation-harness is not installed (no module {e.name or 'lm_eval'!r}): "
            "pip install 'lm-eval[hf]'"
        ) from None
    return lm_eval


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML scalar


def write_task(
    data: Sequence[ClozeItem] | Sequence[str], folder: str | os.PathLike, *, name: str | None = None
) -> str:
    """Write an lm-eval task into ``folder`` (created if needed); returns the task name.

    ``data`` is either cloze items (→ a ``multiple_choice`` task, default name ``extramerge_cloze``;
    doc_to_text = context, doc_to_choice = candidates, doc_to_target = index of the target) or held-out
    documents (→ a ``loglikelihood_rolling`` perplexity task, default name ``extramerge_ppl``). Files:
    ``NAME.yaml`` and ``NAME.jsonl``, written atomically. Does not need lm-eval installed.
    """
    data = list(data)
    if not data:
        raise ValueError("write_task: nothing to write (no items or texts)")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    if all(isinstance(x, ClozeItem) for x in data):
        kind = "cloze"
    elif all(isinstance(x, str) for x in data):
        kind = "ppl"
    else:
        raise ValueError("write_task: give a list of ClozeItem or a list of texts")
    name = name or (CLOZE_TASK if kind == "cloze" else PPL_TASK)
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"task name {name!r}: use letters, digits, '_' and '-'")
    folder.mkdir(parents=True, exist_ok=True)
    data_file = (folder / f"{name}.jsonl").resolve()
    lines = []
    if kind == "cloze":
        for it in data:
            query = it.context.rstrip()
            ws = it.context[len(query) :]
            lines.append({"query": query, "choices": [ws + c for c in it.candidates], "label": it.label})
    else:
        lines = [{"text": t} for t in data]
    _write(data_file, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    head = [
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {_yaml_str(str(data_file))}",
        "test_split: test",
    ]
    if kind == "cloze":
        body = [
            "output_type: multiple_choice",
            "doc_to_text: query",
            "doc_to_choice: choices",
            "doc_to_target: label",
            'target_delimiter: ""',
            "metric_list:",
            "  - metric: acc",
            "    aggregation: mean",
            "    higher_is_better: true",
        ]
    else:
        body = [
            "output_type: loglikelihood_rolling",
            'doc_to_text: ""',
            "doc_to_target: text",
            "metric_list:",
            "  - metric: word_perplexity",
            "    aggregation: weighted_perplexity",
            "    higher_is_better: false",
            "  - metric: byte_perplexity",
            "    aggregation: weighted_perplexity",
            "    higher_is_better: false",
            "  - metric: bits_per_byte",
            "    aggregation: bits_per_byte",
            "    higher_is_better: false",
        ]
    _write(folder / f"{name}.yaml", "\n".join([*head, *body, "metadata:", "  version: 1.0", ""]))
    return name


def _write(path: Path, text: str) -> None:
    """Write a task file atomically; an existing one is replaced only if it belongs to a task this module
    wrote (its .yaml starts with 'task: ')."""
    write_file(path, text, force=True, own=_is_task_file)


def _is_task_file(path: Path) -> bool:
    yaml = path.with_suffix(".yaml")
    try:
        with os.fdopen(safety.open_regular(yaml), "rb") as f:  # never blocks on a FIFO
            return path.suffix in (".yaml", ".jsonl") and f.read(6) == b"task: "
    except (OSError, ValueError):
        return False


def _tasks_in(folder: Path) -> list[str]:
    names = []
    for y in sorted(folder.glob("*.yaml")):
        for line in y.read_text(encoding="utf-8").splitlines():
            if line.startswith("task:"):
                names.append(line.split(":", 1)[1].strip().strip("\"'"))
                break
    return names


def _task_manager(cls, task_dir: Path):
    """Only our tasks: indexing lm-eval's thousands of built-in task files takes seconds."""
    try:
        return cls(include_path=str(task_dir.resolve()), include_defaults=False)
    except TypeError:  # pragma: no cover - lm-eval without include_defaults
        return cls(include_path=str(task_dir.resolve()))


def run_lm_eval(
    model_folder: str | os.PathLike,
    task_dir: str | os.PathLike,
    *,
    tasks: Sequence[str] | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    limit: int | float | None = None,
    dtype: str = "float32",
    log_samples: bool = False,
    bootstrap_iters: int = 0,
    quiet: bool = True,
) -> dict:
    """Run lm-eval's ``hf`` model on a local model folder over the tasks in ``task_dir`` (all of them by
    default), offline (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, TRANSFORMERS_OFFLINE set for the call).

    Returns ``{"results": {task: {metric: value, ...}}, "n_samples": {task: n}, "seconds": s}`` plus
    ``"samples"`` (lm-eval's per-document records) when ``log_samples``. Metric names lose lm-eval's
    ",none" filter suffix (``acc``, ``bits_per_byte``, ...). Standard errors: ``bootstrap_iters`` = 0 (the
    default) skips them all; > 0 gives ``acc_stderr`` in closed form and bootstraps the perplexities.
    ``quiet`` silences lm-eval's log below ERROR for the call (it warns once per truncated request).
    Needs ``pip install 'lm-eval[hf]'``.
    """
    folder = check_model_folder(model_folder)
    task_dir = Path(task_dir)
    if not task_dir.is_dir():
        raise ValueError(f"{task_dir}: no such task folder")
    names = list(tasks) if tasks else _tasks_in(task_dir)
    if not names:
        raise ValueError(f"{task_dir}: holds no task YAML files (write them with write_task)")
    require_lm_eval()
    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    log = logging.getLogger("lm_eval")
    level = log.level
    if quiet:
        log.setLevel(logging.ERROR)
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager

        t0 = time.perf_counter()
        args = {
            "pretrained": str(folder.resolve()),
            "tokenizer": str(tokenizer_folder(folder).resolve()),
            "dtype": dtype,
            "trust_remote_code": False,  # a model folder's own code never runs
        }
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args=args,
            tasks=names,
            device=device,
            batch_size=batch_size,
            limit=limit,
            task_manager=_task_manager(TaskManager, task_dir),
            log_samples=log_samples,
            bootstrap_iters=bootstrap_iters,
        )
        seconds = time.perf_counter() - t0
    finally:
        log.setLevel(level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if out is None:  # pragma: no cover - non-zero ranks in distributed runs
        return {}
    result = {
        "results": {
            t: {k.removesuffix(",none"): v for k, v in r.items() if k != "alias" and v != "N/A"}
            for t, r in out["results"].items()
        },
        "n_samples": {t: s.get("effective", s.get("original")) for t, s in out.get("n-samples", {}).items()},
        "seconds": seconds,
    }
    if log_samples:
        result["samples"] = out.get("samples", {})
    return result
