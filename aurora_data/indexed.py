"""Megatron ``MMapIndexedDataset`` (version 1) reader and writer, byte-compatible with Megatron-DeepSpeed.

A dataset is a pair of files sharing a prefix. ``PREFIX.bin`` is every sequence's tokens, concatenated.
``PREFIX.idx`` is, little-endian::

    9 bytes   magic  b"MMIDIDX\\x00\\x00"
    <Q        version (1)
    <B        dtype code: 1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 6 f64, 7 f32, 8 u16
    <Q        sequence count N
    <Q        document count D (length of doc_idx, i.e. documents + 1)
    N x int32 sizes (tokens per sequence)
    N x int64 pointers (byte offset of each sequence in .bin)
    D x int64 doc_idx (sequence index where each document starts, then N)

Megatron's ``preprocess_data.py`` writes one sequence per document, so for GPT data "sequence" and
"document" coincide. Reads are zero-copy views of ``np.memmap``; every size and offset is checked at
open so a truncated or mismatched pair fails with a ``DataError`` naming the file, not mid-training. A ``.bin``
longer than its ``.idx`` describes is read with a warning, as upstream reads it.
"""

from __future__ import annotations

import os
import struct
import warnings
from array import array
from pathlib import Path
from types import TracebackType

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from aurora_data.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, doc_idx length


def dtype_code(dtype: DTypeLike) -> int:
    """The ``.idx`` dtype code of a numpy dtype."""
    dt = np.dtype(dtype)
    for code, d in DTYPES.items():
        if d == dt:
            return code
    raise DataError(f"dtype {dt} has no MMapIndexedDataset code; use one of {sorted(map(str, DTYPES.values()))}")


def best_fitting_dtype(vocab_size: int | None) -> np.dtype:
    """Megatron's choice: uint16 below 65500 tokens, else int32."""
    return np.dtype(np.uint16) if vocab_size is not None and vocab_size < 65500 else np.dtype(np.int32)


def index_file(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def data_file(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def _memmap(path: Path, dtype: np.dtype) -> np.ndarray:
    # np.memmap refuses empty files; an empty dataset is still valid.
    if path.stat().st_size == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class IndexedDataset:
    """Read-only, memory-mapped view of ``PREFIX.bin`` / ``PREFIX.idx``.

    ``ds[i]`` and ``ds.get(i, offset, length)`` return views into the mapped ``.bin`` (no copy).
    ``sizes``, ``pointers`` and ``doc_idx`` are views into the mapped ``.idx``.
    """

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        idx_path, bin_path = index_file(prefix), data_file(prefix)
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise DataError(f"{p}: file not found (an indexed dataset needs both {idx_path.name} and "
                                f"{bin_path.name}; give the prefix without the extension)")
        idx_bytes = idx_path.stat().st_size
        if idx_bytes < _HEADER.size:
            raise DataError(f"{idx_path}: truncated index ({idx_bytes} bytes, the header alone is {_HEADER.size})")
        with idx_path.open("rb") as f:
            magic, version, code, n, d = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise DataError(f"{idx_path}: not a Megatron MMapIndexedDataset index (magic {magic!r}, expected "
                            f"{MAGIC!r}); the legacy 'lazy'/'cached' TNTIDX format is not supported")
        if version != VERSION:
            raise DataError(f"{idx_path}: index version {version} is not supported (only version {VERSION})")
        if code not in DTYPES:
            raise DataError(f"{idx_path}: unknown dtype code {code} (known: "
                            + ", ".join(f"{k}={v}" for k, v in DTYPES.items()) + ")")
        self.dtype = DTYPES[code]
        expected = _HEADER.size + 12 * n + 8 * d
        if idx_bytes != expected:
            raise DataError(f"{idx_path}: index is truncated or corrupt: its header promises {n} sequences and "
                            f"{d} doc_idx entries ({expected} bytes) but the file has {idx_bytes} bytes")
        raw = _memmap(idx_path, np.dtype(np.uint8))
        off = _HEADER.size
        self.sizes = np.frombuffer(raw, dtype=np.int32, count=n, offset=off)
        self.pointers = np.frombuffer(raw, dtype=np.int64, count=n, offset=off + 4 * n)
        self.doc_idx = np.frombuffer(raw, dtype=np.int64, count=d, offset=off + 12 * n)
        self._check(idx_path, bin_path)
        self.tokens = _memmap(bin_path, self.dtype)

    def _check(self, idx_path: Path, bin_path: Path) -> None:
        item = self.dtype.itemsize
        bin_bytes = bin_path.stat().st_size
        n = len(self.sizes)
        if n and (self.sizes.min() < 0 or self.pointers.min() < 0 or (self.pointers % item).any()):
            raise DataError(f"{idx_path}: corrupt index (negative size, negative or misaligned pointer)")
        need = int((self.pointers + self.sizes.astype(np.int64) * item).max()) if n else 0
        if bin_bytes < need:
            raise DataError(f"{bin_path}: truncated data file: {idx_path.name} needs {need} bytes, "
                            f"{bin_path.name} has {bin_bytes}")
        if bin_bytes > need:
            # Megatron's tools/preprocess_data.py --append-eod writes each EOD token into .bin without counting it
            # in .idx; megatron-core and Megatron-DeepSpeed read such files and never touch the trailing bytes.
            warnings.warn(f"{bin_path}: {bin_bytes - need} bytes after the {need} that {idx_path.name} describes "
                          "are unused", stacklevel=3)
        di = self.doc_idx
        if len(di) and (di[0] != 0 or di[-1] != n or (np.diff(di) < 0).any()):
            raise DataError(f"{idx_path}: corrupt doc_idx (must rise from 0 to the sequence count {n})")

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset .. offset+length`` of sequence ``i`` (to its end when ``length`` is None): a view."""
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if not 0 <= offset <= offset + length <= size:
            raise IndexError(f"{self.prefix}: tokens [{offset}, {offset + length}) outside sequence {i} of {size}")
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        return self.tokens[start:start + length]

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))


class IndexedDatasetBuilder:
    """Appends documents to ``PREFIX.bin`` and writes ``PREFIX.idx`` on ``finalize``.

    Both files are written under temporary names and renamed into place at the end, so a reader
    never sees a half-written pair; ``abort`` (or leaving a ``with`` block by an exception) removes
    the temporaries.
    """

    def __init__(self, prefix: str | Path, dtype: DTypeLike = np.uint16):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        tag = f".tmp{os.getpid()}"
        self._bin, self._idx = data_file(prefix), index_file(prefix)
        self._tmp_bin = self._bin.with_name(self._bin.name + tag)
        self._tmp_idx = self._idx.with_name(self._idx.name + tag)
        self._file = self._tmp_bin.open("wb")
        self._sizes = array("q")
        self._doc_idx = array("q", [0])
        self._done = False

    def add_item(self, tokens: ArrayLike) -> None:
        """Append one sequence (no document boundary)."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise DataError(f"{self._bin}: a sequence must be 1-D, got shape {arr.shape}")
        if arr.size and self.dtype.kind in "iu" and arr.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                raise DataError(f"{self._bin}: token ids [{lo}, {hi}] do not fit {self.dtype}; "
                                "use a wider dtype (int32 for vocabularies of 65500 or more)")
        if arr.size >= 2**31:
            raise DataError(f"{self._bin}: a sequence of {arr.size} tokens exceeds the int32 size field")
        self._file.write(np.ascontiguousarray(arr, dtype=self.dtype).tobytes())
        self._sizes.append(arr.size)

    def end_document(self) -> None:
        self._doc_idx.append(len(self._sizes))

    def add_document(self, tokens: ArrayLike) -> None:
        """Append one document made of one sequence (what Megatron's preprocess_data.py writes)."""
        self.add_item(tokens)
        self.end_document()

    @property
    def num_sequences(self) -> int:
        return len(self._sizes)

    def finalize(self) -> Path:
        """Write the index, rename both files into place; returns the prefix."""
        if self._done:
            raise RuntimeError(f"{self.prefix}: builder already finalized or aborted")
        self._file.close()
        sizes = np.frombuffer(self._sizes, dtype=np.int64) if len(self._sizes) else np.zeros(0, np.int64)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        np.cumsum(sizes[:-1] * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.frombuffer(self._doc_idx, dtype=np.int64)
        try:
            with self._tmp_idx.open("wb") as f:
                f.write(_HEADER.pack(MAGIC, VERSION, self._code, len(sizes), len(doc_idx)))
                f.write(sizes.astype(np.int32).tobytes())
                f.write(pointers.tobytes())
                f.write(doc_idx.tobytes())
            # .bin first: a reader that finds the .idx always finds the matching .bin.
            os.replace(self._tmp_bin, self._bin)
            os.replace(self._tmp_idx, self._idx)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.prefix

    def abort(self) -> None:
        """Drop everything written so far."""
        self._file.close()
        for p in (self._tmp_bin, self._tmp_idx):
            p.unlink(missing_ok=True)
        self._done = True

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finalize()
