"""Online merging inside a Hugging Face Trainer: a tiny GPT-2 (built from a config, nothing downloaded)
trained on the bytes of Python's own help topics, with an ``OnlineMergeCallback`` (``add_online_merging``)
keeping an EMA, an SMA and their Extra-Merge; each evaluation logs ``eval_loss_ema``, ``eval_loss_sma``,
``eval_loss_extra`` beside ``eval_loss``; each checkpoint-N gets ``online/<name>/checkpoint-N/`` beside it.

    HF_HUB_OFFLINE=1 python -m examples.online_merge_hf_trainer [OUTPUT_DIR]     # ~5 s on a CPU
"""

from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pydoc_data.topics import topics  # noqa: E402

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from extramerge.online.hf import add_online_merging  # noqa: E402

SEQ = 64


def byte_blocks(text: str, n: int, offset: int = 0) -> list[dict]:
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    starts = range(offset, offset + n * SEQ, SEQ)
    return [{"input_ids": data[s : s + SEQ], "labels": data[s : s + SEQ]} for s in starts]


def main(output_dir: str | None = None, steps: int = 60, extra_callbacks=()) -> Trainer:
    torch.manual_seed(0)
    text = "\n".join(topics[k] for k in sorted(topics))
    train, held_out = byte_blocks(text, 512), byte_blocks(text, 32, offset=600 * SEQ)
    config = GPT2Config(vocab_size=256, n_positions=SEQ, n_embd=64, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    args = TrainingArguments(
        output_dir=output_dir or tempfile.mkdtemp(),
        max_steps=steps,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=16,
        learning_rate=3e-3,
        eval_strategy="steps",
        eval_steps=steps // 2,
        save_steps=steps // 2,
        logging_steps=steps // 4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=held_out)
    # an update every 2 steps; merges evaluated by the Trainer's own loop, as eval_loss is
    add_online_merging(trainer, "ema:0.9,sma:8,extra:0.5@4", every=2)
    for cb in extra_callbacks:
        trainer.add_callback(cb)
    trainer.train()
    for entry in trainer.state.log_history:
        if any(k.startswith("eval_loss") for k in entry):
            print(
                {
                    k: round(v, 4) if isinstance(v, float) else v
                    for k, v in entry.items()
                    if "loss" in k or k == "step"
                }
            )
    return trainer


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
