"""Training and validation batches: random windows of ``seq_len + 1`` tokens drawn by a seeded numpy
Generator (with a saveable state, for exact resume), and the fixed validation windows."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["Batches", "eval_windows"]


class Batches:
    """Random windows of ``seq_len + 1`` tokens from a token array; deterministic given the seed, with a
    saveable state (the numpy Generator's)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 1])))
        self._offsets = np.arange(seq_len + 1)

    def next(self) -> torch.Tensor:
        """``[batch, seq_len + 1]`` int64: inputs are ``[:, :-1]``, targets ``[:, 1:]``."""
        starts = self.rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        return torch.from_numpy(self.tokens[starts[:, None] + self._offsets].astype(np.int64))

    @property
    def state(self) -> dict:
        return self.rng.bit_generator.state

    @state.setter
    def state(self, value: dict) -> None:
        self.rng.bit_generator.state = value


def eval_windows(n_tokens: int, seq_len: int, count: int) -> np.ndarray:
    """Start offsets of ``count`` evenly spaced validation windows (the same subset at every evaluation)."""
    return np.linspace(0, n_tokens - seq_len - 1, count).round().astype(np.int64)
