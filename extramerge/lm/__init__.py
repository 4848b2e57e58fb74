"""Language-model pretraining for the LM study (the ``lm`` extra: needs transformers): a byte-level
tokenizer, corpora and splits, GPT-2/LLaMA presets, and a trainer that writes Hugging Face checkpoint folders.

Modules: ``tokenizer``, ``data``, ``models``; the trainer is ``config`` (run config and its derived
defaults), ``optimizers``, ``batches``, ``checkpointing`` (checkpoints, resume state, run.json), ``train``
(the training loop) and ``cli`` (``python -m experiments.lm.train``). Nothing is imported here, so
``import extramerge.lm`` stays cheap.
"""
