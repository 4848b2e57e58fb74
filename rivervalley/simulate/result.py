"""The outcome of a simulation: :class:`SimResult` (checkpoints, their steps and losses, the final point)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from rivervalley.landscapes import Landscape

__all__ = ["SimResult"]


@dataclass
class SimResult:
    """Outcome of :func:`simulate`.

    ``checkpoints`` [S, N, p] and ``final`` [S, p] are torch tensors; ``ckpt_steps`` [N] (int64) says which
    step each checkpoint is; ``ckpt_loss`` [S, N] (computed on first access); ``loss_curve`` [n] is the
    seed-mean loss at ``loss_steps`` [n] (None unless ``record_loss_every`` was given).
    """

    checkpoints: torch.Tensor
    ckpt_steps: np.ndarray
    final: torch.Tensor
    steps: int
    landscape: Landscape
    loss_curve: np.ndarray | None = None
    loss_steps: np.ndarray | None = None
    config: dict = field(default_factory=dict)
    _ckpt_loss: torch.Tensor | None = field(default=None, repr=False)

    @property
    def ckpt_loss(self) -> torch.Tensor:
        """Loss of every checkpoint, [S, N] (one checkpoint at a time, to bound temporary memory)."""
        if self._ckpt_loss is None:
            s, n, _ = self.checkpoints.shape
            out = torch.empty(s, n, dtype=self.checkpoints.dtype, device=self.checkpoints.device)
            for k in range(n):
                out[:, k] = self.landscape.loss(self.checkpoints[:, k])
            self._ckpt_loss = out
        return self._ckpt_loss

    @property
    def seeds(self) -> int:
        return self.checkpoints.shape[0]

    @property
    def n_ckpts(self) -> int:
        return self.checkpoints.shape[1]

    def u(self) -> torch.Tensor:
        """River coordinate of every checkpoint, [S, N]."""
        s, n, p = self.checkpoints.shape
        return self.landscape.river_coordinate(self.checkpoints.reshape(s * n, p)).reshape(s, n)

    def v(self) -> torch.Tensor:
        """Valley coordinates of every checkpoint, [S, N, m]."""
        s, n, p = self.checkpoints.shape
        return self.landscape.valley_coordinates(self.checkpoints.reshape(s * n, p)).reshape(s, n, -1)
