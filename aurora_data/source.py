"""The token-source interface both trainers consume, and a deterministic synthetic source.

Batch order follows Megatron's pretraining sampler: the global batch of a step is GAS
microbatches of (DP x MBS) consecutive samples, and data-parallel rank r takes rows
[r*MBS, (r+1)*MBS) of each microbatch. ``global_batch`` returns that in shape
(gas, dp*mbs, seq+1); each sample is seq+1 tokens (inputs = [:-1], labels = [1:]).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class TokenSource(Protocol):
    seq_len: int
    vocab_size: int

    def samples(self, start: int, count: int) -> np.ndarray:
        """Samples ``start .. start+count-1`` of the stream: int32 array (count, seq_len+1)."""
        ...


def global_batch(source: TokenSource, consumed_samples: int, mbs: int, gas: int, dp: int) -> np.ndarray:
    """The step's global batch, shape (gas, dp*mbs, seq+1), from a consumed-samples count."""
    flat = source.samples(consumed_samples, gas * dp * mbs)
    return flat.reshape(gas, dp * mbs, source.seq_len + 1)


def rank_slice(batch: np.ndarray, dp_rank: int, mbs: int) -> np.ndarray:
    """One data-parallel rank's rows of a global batch: (gas, mbs, seq+1)."""
    return batch[:, dp_rank * mbs:(dp_rank + 1) * mbs]


class SyntheticSource:
    """Learnable, deterministic token stream: sample i depends only on (seed, i).

    Each sample is a noisy arithmetic progression mod V: t_k = (a + b k) mod V with a few
    tokens replaced at random, so next-token loss falls quickly but never reaches zero.
    """

    # the validation stream: samples far past any training position, so never ones the run trains on
    VALID_OFFSET = 2**62

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 1234, noise: float = 0.05, offset: int = 0):
        self.vocab_size, self.seq_len, self.seed, self.noise = vocab_size, seq_len, seed, noise
        self.offset = offset

    def _one(self, i: int) -> np.ndarray:
        rng = np.random.Generator(np.random.Philox(key=[self.seed, self.offset + i]))
        a = rng.integers(0, self.vocab_size)
        b = rng.integers(1, min(16, self.vocab_size))
        t = (a + b * np.arange(self.seq_len + 1)) % self.vocab_size
        flip = rng.random(self.seq_len + 1) < self.noise
        t[flip] = rng.integers(0, self.vocab_size, flip.sum())
        return t.astype(np.int32)

    def samples(self, start: int, count: int) -> np.ndarray:
        return np.stack([self._one(start + j) for j in range(count)])
