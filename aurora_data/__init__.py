"""Framework-neutral (numpy) data layer shared by jax_impl and torch_ref."""

from aurora_data.source import SyntheticSource, TokenSource, global_batch, rank_slice

__all__ = ["SyntheticSource", "TokenSource", "global_batch", "rank_slice"]
