"""The embedded default corpus: the running interpreter's Python standard library sources.

Every machine with Python has it and no network is needed. The corpus is the ``.py`` files under
``sysconfig.get_paths()["stdlib"]`` (code, comments and docstrings: English prose mixed with code),
excluding third-party (``site-packages``) and test-suite directories. A size cap (``max_mb``, default
8 MB of the ~12 MB available on CPython 3.11) selects files deterministically: files are visited in the
order of a SHA-1 of their relative path, which spreads the selection over the whole library rather than
its alphabetically first packages, and taken while they fit under the cap; the chosen files are then
fed to ``prepare`` sorted by path, one document per file.

``ensure_default_dataset`` prepares it once per (Python version, vocabulary size, cap) under a cache
directory, training a byte-level BPE tokenizer of the requested size on the selection itself, and
returns the data-file-list; later calls reuse it. The same interpreter always yields the same tokens.
Preparing the default 8 MB takes ~12 s on 2 cores. ``$AURORA_DATA_CORPUS_MB`` overrides the cap where
the caller does not pass one (``build_source`` does not), e.g. 0.5 for quick tests.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from aurora_data.errors import DataError
from aurora_data.prepare import prepare

DEFAULT_MAX_MB = 8.0
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
CACHE_ENV = "AURORA_DATA_CACHE"
CAP_ENV = "AURORA_DATA_CORPUS_MB"
NAME = "stdlib"


def default_cache_dir() -> Path:
    """``$AURORA_DATA_CACHE``, else ``~/.cache/aurora_data``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "aurora_data").expanduser()


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_cap_mb() -> float:
    """``$AURORA_DATA_CORPUS_MB`` if set, else ``DEFAULT_MAX_MB``."""
    raw = os.environ.get(CAP_ENV)
    try:
        return float(raw) if raw else DEFAULT_MAX_MB
    except ValueError:
        raise DataError(f"${CAP_ENV}={raw!r} is not a number of MB") from None


def select_stdlib_files(max_mb: float | None = None, root: Path | None = None) -> list[Path]:
    """The corpus files: at most ``max_mb`` MB (1e6 bytes), deterministic, sorted by path."""
    max_mb = corpus_cap_mb() if max_mb is None else max_mb
    root = root or stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]  # prune: site-packages can be huge
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    files = [p for p in files if p.is_file()]
    rel = {p: p.relative_to(root).as_posix() for p in files}
    order = sorted(files, key=lambda p: hashlib.sha1(rel[p].encode()).hexdigest())
    budget, chosen = int(max_mb * 1e6), []
    for p in order:
        size = p.stat().st_size
        if 0 < size <= budget:
            chosen.append(p)
            budget -= size
    return sorted(chosen, key=lambda p: rel[p])


def ensure_default_dataset(cache_dir: str | Path | None = None, vocab_size: int = 32000, *,
                           max_mb: float | None = None, progress: bool = False) -> Path:
    """Path of the default corpus' data-file-list, preparing it on first use.

    ``cache_dir`` defaults to ``default_cache_dir()``; ``max_mb`` to ``corpus_cap_mb()`` (8 MB).
    """
    max_mb = corpus_cap_mb() if max_mb is None else max_mb
    if max_mb <= 0:
        raise DataError(f"default corpus cap {max_mb} MB must be positive")
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    impl = sys.implementation
    version = f"{impl.name}{'.'.join(map(str, sys.version_info[:3]))}"
    target = cache_dir / f"{NAME}-{version}-v{vocab_size}-{max_mb:g}mb"
    file_list = target / f"{NAME}_file_list.txt"
    if file_list.is_file():
        return file_list
    cache_dir.mkdir(parents=True, exist_ok=True)
    stage = cache_dir / f".{target.name}.tmp{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        # the standard library holds a few files with latin-1 bytes; replace rather than refuse them
        prepare(select_stdlib_files(max_mb), stage, name=NAME, tokenizer="bpe", vocab_size=vocab_size,
                corpus=NAME, encoding_errors="replace", progress=progress)
        if target.exists() and not file_list.is_file():
            shutil.rmtree(target)  # debris of an interrupted run outside this staging scheme
        try:
            os.rename(stage, target)
        except OSError:
            if not file_list.is_file():  # not a concurrent process finishing first: a real failure
                raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return file_list
