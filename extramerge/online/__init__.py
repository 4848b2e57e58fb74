"""Merging during training: SMA, WMA, EMA, power-EMA and Extra-Merge of a model's parameters kept every k
steps, on plain tensors and on FSDP2/DTensor shards (each rank its own shard, no communication); swapped
into the model for evaluation; saved through ``extramerge.io.write_checkpoint`` or DCP.

Modules: ``spec`` (the ``ema:0.99,sma:8,extra:0.5@4`` grammar and ``Average``), ``averages`` (the stores:
snapshot ring, running EMA), ``merger`` (``OnlineMerger``), ``save`` (checkpoints and power-EMA snapshots),
``hf`` (a transformers ``TrainerCallback``; imports transformers when used).
"""

from __future__ import annotations

from .merger import OnlineMerger, local_tensor, named_tensors, window_weights
from .spec import Average, parse_spec

__all__ = ["OnlineMerger", "Average", "parse_spec", "local_tensor", "named_tensors", "window_weights"]
