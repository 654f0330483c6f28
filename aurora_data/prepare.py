"""Tokenize text or JSONL into a Megatron indexed dataset plus a data-file-list.

    python -m aurora_data.prepare 'books/*.jsonl' notes.txt --out data/books --name books --vocab-size 32000

Inputs are files or globs: ``.jsonl``/``.json`` files hold one JSON object per line whose ``text`` field
(``--json-key``) is a document; any other file is one document. Each document is followed by one EOD
token, as Megatron's ``preprocess_data.py --append-eod``. Writes into ``--out``:

    <name>_text_document.bin / .idx   the tokens (uint16 below 65500 tokens, else int32)
    <name>_tokenizer/                  the tokenizer used, with its EOD id (reload with load_tokenizer)
    <name>_file_list.txt               "1 <name>_text_document <corpus>", usable as data.file_list

``--tokenizer`` is ``bpe`` (train a byte-level BPE of ``--vocab-size`` on the inputs; the default),
``byte``, a SentencePiece ``.model``, a ``tokenizer.json`` or a saved tokenizer directory. Everything is
staged in a temporary directory and moved into place at the end: a failed run leaves nothing behind.
A dataset of the same name already in ``--out`` is refused unless ``--overwrite``; so is a BPE
``--vocab-size`` smaller than the distinct byte values of the text + 1 (the tokenizer would drop bytes).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from aurora_data.errors import DataError
from aurora_data.filelist import write_file_list
from aurora_data.indexed import IndexedDatasetBuilder, best_fitting_dtype
from aurora_data.tokenizer import Tokenizer, load_tokenizer, tokenizer_dir, train_bpe

JSON_SUFFIXES = (".jsonl", ".json")
_BATCH_BYTES = 2 << 20  # text per encode_batch call: large enough for the Rust tokenizer to use every core


@dataclass
class PrepareResult:
    file_list: Path
    prefix: Path
    tokenizer_dir: Path
    documents: int
    tokens: int
    text_bytes: int
    seconds: float  # tokenize + write
    train_seconds: float  # BPE training (0 when a tokenizer was given)

    @property
    def mb_per_s(self) -> float:
        """Text throughput of tokenize + write, MB (1e6 bytes) per second."""
        return self.text_bytes / 1e6 / max(self.seconds, 1e-9)

    def summary(self) -> str:
        train = f"; BPE training {self.train_seconds:.1f} s" if self.train_seconds else ""
        return (f"{self.documents:,} documents, {self.tokens:,} tokens from {self.text_bytes / 1e6:.2f} MB of text "
                f"in {self.seconds:.1f} s ({self.mb_per_s:.2f} MB/s{train}) -> {self.file_list}")


def resolve_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files and globs -> files, in the order given (each glob sorted); duplicates dropped."""
    out: list[Path] = []
    for item in inputs:
        s = str(item)
        if any(ch in s for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(s), recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise DataError(f"{s}: the pattern matches no files")
            out.extend(matches)
        else:
            p = Path(s).expanduser()
            if p.is_dir():
                raise DataError(f"{p}: is a directory; give files or a glob such as '{p}/**/*.jsonl'")
            if not p.is_file():
                raise DataError(f"{p}: input file not found")
            out.append(p)
    if not out:
        raise DataError("no input files given")
    return list(dict.fromkeys(out))


def iter_documents(paths: Sequence[Path], json_key: str = "text",
                   encoding_errors: str = "strict") -> Iterator[tuple[str, int]]:
    """``(text, input bytes consumed)`` per non-empty document."""
    for path in paths:
        if path.suffix in JSON_SUFFIXES:
            with path.open("rb") as f:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        yield "", len(line)
                        continue
                    try:
                        obj = json.loads(line)
                    except ValueError as e:
                        raise DataError(f"{path}:{lineno}: not a JSON object ({e})") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get(json_key), str):
                        raise DataError(f"{path}:{lineno}: expected an object with a string {json_key!r} field")
                    yield obj[json_key], len(line)
        else:
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8", errors=encoding_errors)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
            yield text, len(raw)


def _batches(docs: Iterator[tuple[str, int]], limit: int) -> Iterator[tuple[list[str], int]]:
    texts: list[str] = []
    size = used = 0
    for text, consumed in docs:
        used += consumed
        if text.strip():
            texts.append(text)
            size += len(text)
        if size >= limit:
            yield texts, used
            texts, size, used = [], 0, 0
    if texts or used:
        yield texts, used


def prepare(inputs: Sequence[str | Path], out_dir: str | Path, *, name: str = "corpus",
            tokenizer: str | Path | Tokenizer = "bpe", vocab_size: int = 32000, eod_token: str | None = None,
            corpus: str | None = None, weight: float = 1.0, json_key: str = "text",
            encoding_errors: str = "strict", progress: bool = True, overwrite: bool = False) -> PrepareResult:
    """Tokenize ``inputs`` into ``out_dir``; see the module docstring. Raises ``DataError`` on bad input,
    on a dataset of this name already in ``out_dir`` (unless ``overwrite``) and on a BPE ``vocab_size`` too
    small to hold every byte the text uses (such a tokenizer would drop them)."""
    if not name or any(c in name for c in "/\\ \t"):
        raise DataError(f"dataset name {name!r} must be non-empty, without slashes or spaces")
    if not weight > 0:
        raise DataError(f"weight {weight} must be positive")
    paths = resolve_inputs(inputs)
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir}: exists and is not a directory")
    target = out_dir / f"{name}_text_document"
    existing = [p for p in (Path(f"{target}.bin"), Path(f"{target}.idx"), out_dir / f"{name}_file_list.txt",
                            tokenizer_dir(target)) if p.exists()]
    if existing and not overwrite:
        raise DataError(f"{existing[0]} already exists (a dataset named {name!r} in {out_dir}); pass --overwrite "
                        "to replace it, or choose another --name or --out")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = out_dir / f".prepare-{name}-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    total_bytes = sum(p.stat().st_size for p in paths)
    try:
        train_seconds = 0.0
        if isinstance(tokenizer, Tokenizer):
            tok = tokenizer
        elif str(tokenizer) == "bpe":
            t0 = time.perf_counter()
            seen = np.zeros(256, dtype=bool)  # the byte values the text uses: each needs a token of its own
            with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="training BPE", disable=not progress) as bar:
                def texts() -> Iterator[str]:
                    for text, consumed in iter_documents(paths, json_key, encoding_errors):
                        bar.update(consumed)
                        if text.strip():
                            seen[np.frombuffer(text.encode("utf-8", "replace"), np.uint8)] = True
                            yield text
                tok = train_bpe(texts(), vocab_size)
            if int(seen.sum()) + 1 > vocab_size:  # + EOD; below that the BPE alphabet drops the rarest bytes
                raise DataError(f"--vocab-size {vocab_size} is too small to encode the text: it uses "
                                f"{int(seen.sum())} distinct byte values, which with the end-of-document token need "
                                f"{int(seen.sum()) + 1} tokens; use --vocab-size {int(seen.sum()) + 1} or more "
                                "(>= 273 holds every byte), or --tokenizer byte")
            train_seconds = time.perf_counter() - t0
        else:
            tok = load_tokenizer(tokenizer, eod_token=eod_token)

        t0 = time.perf_counter()
        prefix = stage / f"{name}_text_document"
        documents = tokens = text_bytes = 0
        dtype = best_fitting_dtype(tok.vocab_size)
        eod = np.array([tok.eod_id], dtype=dtype)
        with IndexedDatasetBuilder(prefix, dtype) as builder, \
                tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
            for texts_, consumed in _batches(iter_documents(paths, json_key, encoding_errors), _BATCH_BYTES):
                for text, ids in zip(texts_, tok.encode_batch(texts_), strict=True):
                    builder.add_document(np.concatenate((np.asarray(ids, dtype=dtype), eod)))
                    tokens += len(ids) + 1
                    text_bytes += len(text.encode("utf-8"))
                documents += len(texts_)
                bar.update(consumed)
            if documents == 0:
                raise DataError(f"no non-empty documents in {', '.join(map(str, paths[:3]))}"
                                + (" ..." if len(paths) > 3 else ""))
        tok.save(tokenizer_dir(prefix))
        write_file_list(stage / f"{name}_file_list.txt", [(weight, prefix.name, corpus or name)])
        seconds = time.perf_counter() - t0
        # move into place; the file list last, so a list that exists always points at complete data
        final_prefix = out_dir / prefix.name
        tok_dir = tokenizer_dir(final_prefix)
        if tok_dir.exists():
            shutil.rmtree(tok_dir)
        os.replace(tokenizer_dir(prefix), tok_dir)
        for ext in (".bin", ".idx"):
            os.replace(f"{prefix}{ext}", f"{final_prefix}{ext}")
        file_list = out_dir / f"{name}_file_list.txt"
        os.replace(stage / file_list.name, file_list)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    shutil.rmtree(stage, ignore_errors=True)
    return PrepareResult(file_list, final_prefix, tok_dir, documents, tokens, text_bytes, seconds, train_seconds)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aurora_data.prepare", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="text or JSONL files, or globs ('data/**/*.jsonl')")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--name", default="corpus", help="dataset name: <out>/<name>_text_document.{bin,idx}")
    ap.add_argument("--tokenizer", default="bpe", help="bpe (train; default), byte, a .model, a tokenizer.json "
                                                       "or a saved tokenizer directory")
    ap.add_argument("--vocab-size", type=int, default=32000, help="BPE vocabulary size when training (32000)")
    ap.add_argument("--eod-token", default=None, help="end-of-document token of a given tokenizer")
    ap.add_argument("--corpus", default=None, help="corpus name written in the file list (default: --name)")
    ap.add_argument("--weight", type=float, default=1.0, help="weight written in the file list (1)")
    ap.add_argument("--json-key", default="text", help="JSONL field holding the document (text)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--overwrite", action="store_true", help="replace a dataset of the same --name in --out")
    args = ap.parse_args(argv)
    try:
        result = prepare(args.inputs, args.out, name=args.name, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                         eod_token=args.eod_token, corpus=args.corpus, weight=args.weight, json_key=args.json_key,
                         progress=not args.quiet, overwrite=args.overwrite)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
