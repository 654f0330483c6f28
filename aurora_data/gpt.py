"""GPT sample construction and corpus blending, reimplemented in numpy after ALCF Megatron-DeepSpeed.

Upstream behaviour reproduced (argonne-lcf/Megatron-DeepSpeed ``megatron/data/gpt_dataset.py``,
``blendable_dataset.py``, ``dataset_utils.py``, ``helpers.cpp``; ALCF launches with
``--split 990,10,0 --blend-sample-in-corpus --shuffle-sample-in-corpus --seed 1234``):

* Per-file sample counts: weights normalised over the list, ``ceil(N * w * 1.005)`` samples per file
  (``get_datasets_weights_and_num_samples``); the stream then has ``sum`` of those samples, a little
  more than the ``N`` asked for.
* Train split: documents ``[0, s1)`` of each file from ``get_train_valid_test_split_`` (rounded
  fractions, remainder moved so the last bound is the document count).
* Per file (``_build_index_mappings``): epochs = the fewest with ``(E * T - 1) // seq >= n``;
  ``doc_idx`` = the split's documents repeated per epoch and shuffled by ``RandomState(seed)``, with
  the last epoch shuffled on its own when it contributes < 80 % of an epoch's samples
  (``separate_last_epoch``); ``sample_idx`` = (doc_idx position, offset) of token ``k * seq`` for
  ``k = 0 .. (E*T - 1)//seq`` (``build_sample_idx``: each sample is seq+1 tokens, consecutive samples
  share one token); ``shuffle_idx`` = a permutation by the same generator (the separated last epoch
  shuffled apart), uint32 unless the count needs int64.
* Blending (``build_blending_indices``): sample ``t`` goes to the dataset with the largest
  ``w_i * max(t, 1) - count_i`` (first index on ties), in float64 exactly as the C++ helper.
* ALCF corpora (``build_train_valid_test_datasets`` with ``BuildCorpusDataset``): files of one corpus
  are blended with weights ``n_i / sum(n)`` (``--blend-sample-in-corpus``; sequential concatenation
  otherwise), the corpus' samples are permuted by a fresh ``RandomState(seed)``
  (``--shuffle-sample-in-corpus``), and corpora (sorted by name) are blended by ``BlendableDataset``
  with weights ``corpus_samples / total``.

Index arrays are cached as ``.npy`` under a key that hashes every input (the ``.idx`` bytes, split,
counts, sequence length, seed, weights), so they are rebuilt whenever an input changes.

Known differences from upstream: only the training stream is built; the cache uses its own names and
keys (Megatron's ``--data-cache-path`` files are not read, though they hold the same values); cases
where Megatron fails mid-run (an empty split, a blend asking a file for more samples than it built)
and a file whose split holds fewer than ``seq+1`` tokens (Megatron would wrap one sample around the
same file) are ``DataError`` at build time; ``build_concat_indices`` (used only without
``--blend-sample-in-corpus``) was not in the sources consulted and is plain concatenation here; a
list line without a corpus is a corpus of its own (ALCF requires the column); the exact-epochs and
forced-index-path options are not supported; samples are int32 (Megatron hands out int64).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aurora_data.errors import DataError
from aurora_data.filelist import FileListEntry, parse_file_list
from aurora_data.indexed import IndexedDataset, index_file

DEFAULT_SEED = 1234
SPLIT_NAMES = ("training", "validation", "test")
DEFAULT_SPLIT = "990,10,0"  # ALCF helpers.sh: --split=${TRAIN_SPLIT:-990},${VAL_SPLIT:-10},${TEST_SPLIT:-0}
_CACHE_VERSION = 1


# ----------------------------------------------------------------------------- small pieces
def train_valid_test_split(splits_string: str, size: int) -> list[int]:
    """Document bounds ``[0, train_end, valid_end, size]`` for a split string like ``"990,10,0"``."""
    sep = "," if "," in splits_string else "/" if "/" in splits_string else None
    try:
        parts = [float(s) for s in (splits_string.split(sep) if sep else [splits_string])]
    except ValueError:
        raise DataError(f"split {splits_string!r} is not a list of numbers like '990,10,0'") from None
    parts = [*parts, 0.0, 0.0][:3]
    total = sum(parts)
    if total <= 0 or min(parts) < 0:
        raise DataError(f"split {splits_string!r} needs non-negative parts with a positive sum")
    bounds = [0]
    for p in parts:
        bounds.append(bounds[-1] + round(p / total * float(size)))
    diff = bounds[-1] - size
    return [bounds[0]] + [b - diff for b in bounds[1:]]


def samples_per_file(weights: Sequence[float], num_samples: int) -> list[int]:
    """``ceil(N * w_norm * 1.005)`` per file, with Megatron's float evaluation order."""
    total = 0.0
    for w in weights:
        total += w
    return [math.ceil(num_samples * (w / total) * 1.005) for w in weights]


def num_epochs(tokens_per_epoch: int, seq_len: int, num_samples: int) -> int:
    """Fewest epochs E with ``(E * tokens_per_epoch - 1) // seq_len >= num_samples``."""
    return max(1, -(-(num_samples * seq_len + 1) // tokens_per_epoch))


def build_doc_idx(documents: np.ndarray, epochs: int, rng: np.random.RandomState,
                  separate_last_epoch: bool) -> np.ndarray:
    """The documents repeated ``epochs`` times and shuffled (the last epoch apart if separated)."""
    if not separate_last_epoch or epochs == 1:
        doc_idx = np.tile(np.asarray(documents, dtype=np.int32), epochs)
        rng.shuffle(doc_idx)
        return doc_idx
    first = build_doc_idx(documents, epochs - 1, rng, False)
    last = build_doc_idx(documents, 1, rng, False)
    return np.concatenate((first, last))


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_len: int, epochs: int,
                     tokens_per_epoch: int) -> np.ndarray:
    """``(n+1, 2)`` int64: where token ``k * seq_len`` of the doc_idx-ordered stream lies.

    Same values as the C++ ``build_sample_idx`` loop, computed with a cumulative sum and a
    binary search instead of walking the documents.
    """
    n = (epochs * tokens_per_epoch - 1) // seq_len
    lengths = np.asarray(sizes, dtype=np.int64)[doc_idx]
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    positions = np.arange(n + 1, dtype=np.int64) * seq_len
    # the last document position whose start is <= the token: skips empty documents as the loop does
    pos = np.searchsorted(starts, positions, side="right") - 1
    out = np.empty((n + 1, 2), dtype=np.int64)
    out[:, 0] = pos
    out[:, 1] = positions - starts[pos]
    out[0] = 0  # the loop records (0, 0) before looking at any document, even an empty one
    return out


def build_shuffle_idx(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """Shuffled ``[0, num_samples)`` followed by shuffled ``[num_samples, total_size)``."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_index_mappings(sizes: np.ndarray, documents: np.ndarray, num_samples: int, seq_len: int,
                         seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(doc_idx, sample_idx, shuffle_idx)`` of one file, as Megatron's ``_build_index_mappings``."""
    tokens = int(np.asarray(sizes, dtype=np.int64)[documents].sum())
    epochs = num_epochs(tokens, seq_len, num_samples)
    rng = np.random.RandomState(seed=seed)
    separate_last = False
    from_first_epochs = 0
    if epochs > 1:
        from_first_epochs = ((epochs - 1) * tokens - 1) // seq_len
        last_epoch = num_samples - from_first_epochs
        per_epoch = (tokens - 1) // seq_len
        if not 0 <= last_epoch <= per_epoch + 1:
            raise RuntimeError(f"last epoch has {last_epoch} samples, outside [0, {per_epoch + 1}]")
        separate_last = last_epoch < int(0.80 * per_epoch)
    doc_idx = build_doc_idx(documents, epochs, rng, separate_last)
    sample_idx = build_sample_idx(sizes, doc_idx, seq_len, epochs, tokens)
    total = sample_idx.shape[0] - 1
    shuffle_idx = build_shuffle_idx(from_first_epochs if separate_last else total, total, rng)
    return doc_idx, sample_idx, shuffle_idx


def build_blending_indices(weights: Sequence[float] | np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy error-minimising blend: ``(dataset_index, dataset_sample_index)``, both int64 of ``size``."""
    w = np.asarray(weights, dtype=np.float64)
    d = len(w)
    if d == 1:
        return np.zeros(size, dtype=np.int64), np.arange(size, dtype=np.int64)
    choice = np.empty(size, dtype=np.int64)
    if d <= 8:
        # scalar Python floats are IEEE doubles: the same arithmetic as the C++ helper, and faster than
        # numpy calls on tiny vectors
        wl = [float(x) for x in w]
        counts = [0] * d
        rest = range(1, d)
        for t in range(size):
            tt = float(t) if t > 1 else 1.0
            best, best_err = 0, wl[0] * tt - counts[0]
            for i in rest:
                err = wl[i] * tt - counts[i]
                if err > best_err:
                    best, best_err = i, err
            choice[t] = best
            counts[best] += 1
    else:
        counts_f = np.zeros(d, dtype=np.float64)
        for t in range(size):
            best = int(np.argmax(w * (float(t) if t > 1 else 1.0) - counts_f))  # argmax: first on ties
            choice[t] = best
            counts_f[best] += 1.0
    return choice, _rank_within(choice, d)


def build_concat_indices(num_samples: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """All of dataset 0, then all of dataset 1, ... (ALCF without ``--blend-sample-in-corpus``)."""
    n = np.asarray(num_samples, dtype=np.int64)
    index = np.repeat(np.arange(len(n), dtype=np.int64), n)
    return index, _rank_within(index, len(n))


def _rank_within(choice: np.ndarray, d: int) -> np.ndarray:
    """For each position, how many earlier positions chose the same dataset."""
    order = np.argsort(choice, kind="stable")
    counts = np.bincount(choice, minlength=d)
    first = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.empty(len(choice), dtype=np.int64)
    rank[order] = np.arange(len(choice), dtype=np.int64) - np.repeat(first, counts)
    return rank


# ----------------------------------------------------------------------------- cache
class IndexCache:
    """``.npy`` files under ``directory``, named by a hash of a JSON description of their inputs.

    Files are written to temporary names and renamed, so concurrent builders (one per rank) are safe;
    an unwritable directory degrades to building in memory with a warning.
    """

    def __init__(self, directory: str | Path | None):
        self.directory = Path(directory) if directory is not None else None
        self.hits = 0
        self.builds = 0

    def load_or_build(self, desc: dict[str, Any], names: Sequence[str],
                      build: Callable[[], Sequence[np.ndarray]]) -> list[np.ndarray]:
        text = json.dumps({"cache_version": _CACHE_VERSION, **desc}, sort_keys=True, indent=1)
        key = hashlib.sha256(text.encode()).hexdigest()[:20]
        if self.directory is not None:
            paths = [self.directory / f"{key}_{n}.npy" for n in names]
            dsc = self.directory / f"{key}.dsc"
            if dsc.is_file() and all(p.is_file() for p in paths):
                try:
                    arrays = [np.load(p, mmap_mode="r", allow_pickle=False) for p in paths]
                    self.hits += 1
                    return arrays
                except (OSError, ValueError):
                    pass  # unreadable cache entry: rebuild and overwrite it
        arrays = list(build())
        self.builds += 1
        if self.directory is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                tag = f".tmp{os.getpid()}"
                for p, a in zip(paths, arrays, strict=True):
                    tmp = p.with_name(p.name + tag)
                    with tmp.open("wb") as f:
                        np.save(f, a, allow_pickle=False)
                    os.replace(tmp, p)
                tmp = dsc.with_name(dsc.name + tag)
                tmp.write_text(text)
                os.replace(tmp, dsc)  # written last: its presence marks a complete entry
            except OSError as e:
                warnings.warn(f"could not write the data index cache in {self.directory} ({e}); "
                              "indices are rebuilt on every start", stacklevel=2)
        return arrays


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- datasets
class GPTDataset:
    """One indexed file's samples of one split (``split_index`` 0 train, 1 valid, 2 test): ``doc_idx``,
    ``sample_idx`` and ``shuffle_idx`` over that split's documents, built as Megatron builds each split's."""

    def __init__(self, data: IndexedDataset, num_samples: int, seq_len: int, *, seed: int = DEFAULT_SEED,
                 split: str = DEFAULT_SPLIT, cache: IndexCache | None = None, where: str = "", split_index: int = 0):
        self.data, self.seq_len, self.num_samples = data, seq_len, num_samples
        label = f"{where}: {data.prefix}" if where else str(data.prefix)
        bounds = train_valid_test_split(split, len(data))
        first, last = bounds[split_index], bounds[split_index + 1]
        name = SPLIT_NAMES[split_index]
        self.documents = np.arange(first, last, dtype=np.int32)
        tokens = int(data.sizes[first:last].sum(dtype=np.int64))
        if len(self.documents) == 0:
            raise DataError(f"{label}: no {name} documents ({len(data)} documents, split {split!r})"
                            + ("; give the valid split a larger share (data.split) or turn evaluation off "
                               "(train.eval_interval=0)" if split_index else ""))
        if tokens < seq_len + 1:
            raise DataError(f"{label}: the {name} split holds {tokens} tokens, fewer than one sample of "
                            f"seq_len+1 = {seq_len + 1}; use a shorter data.seq_len or a larger file")
        desc = {"kind": "gpt", "prefix": str(data.prefix), "idx_digest": _digest(index_file(data.prefix)),
                "documents": [first, last], "num_samples": num_samples, "seq_len": seq_len, "seed": seed}
        self.doc_idx, self.sample_idx, self.shuffle_idx = (cache or IndexCache(None)).load_or_build(
            desc, ("doc_idx", "sample_idx", "shuffle_idx"),
            lambda: build_index_mappings(data.sizes, self.documents, num_samples, seq_len, seed))
        self.key = desc

    def __len__(self) -> int:
        return self.sample_idx.shape[0] - 1

    def gather(self, index: np.ndarray) -> np.ndarray:
        """Samples ``index`` (positions before shuffling) as int32 ``(len(index), seq_len+1)``, in one gather."""
        index = np.asarray(index, dtype=np.int64)
        n = len(index)
        if n == 0:
            return np.empty((0, self.seq_len + 1), dtype=np.int32)
        s = np.asarray(self.shuffle_idx[index], dtype=np.int64)
        first, last = self.sample_idx[s], self.sample_idx[s + 1]
        df, of, dl, ol = first[:, 0], first[:, 1], last[:, 0], last[:, 1]
        # one piece per (sample, document it touches): a tail, whole documents, a head
        pieces = dl - df + 1
        owner = np.repeat(np.arange(n), pieces)
        k = np.arange(len(owner)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        pos = df[owner] + k
        doc = self.doc_idx[pos]
        begin = np.where(k == 0, of[owner], 0)
        end = np.where(pos == dl[owner], ol[owner] + 1, self.data.sizes[doc].astype(np.int64))
        length = end - begin
        src = self.data.pointers[doc] // self.data.dtype.itemsize + begin
        offsets = np.repeat(src - (np.cumsum(length) - length), length) + np.arange(int(length.sum()))
        return np.asarray(self.data.tokens[offsets], dtype=np.int32).reshape(n, self.seq_len + 1)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.gather(np.array([i]))[0]


def _corpus_mapping(entries: Sequence[FileListEntry], counts: Sequence[int], available: Sequence[int], seed: int,
                    blend_in_corpus: bool, shuffle_in_corpus: bool) -> tuple[np.ndarray, np.ndarray]:
    """For every stream position: (file number, sample number within that file)."""
    corpora = sorted({e.corpus for e in entries})
    total = int(sum(counts))
    per_corpus: list[tuple[np.ndarray, np.ndarray]] = []
    sizes = []
    for c in corpora:
        members = np.array([i for i, e in enumerate(entries) if e.corpus == c], dtype=np.int64)
        n = np.array([counts[i] for i in members], dtype=np.int64)
        size = int(np.sum(n))
        if blend_in_corpus:
            di, dsi = build_blending_indices(n / np.sum(n), size)
        else:
            di, dsi = build_concat_indices(n)
        # the greedy blend may ask a file for one sample more than its count; Megatron would fail mid-run
        for f, used in zip(members, np.bincount(di, minlength=len(n)), strict=True):
            if used > available[f]:
                raise DataError(f"{entries[f].where}: blending needs {used} samples of {entries[f].prefix} "
                                f"but only {available[f]} exist")
        order = np.arange(size)
        if shuffle_in_corpus:
            np.random.RandomState(seed=seed).shuffle(order)
        per_corpus.append((members[di[order]], dsi[order]))
        sizes.append(size)
    weights = np.array([float(s) / total for s in sizes], dtype=np.float64)
    weights /= np.sum(weights)
    cdi, cdsi = build_blending_indices(weights, total)
    file_index = np.empty(total, dtype=np.int32)
    file_sample = np.empty(total, dtype=np.int64)
    for ci, (files, samples) in enumerate(per_corpus):
        mask = cdi == ci
        picks = cdsi[mask]
        if len(picks) and picks.max() >= len(files):
            raise DataError(f"corpus {corpora[ci]!r}: blending asked for sample {picks.max()} of {len(files)}")
        file_index[mask] = files[picks]
        file_sample[mask] = samples[picks]
    return file_index, file_sample


class BlendedGPTDataset:
    """The training stream of a data-file-list: a ``TokenSource`` (``samples(start, count)``).

    ``num_samples`` is how many samples the run will draw (Megatron's ``train_iters * global_batch``);
    indices are built for ``sum(ceil(num_samples * w * 1.005))`` of them. Sample ``i`` depends only on
    the files, ``seq_len``, ``num_samples``, ``seed`` and ``split``, so ``samples(consumed, n)`` resumes a
    run from Megatron's ``consumed_train_samples``. With ``vocab_size`` set, a token id outside
    ``[0, vocab_size)`` raises ``DataError`` naming its file.
    """

    def __init__(self, file_list: str | Path, seq_len: int, num_samples: int, *, seed: int = DEFAULT_SEED,
                 vocab_size: int | None = None, split: str = DEFAULT_SPLIT, cache_dir: str | Path | None = None,
                 blend_in_corpus: bool = True, shuffle_in_corpus: bool = True, split_index: int = 0):
        if seq_len < 1:
            raise DataError(f"seq_len={seq_len} must be >= 1")
        if num_samples < 1:
            raise DataError(f"num_samples={num_samples} must be >= 1 (steps x global batch)")
        self.file_list = Path(file_list)
        self.entries = parse_file_list(file_list)
        self.seq_len, self.seed = seq_len, seed
        # vocab_size None: take the recorded tokenizer's (if prepare wrote one), and check nothing
        from aurora_data.tokenizer import check_vocab
        found = [check_vocab(e.prefix, vocab_size, e.where) for e in self.entries]
        self.vocab_size: int | None = vocab_size if vocab_size is not None else max(
            (v for v in found if v is not None), default=None)
        self._check_tokens = vocab_size is not None
        self.cache = IndexCache(cache_dir)
        counts = samples_per_file([e.weight for e in self.entries], num_samples)
        self.datasets = []
        for e, n in zip(self.entries, counts, strict=True):
            self.datasets.append(GPTDataset(IndexedDataset(e.prefix), n, seq_len, seed=seed, split=split,
                                            cache=self.cache, where=e.where, split_index=split_index))
        desc = {"kind": "blend", "files": [d.key for d in self.datasets], "weights": [e.weight for e in self.entries],
                "corpora": [e.corpus for e in self.entries], "counts": counts, "seed": seed,
                "blend_in_corpus": blend_in_corpus, "shuffle_in_corpus": shuffle_in_corpus}
        available = [len(d) for d in self.datasets]
        self.file_index, self.file_sample = self.cache.load_or_build(
            desc, ("file_index", "file_sample"),
            lambda: _corpus_mapping(self.entries, counts, available, seed, blend_in_corpus, shuffle_in_corpus))
        self.num_samples = len(self.file_index)

    def __len__(self) -> int:
        return self.num_samples

    def samples(self, start: int, count: int) -> np.ndarray:
        """Stream samples ``start .. start+count-1``: int32 ``(count, seq_len+1)``."""
        if start < 0 or count < 0 or start + count > self.num_samples:
            raise IndexError(f"samples [{start}, {start + count}) outside the {self.num_samples} built for this "
                             "run; build the source with a larger num_samples (steps x global batch)")
        files = np.asarray(self.file_index[start:start + count])
        picks = np.asarray(self.file_sample[start:start + count])
        out = np.empty((count, self.seq_len + 1), dtype=np.int32)
        for f in np.unique(files):
            rows = files == f
            block = self.datasets[f].gather(picks[rows])
            if self._check_tokens and block.size and (block.min() < 0 or block.max() >= self.vocab_size):
                bad = int(block.max()) if block.max() >= self.vocab_size else int(block.min())
                raise DataError(f"{self.entries[f].where}: {self.entries[f].prefix}.bin holds token id {bad}, "
                                f"outside the model's vocabulary [0, {self.vocab_size}); set model.vocab_size >= "
                                "the tokenizer's vocabulary or re-tokenize the data")
            out[rows] = block
        return out
