"""Megatron MMapIndexedDataset byte format: round trips, an independent reader, and every corrupt-file error."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from aurora_data import DataError, IndexedDataset, IndexedDatasetBuilder
from aurora_data.indexed import DTYPES

CODES = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 6: "<f8", 7: "<f4", 8: "<u2"}


def read_megatron(prefix: Path) -> tuple[int, list[np.ndarray], np.ndarray]:
    """Independent reader written from the format description only (struct + numpy)."""
    raw = Path(f"{prefix}.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", raw, 9)
    assert version == 1
    (code,) = struct.unpack_from("<B", raw, 17)
    n, d = struct.unpack_from("<QQ", raw, 18)
    sizes = np.frombuffer(raw, "<i4", n, 34)
    pointers = np.frombuffer(raw, "<i8", n, 34 + 4 * n)
    doc_idx = np.frombuffer(raw, "<i8", d, 34 + 12 * n)
    assert len(raw) == 34 + 12 * n + 8 * d
    data = Path(f"{prefix}.bin").read_bytes()
    dt = np.dtype(CODES[code])
    assert len(data) == int(sizes.sum()) * dt.itemsize
    return code, [np.frombuffer(data, dt, int(s), int(p)) for s, p in zip(sizes, pointers, strict=True)], doc_idx


def sample_docs(code: int, rng: np.random.Generator) -> list[np.ndarray]:
    dt = np.dtype(CODES[code])
    docs = []
    for n in (5, 0, 1, 17):  # an empty document included
        if dt.kind == "f":
            docs.append(rng.standard_normal(n).astype(dt))
        else:
            info = np.iinfo(dt)
            docs.append(rng.integers(info.min, info.max, n, endpoint=True, dtype=dt))
    return docs


@pytest.mark.parametrize("code", sorted(DTYPES))
def test_round_trip_every_dtype(tmp_path: Path, code: int) -> None:
    docs = sample_docs(code, np.random.default_rng(code))
    with IndexedDatasetBuilder(tmp_path / "ds", DTYPES[code]) as b:
        for d in docs:
            b.add_document(d)
    ds = IndexedDataset(tmp_path / "ds")
    assert ds.dtype == np.dtype(CODES[code]) and len(ds) == len(docs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    np.testing.assert_array_equal(ds.get(3, offset=2, length=5), docs[3][2:7])
    # the independent reader sees the same bytes
    got_code, got, doc_idx = read_megatron(tmp_path / "ds")
    assert got_code == code
    for a, b_ in zip(got, docs, strict=True):
        np.testing.assert_array_equal(a, b_)
    np.testing.assert_array_equal(doc_idx, np.arange(len(docs) + 1))


def test_reads_are_zero_copy_views(tmp_path: Path) -> None:
    with IndexedDatasetBuilder(tmp_path / "ds", np.int32) as b:
        b.add_document(np.arange(10))
        b.add_document(np.arange(10, 30))
    ds = IndexedDataset(tmp_path / "ds")
    view = ds.get(1, offset=3, length=4)
    assert not view.flags.owndata and np.shares_memory(view, ds.tokens)
    assert view.tolist() == [13, 14, 15, 16]
    assert isinstance(ds.tokens, np.memmap) and ds.num_tokens == 30


def test_multi_sequence_documents_keep_doc_idx(tmp_path: Path) -> None:
    with IndexedDatasetBuilder(tmp_path / "ds", np.uint16) as b:
        b.add_item([1, 2])
        b.add_item([3])
        b.end_document()
        b.add_document([4, 5, 6])
    ds = IndexedDataset(tmp_path / "ds")
    assert ds.doc_idx.tolist() == [0, 2, 3] and ds.sizes.tolist() == [2, 1, 3]


def test_builder_failure_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), IndexedDatasetBuilder(tmp_path / "ds", np.uint16) as b:
        b.add_document([1, 2, 3])
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_builder_rejects_ids_that_do_not_fit(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"ds\.bin.*70000.*uint16"), IndexedDatasetBuilder(tmp_path / "ds") as b:
        b.add_document([1, 70000])
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- corrupt files
@pytest.fixture
def good(tmp_path: Path) -> Path:
    with IndexedDatasetBuilder(tmp_path / "good", np.uint16) as b:
        b.add_document([1, 2, 3])
        b.add_document([4, 5])
    return tmp_path / "good"


def patch(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_truncated_bin(good: Path) -> None:
    b = Path(f"{good}.bin")
    b.write_bytes(b.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"good\.bin: truncated data file.*needs 10 bytes.*has 8"):
        IndexedDataset(good)


def test_bin_longer_than_index(good: Path) -> None:
    """As upstream preprocess_data.py --append-eod writes it (EOD tokens in .bin, not in .idx): read, the
    trailing bytes unused, with a one-line warning saying how many."""
    b = Path(f"{good}.bin")
    want = IndexedDataset(good)
    want = [want[i].copy() for i in range(len(want))]
    b.write_bytes(b.read_bytes() + b"\x02\x00\x02\x00")
    with pytest.warns(UserWarning, match=r"good\.bin: 4 bytes after the \d+ that good\.idx describes are unused") as w:
        ds = IndexedDataset(good)
    assert len(w) == 1 and "\n" not in str(w[0].message)
    assert len(ds) == len(want) and all(np.array_equal(ds[i], x) for i, x in enumerate(want))


def test_wrong_magic(good: Path) -> None:
    patch(Path(f"{good}.idx"), 0, b"TNTIDX\x00\x00\x00")
    with pytest.raises(DataError, match=r"good\.idx: not a Megatron MMapIndexedDataset index \(magic"):
        IndexedDataset(good)


def test_wrong_version(good: Path) -> None:
    patch(Path(f"{good}.idx"), 9, struct.pack("<Q", 2))
    with pytest.raises(DataError, match=r"good\.idx: index version 2 is not supported"):
        IndexedDataset(good)


def test_unknown_dtype_code(good: Path) -> None:
    patch(Path(f"{good}.idx"), 17, struct.pack("<B", 9))
    with pytest.raises(DataError, match=r"good\.idx: unknown dtype code 9"):
        IndexedDataset(good)


def test_truncated_idx(good: Path) -> None:
    i = Path(f"{good}.idx")
    i.write_bytes(i.read_bytes()[:-8])
    with pytest.raises(DataError, match=r"good\.idx: index is truncated or corrupt"):
        IndexedDataset(good)
    i.write_bytes(i.read_bytes()[:20])
    with pytest.raises(DataError, match=r"good\.idx: truncated index \(20 bytes"):
        IndexedDataset(good)


def test_missing_bin(good: Path) -> None:
    Path(f"{good}.bin").unlink()
    with pytest.raises(DataError, match=r"good\.bin: file not found"):
        IndexedDataset(good)
