"""The torch trainer's token source: the same stream as the JAX trainer (``aurora_data``)."""

from __future__ import annotations

from aurora_data import SyntheticSource, TokenSource
from configs import Config


def make_source(cfg: Config, num_samples: int) -> TokenSource:
    """Synthetic source for ``data.source == "synthetic"``, else ``aurora_data.build_source``."""
    if cfg.data.source == "synthetic":
        return SyntheticSource(cfg.model.vocab_size, cfg.data.seq_len, cfg.data.seed)
    from aurora_data import build_source  # imported lazily: the indexed path is optional

    return build_source(cfg, num_samples=num_samples)
