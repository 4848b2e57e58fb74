"""Gaussian draws for the simulator: the noise backend choice and :class:`NoiseSource` (the compiled Philox
kernel of :mod:`rivervalley._native`, or torch generators on row blocks filled by background threads).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from rivervalley import _native

__all__ = ["NOISE_BACKENDS", "resolve_backend", "NoiseSource"]

NOISE_BACKENDS = ("auto", "native", "torch")


def resolve_backend(backend: str, device: torch.device, dtype, noise_dtype) -> str:
    """'native' or 'torch' for ``noise_backend`` (see :func:`simulate`)."""
    if backend not in NOISE_BACKENDS:
        raise ValueError(f"noise_backend must be one of {NOISE_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if device.type != "cpu":
        why = f"it runs on CPU only (device {device})"
    elif dtype not in _native.PhiloxNormals.DTYPES:
        why = f"it updates float32/float64 parameters only (dtype {dtype})"
    elif noise_dtype != torch.float32:
        why = f"it draws float32 normals (noise_dtype {noise_dtype} needs noise_backend='torch')"
    elif _native.load() is None:
        why = _native.status()["detail"]
    else:
        return "native"
    if backend == "native":
        raise ValueError(f"noise_backend='native' is unavailable: {why}")
    return "torch"


class NoiseSource:
    """Standard normals for a [S, p] batch.

    ``backend='native'``: the compiled Philox4x32-10 + Box-Muller kernel (:mod:`rivervalley._native`);
    its fused updates (``self.native``: SGD steps, AR(1) jumps) draw the normals in registers, so they
    never touch memory, and :meth:`draw` gives them as a tensor for everything else.

    ``backend='torch'``: drawn in ``dtype`` by ``streams`` independent torch generators on contiguous row
    blocks (seeds derived from ``seed``) and delivered in ``out_dtype``.

    Drawing float32 and converting (a vectorised copy) is several times faster than torch's float64
    sampler and keeps every later update same-dtype (mixed-dtype CPU kernels are slow). For large batches
    the blocks are filled by background threads (torch.randn releases the GIL) into two alternating
    buffers, so the next step's noise is drawn while the current step computes. The numbers depend on
    (seed, S, p, streams) only, never on the thread count or on prefetching. A returned buffer stays valid
    until the next call.
    """

    def __init__(
        self, shape, seed: int, dtype, device, out_dtype=None, streams: int = 4, threads=None, backend="torch"
    ):
        base = torch.Generator().manual_seed(int(seed))
        init_seed = int(torch.randint(0, 2**62, (1,), generator=base))
        self.init_gen = torch.Generator(device=device).manual_seed(init_seed)
        out_dtype = dtype if out_dtype is None else out_dtype
        self.backend = backend
        self.pool = self.native = None
        if backend == "native":
            key = int(torch.randint(0, 2**62, (1,), generator=base))
            self.native = _native.PhiloxNormals(key, threads)
            self.shape, self.out_dtype, self.device, self.buf = shape, out_dtype, device, None
            return
        numel = math.prod(shape)
        big = numel >= 1 << 17 and torch.device(device).type == "cpu"
        workers = min(streams, os.cpu_count() or 1) if threads is None else int(threads)
        self.pool = ThreadPoolExecutor(max(1, workers)) if big else None
        self.sets = []
        for _ in range(2 if big else 1):
            raw = torch.empty(shape, dtype=dtype, device=device)
            out = raw if out_dtype == dtype else torch.empty(shape, dtype=out_dtype, device=device)
            blocks = [
                (r, o) for r, o in zip(raw.chunk(streams, 0), out.chunk(streams, 0), strict=True) if r.numel()
            ]
            self.sets.append((out, blocks))
        seeds = torch.randint(0, 2**62, (len(self.sets[0][1]),), generator=base).tolist()
        self.gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self._next = 0
        self._pending = None

    @staticmethod
    def _fill(block, gen) -> None:
        raw, out = block
        torch.randn(raw.shape, generator=gen, dtype=raw.dtype, device=raw.device, out=raw)
        if out is not raw:
            out.copy_(raw)

    def _submit(self, k: int):
        blocks = self.sets[k][1]
        return [self.pool.submit(self._fill, b, g) for b, g in zip(blocks, self.gens, strict=True)]

    def draw(self) -> torch.Tensor:
        """Fresh standard normals, [S, p] in ``out_dtype``."""
        if self.native is not None:
            if self.buf is None:
                self.buf = torch.empty(self.shape, dtype=self.out_dtype, device=self.device)
            return self.native.fill(self.buf)
        if self.pool is None:
            out, blocks = self.sets[0]
            for block, gen in zip(blocks, self.gens, strict=True):
                self._fill(block, gen)
            return out
        ready = self._next
        pending = self._pending if self._pending is not None else self._submit(ready)
        for f in pending:
            f.result()
        self._next = 1 - ready
        self._pending = self._submit(self._next)  # prefetch the next draw while the caller computes
        return self.sets[ready][0]

    def close(self) -> None:
        if self.native is not None:
            self.native.close()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
            self._pending = None
