"""Framework-neutral (numpy) data layer shared by jax_impl and torch_ref.

``build_source(cfg)`` gives either trainer its ``TokenSource``: synthetic, or Megatron indexed datasets
blended from a data-file-list exactly as ALCF Megatron-DeepSpeed does (``aurora_data.gpt``).
``python -m aurora_data.prepare`` makes such datasets; ``aurora_data.corpus`` is the offline default.
"""

from aurora_data.errors import DataError
from aurora_data.filelist import FileListEntry, parse_file_list
from aurora_data.gpt import BlendedGPTDataset, GPTDataset
from aurora_data.indexed import IndexedDataset, IndexedDatasetBuilder
from aurora_data.loader import build_source
from aurora_data.source import SyntheticSource, TokenSource, global_batch, rank_slice

__all__ = [
    "BlendedGPTDataset", "DataError", "FileListEntry", "GPTDataset", "IndexedDataset", "IndexedDatasetBuilder",
    "SyntheticSource", "TokenSource", "build_source", "global_batch", "parse_file_list", "rank_slice",
]
