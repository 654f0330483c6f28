"""The study's data-file-list format (``DATA_FILE_LIST=ALCF/data-lists/aurora/books.txt``).

One dataset per line::

    # weight  path_prefix                         corpus
    0.0042    /flare/.../books/books-0000_text_document  books
    0.0017    relative/dir/other_text_document            arxiv

``weight`` is relative (normalised over the whole list) and may be 0 (the file contributes no samples, as
upstream; a corpus whose weights sum to zero is refused), ``path_prefix`` names ``PREFIX.bin`` and
``PREFIX.idx`` (a trailing ``.bin``/``.idx`` is dropped, as ALCF's ``pretrain_gpt_alcf.py`` does) and
is resolved against the list file's directory when relative. ``corpus`` groups files that ALCF's
Megatron-DeepSpeed blends together before blending corpora; it is optional here (ALCF requires it)
and a line without one forms a corpus of its own. ``#`` starts a comment; blank lines are skipped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from aurora_data.errors import DataError
from aurora_data.indexed import data_file, index_file

_COMMENT = re.compile(r"(^|\s)#.*$")


@dataclass(frozen=True)
class FileListEntry:
    weight: float
    prefix: Path
    corpus: str
    where: str  # "list.txt:LINE", for messages


def parse_file_list(path: str | Path, check_files: bool = True) -> list[FileListEntry]:
    """Parse and validate a data-file-list; every problem is a ``DataError`` naming ``file:line``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: data-file-list not found")
    base = path.resolve().parent
    entries: list[FileListEntry] = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        where = f"{path}:{lineno}"
        fields = _COMMENT.sub("", raw).split()
        if not fields:
            continue
        if len(fields) not in (2, 3):
            raise DataError(f"{where}: expected 'weight path_prefix [corpus]', got {raw.strip()!r}")
        try:
            weight = float(fields[0])
        except ValueError:
            raise DataError(f"{where}: weight {fields[0]!r} is not a number") from None
        if not (math.isfinite(weight) and weight >= 0):
            raise DataError(f"{where}: weight {fields[0]!r} must be a non-negative finite number")
        name = fields[1]
        for ext in (".bin", ".idx"):
            name = name.removesuffix(ext)
        prefix = Path(name).expanduser()
        if not prefix.is_absolute():
            prefix = base / prefix
        if check_files:
            for f in (data_file(prefix), index_file(prefix)):
                if not f.is_file():
                    raise DataError(f"{where}: {f} not found (listed as {fields[1]!r})")
        corpus = fields[2] if len(fields) == 3 else str(prefix)
        entries.append(FileListEntry(weight, prefix, corpus, where))
    if not entries:
        raise DataError(f"{path}: the data-file-list names no datasets")
    totals: dict[str, float] = {}
    for e in entries:
        totals[e.corpus] = totals.get(e.corpus, 0.0) + e.weight
    for corpus, total in totals.items():
        if total == 0:
            lines = ", ".join(e.where.rsplit(":", 1)[1] for e in entries if e.corpus == corpus)
            raise DataError(f"{path}: corpus {corpus!r} (lines {lines}) has weights summing to zero; give one of its "
                            "files a positive weight or remove the corpus from the list")
    return entries


def write_file_list(path: str | Path, entries: Iterable[tuple[float, str | Path, str]]) -> Path:
    """Write ``weight prefix corpus`` lines; prefixes are written as given (relative ones stay relative)."""
    path = Path(path)
    lines = [f"{float(w)!r} {p} {c}" for w, p, c in entries]  # repr: the weight round-trips exactly
    path.write_text("# weight path_prefix corpus\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return path
