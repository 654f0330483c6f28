"""The trainer's token source (synthetic, or Megatron indexed datasets) from ``aurora_data``."""

from aurora_data import build_source as make_source

__all__ = ["make_source"]
