"""The data-file-list parser: format, path resolution, and an error naming file:line for each bad line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aurora_data import DataError, IndexedDatasetBuilder, parse_file_list


def make(prefix: Path) -> Path:
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        b.add_document([1, 2, 3])
    return prefix


@pytest.fixture
def data(tmp_path: Path) -> Path:
    make(tmp_path / "data" / "a_text_document")
    make(tmp_path / "data" / "b_text_document")
    return tmp_path / "data"


def test_parses_study_format(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lst = data / "books.txt"
    lst.write_text(
        "# weight prefix corpus\n"
        "\n"
        "0.25 a_text_document books   # trailing comment\n"
        f"3 {data}/b_text_document.bin arxiv\n"
        "1e-1 a_text_document\n"
    )
    monkeypatch.chdir(tmp_path)  # relative prefixes resolve against the list, not the working directory
    entries = parse_file_list(lst)
    assert [e.weight for e in entries] == [0.25, 3.0, 0.1]
    assert entries[0].prefix == data.resolve() / "a_text_document"
    assert entries[1].prefix == data / "b_text_document"  # ".bin" dropped, as ALCF does
    assert [e.corpus for e in entries[:2]] == ["books", "arxiv"]
    assert entries[2].corpus == str(entries[2].prefix)  # no corpus: a corpus of its own
    assert entries[1].where == f"{lst}:4"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("1 missing_text_document books", r"books\.txt:2: .*missing_text_document\.bin not found"),
        ("abc a_text_document books", r"books\.txt:2: weight 'abc' is not a number"),
        ("-1 a_text_document books", r"books\.txt:2: weight '-1' must be a non-negative finite number"),
        ("nan a_text_document books", r"books\.txt:2: weight 'nan' must be a non-negative finite"),
        ("0 a_text_document arxiv", r"books\.txt: corpus 'arxiv' \(lines 2\) has weights summing to zero"),
        ("1 a_text_document books extra", r"books\.txt:2: expected 'weight path_prefix \[corpus\]'"),
        ("a_text_document", r"books\.txt:2: expected 'weight path_prefix \[corpus\]'"),
    ],
)
def test_bad_lines_name_file_and_line(data: Path, line: str, message: str) -> None:
    lst = data / "books.txt"
    lst.write_text(f"1 b_text_document books\n{line}\n")
    with pytest.raises(DataError, match=message):
        parse_file_list(lst)


def test_zero_weight_on_one_file_of_a_corpus(data: Path) -> None:
    """As upstream: a file may have weight 0 (it contributes no samples) while its corpus has a positive sum."""
    lst = data / "l.txt"
    lst.write_text("1 a_text_document books\n0 b_text_document books\n")
    assert [e.weight for e in parse_file_list(lst)] == [1.0, 0.0]
    lst.write_text("1 a_text_document books\n0 b_text_document arxiv\n0.0 a_text_document arxiv\n")
    with pytest.raises(DataError, match=r"l\.txt: corpus 'arxiv' \(lines 2, 3\) has weights summing to zero; "
                                        r"give one of its files a positive weight"):
        parse_file_list(lst)


def test_missing_idx_is_named(data: Path) -> None:
    (data / "a_text_document.idx").unlink()
    lst = data / "l.txt"
    lst.write_text("1 a_text_document c\n")
    with pytest.raises(DataError, match=r"l\.txt:1: .*a_text_document\.idx not found"):
        parse_file_list(lst)


def test_empty_and_absent_lists(tmp_path: Path) -> None:
    lst = tmp_path / "empty.txt"
    lst.write_text("# nothing\n\n")
    with pytest.raises(DataError, match=r"empty\.txt: the data-file-list names no datasets"):
        parse_file_list(lst)
    with pytest.raises(DataError, match=r"nope\.txt: data-file-list not found"):
        parse_file_list(tmp_path / "nope.txt")
