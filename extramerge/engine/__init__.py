"""The streaming engine: Σ_j w_j θ_j over real checkpoints, chunk by chunk, with numpy only.

The model is cut into units of about ``chunk_bytes`` per checkpoint (a slice of a large tensor, or a run
of small tensors). A small thread pool works on consecutive units: each worker maps the unit's pages of
every checkpoint in (madvise POPULATE_READ on the shared read-only maps of the safetensors files: no
copy), accumulates Σ_j w_j x_j in float32 (or float64) in cache-sized blocks (tmp = w·x stays in L2,
acc += tmp), casts to the output dtype (bfloat16 through ml_dtypes, round-to-nearest-even) into a pooled
buffer and unmaps the pages again (madvise DONTNEED), so resident memory stays a few units. The calling
thread meanwhile hands finished units, in order, to the streaming writer (direct I/O for large outputs),
so reading, arithmetic and writing overlap. Peak memory is a few units — independent of the model size
and of the number of checkpoints — except for PyTorch-file outputs, which torch.save must hold whole
(and PyTorch-file inputs, which torch memory-maps itself: their touched pages count as resident).

torch is never imported for safetensors inputs and outputs. Checkpoints with weight exactly 0 are not
read at all. Integer and bool tensors (step counters, masks) are not averaged: they are copied from the
newest checkpoint.

Modules: ``units`` (cutting the tensors into work units, mapping a unit's data), ``parallel`` (ordered
thread map, forked workers), ``arith`` (the blocked weighted sum), ``summary`` (``MergeSummary``, memory
probes, progress), ``merge`` (``merge_weights``) and ``ranked`` (the write phase when several processes
share a merge; see ``extramerge.distributed``).
"""

from .merge import MERGE_CHUNK_BYTES, merge_weights
from .summary import MergeSummary

__all__ = ["MERGE_CHUNK_BYTES", "MergeSummary", "merge_weights"]
