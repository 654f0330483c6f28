"""The trainer's token source: synthetic, or Megatron indexed datasets via ``aurora_data``."""

from __future__ import annotations

from aurora_data import SyntheticSource, TokenSource
from configs import Config


def make_source(cfg: Config, num_samples: int) -> TokenSource:
    if cfg.data.source == "synthetic":
        return SyntheticSource(cfg.model.vocab_size, cfg.data.seq_len, cfg.data.seed)
    from aurora_data import build_source

    return build_source(cfg, num_samples=num_samples)
