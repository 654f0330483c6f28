"""Rotary-embedding tables, computed once on the host for both models (numpy; no framework).

One definition keeps jax_impl and torch_ref bit-identical on every platform and with or without the other
framework installed. ``inv_freq`` is the correctly rounded fp32 value of ``theta ** -(2i / dim)`` (from
float64), the angles are fp32 products (as an fp32 ``outer`` rounds them), and cos/sin are computed in float64
and rounded once. torch's own fp32 ``pow`` (what Hugging Face's Llama uses) is a 1-ulp vector kernel, not
correctly rounded: at theta 50000 one frequency differs by one fp32 ulp (index 5 of 32 at head_dim 64; 10 and 47
at 128), 6e-5 rad at position 4095 (tests/test_torch_model.py measures it for every preset).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def inv_freq(dim: int, theta: float) -> np.ndarray:
    """(dim/2,) fp32: ``1 / theta ** (2i / dim)``, the exponent rounded to fp32 first as torch's arange/dim does."""
    f32 = np.float32
    exponent = np.arange(0, dim, 2, dtype=f32) / f32(dim)
    return f32(1.0) / np.power(np.float64(theta), exponent.astype(np.float64)).astype(f32)


@lru_cache(maxsize=16)
def rope_tables(seq: int, dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (seq, dim) fp32 for non-interleaved ("rotate half") rotary embeddings; read-only (cached)."""
    freqs = np.outer(np.arange(seq, dtype=np.float32), inv_freq(dim, theta))  # (seq, dim/2) fp32
    emb = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)  # (seq, dim)
    tables = np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)
    for t in tables:
        t.flags.writeable = False
    return tables
