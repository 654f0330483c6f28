"""``build_source``: the one entry point both trainers use to get their token stream."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from aurora_data.errors import DataError
from aurora_data.gpt import BlendedGPTDataset
from aurora_data.source import SyntheticSource, TokenSource

if TYPE_CHECKING:
    from configs import Config


SPLITS = {"train": 0, "valid": 1, "test": 2}


def _index_cache_dir(file_list: Path, cache_dir: Path) -> Path:
    # Megatron keeps index maps in <data dir>/index-cache; shared read-only data falls back to our cache
    beside = file_list.resolve().parent / "index-cache"
    probe = beside if beside.exists() else beside.parent
    return beside if os.access(probe, os.W_OK) else cache_dir / "index-cache"


def build_source(cfg: Config, num_samples: int | None = None, *, cache_dir: str | Path | None = None,
                 split: str = "train") -> TokenSource:
    """The token stream of ``cfg.data``.

    ``synthetic``: ``SyntheticSource(vocab_size, seq_len, seed)``. ``indexed``: the blended GPT dataset of
    ``cfg.data.file_list``, or of the embedded standard-library corpus (prepared on first use with a BPE of
    ``cfg.model.vocab_size`` tokens) when the list is empty. ``num_samples`` is how many samples the run
    draws, ``steps x global batch`` (the default, from ``cfg.train.steps`` and the parallel config); index
    maps are built for that many (plus Megatron's 0.5 %); reading past them raises ``IndexError``.
    ``cache_dir`` (default ``$AURORA_DATA_CACHE`` or ``~/.cache/aurora_data``) holds the default corpus.
    Index maps go to ``<file list dir>/index-cache`` (Megatron keeps them beside the data), or to
    ``<cache_dir>/index-cache`` when that directory is not writable. ``cfg.data.split`` is the
    train/valid/test split (ALCF's ``990,10,0`` by default). Bad data raises ``DataError`` here, before any step.
    ``split="valid"``: the validation stream instead (Megatron's valid datasets over the same files and
    weights; synthetic data: samples at positions no training run reaches); ``num_samples`` is then required.
    """
    from aurora_data.corpus import default_cache_dir, ensure_default_dataset

    d, vocab = cfg.data, cfg.model.vocab_size
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {tuple(SPLITS)}")
    if d.source == "synthetic":
        return SyntheticSource(vocab, d.seq_len, d.seed,
                               offset=SyntheticSource.VALID_OFFSET * SPLITS[split])
    if d.source != "indexed":
        raise DataError(f"data.source={d.source!r} is not one of synthetic, indexed")
    if num_samples is None:
        try:
            num_samples = cfg.train.steps * (cfg.parallel.gbs or cfg.global_batch())
        except ValueError as e:  # a mesh with a -1 axis: the batch depends on the device count
            raise DataError(f"cannot derive num_samples from the config ({e}); pass num_samples=steps*gbs") from None
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if d.file_list:
        file_list = Path(d.file_list).expanduser()
        if not file_list.is_file():
            raise DataError(f"{file_list}: data.file_list not found")
    else:
        file_list = ensure_default_dataset(cache, vocab)
    return BlendedGPTDataset(file_list, d.seq_len, num_samples, seed=d.seed, vocab_size=vocab,
                             split=d.split, cache_dir=_index_cache_dir(file_list, cache), split_index=SPLITS[split])
