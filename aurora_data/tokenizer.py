"""Tokenizers for ``prepare``: SentencePiece ``.model``, Hugging Face ``tokenizer.json``, byte-level, trained BPE.

Whichever is used is saved next to the dataset, in ``<name>_tokenizer/`` beside ``<name>_text_document.bin``,
as its own file (``tokenizer.model`` / ``tokenizer.json``) plus ``aurora_tokenizer.json`` recording the
kind, vocabulary size, EOD id and BOS id; ``load_tokenizer(that_dir)`` restores it, and the loader reads
the record to refuse data whose vocabulary exceeds the model's.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from aurora_data.errors import DataError

META_NAME = "aurora_tokenizer.json"
EOD_TOKEN = "<|endoftext|>"
# Tried in order when a tokenizer.json does not say which token ends a document.
EOD_CANDIDATES = (EOD_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>")


class Tokenizer(ABC):
    kind: ClassVar[str]
    vocab_size: int
    eod_id: int
    bos_id: int | None = None

    @abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[Sequence[int]]:
        """Token ids of each text, without special tokens."""

    def encode(self, text: str) -> list[int]:
        return list(self.encode_batch([text])[0])

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    @abstractmethod
    def _save_file(self, directory: Path) -> str | None:
        """Write the tokenizer's own file into ``directory``; its name (None when there is none)."""

    def save(self, directory: str | Path) -> Path:
        """Write the tokenizer and its ``aurora_tokenizer.json`` record into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "file": self._save_file(directory), "vocab_size": self.vocab_size,
                "eod_id": self.eod_id, "bos_id": self.bos_id}
        (directory / META_NAME).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        return directory


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, then ``<|endoftext|>`` = 256 (EOD) and ``<|bos|>`` = 257."""

    kind = "byte"

    def __init__(self) -> None:
        self.vocab_size, self.eod_id, self.bos_id = 258, 256, 257

    def encode_batch(self, texts: Sequence[str]) -> list[Sequence[int]]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def _save_file(self, directory: Path) -> str | None:
        return None


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (``tokenizer.json``); EOD is ``eod_token`` or the first of ``EOD_CANDIDATES``."""

    kind = "huggingface"

    def __init__(self, tok: Any, eod_token: str | None = None, source: str = "tokenizer.json"):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eod_id = _special_id(tok.token_to_id, eod_token, EOD_CANDIDATES, source)

    @classmethod
    def from_file(cls, path: str | Path, eod_token: str | None = None) -> HFTokenizer:
        from tokenizers import Tokenizer as _Tok

        try:
            tok = _Tok.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for unreadable files
            raise DataError(f"{path}: not a readable Hugging Face tokenizer.json ({e})") from None
        return cls(tok, eod_token, str(path))

    def encode_batch(self, texts: Sequence[str]) -> list[Sequence[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def _save_file(self, directory: Path) -> str | None:
        self.tok.save(str(directory / "tokenizer.json"))
        return "tokenizer.json"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` (e.g. Llama-2's); EOD is its ``</s>`` (eos) unless ``eod_token`` is given."""

    kind = "sentencepiece"

    def __init__(self, path: str | Path, eod_token: str | None = None):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise DataError(f"{path}: not a readable SentencePiece model ({e})") from None
        self.vocab_size = self.sp.GetPieceSize()

        def piece_id(p: str) -> int | None:
            i = self.sp.PieceToId(p)
            return None if i == self.sp.unk_id() and p != self.sp.IdToPiece(i) else i

        if eod_token is None and self.sp.eos_id() >= 0:
            self.eod_id = self.sp.eos_id()
        else:
            self.eod_id = _special_id(piece_id, eod_token, EOD_CANDIDATES, str(path))
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None

    def encode_batch(self, texts: Sequence[str]) -> list[Sequence[int]]:
        return self.sp.Encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.Decode([int(i) for i in ids])

    def _save_file(self, directory: Path) -> str | None:
        (directory / "tokenizer.model").write_bytes(self.sp.serialized_model_proto())
        return "tokenizer.model"


def _special_id(lookup: Any, wanted: str | None, candidates: Sequence[str], source: str) -> int:
    names = [wanted] if wanted else list(candidates)
    for name in names:
        i = lookup(name)
        if i is not None:
            return int(i)
    if wanted:
        raise DataError(f"{source}: has no token {wanted!r} to use as end-of-document")
    raise DataError(f"{source}: none of {', '.join(candidates)} is in the vocabulary; name the "
                    "end-of-document token with --eod-token")


def train_bpe(texts: Iterable[str], vocab_size: int = 32000, *, length: int | None = None) -> HFTokenizer:
    """Train a byte-level BPE tokenizer (``tokenizers``) with ``vocab_size`` tokens at most, EOD included.

    With room for the 256 byte symbols the tokenizer is lossless on any text; below that (tiny test
    models) its alphabet is the corpus' most frequent byte symbols and unseen bytes are dropped.
    """
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    specials = [EOD_TOKEN]
    if vocab_size < len(specials) + 2:
        raise DataError(f"vocab_size={vocab_size} is too small to train a BPE tokenizer")
    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    full = vocab_size >= 256 + len(specials) + 16
    alphabet: dict[str, Any] = ({"initial_alphabet": pre_tokenizers.ByteLevel.alphabet()} if full
                                else {"limit_alphabet": vocab_size - len(specials)})
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False, **alphabet)
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    if tok.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise DataError(f"BPE training produced {tok.get_vocab_size()} tokens, more than vocab_size={vocab_size}")
    return HFTokenizer(tok, EOD_TOKEN, "trained BPE")


def load_tokenizer(spec: str | Path, *, eod_token: str | None = None) -> Tokenizer:
    """``"byte"``, a saved tokenizer directory, a SentencePiece ``.model`` or a ``tokenizer.json``."""
    if str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        meta_path = path / META_NAME
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            kind = meta.get("kind")
            if kind == "byte":
                return ByteTokenizer()
            inner = path / str(meta.get("file"))
            tok = (SentencePieceTokenizer(inner) if kind == "sentencepiece" else HFTokenizer.from_file(inner)
                   if kind == "huggingface" else None)
            if tok is None:
                raise DataError(f"{meta_path}: unknown tokenizer kind {kind!r}")
            tok.eod_id = int(meta["eod_id"])  # the recorded choice wins over re-detection
            tok.bos_id = meta.get("bos_id")
            return tok
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return load_tokenizer(path / name, eod_token=eod_token)
        raise DataError(f"{path}: no {META_NAME}, tokenizer.json or tokenizer.model in this directory")
    if not path.is_file():
        raise DataError(f"{path}: tokenizer not found (give 'byte', 'bpe', a .model, a tokenizer.json or a directory)")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path, eod_token)
    if path.suffix == ".json":
        return HFTokenizer.from_file(path, eod_token)
    raise DataError(f"{path}: unrecognised tokenizer file (expected a SentencePiece .model or a tokenizer.json)")


def tokenizer_dir(prefix: str | Path) -> Path:
    """Where ``prepare`` saves the tokenizer of dataset ``<dir>/<name>_text_document``: ``<dir>/<name>_tokenizer``."""
    prefix = Path(prefix)
    return prefix.parent / f"{prefix.name.removesuffix('_text_document')}_tokenizer"


def check_vocab(prefix: str | Path, vocab_size: int | None, where: str = "") -> int | None:
    """The recorded tokenizer vocabulary of a dataset (None if none was recorded).

    Raises ``DataError`` when it exceeds ``vocab_size``: the model could not embed every token.
    """
    meta_path = tokenizer_dir(prefix) / META_NAME
    if not meta_path.is_file():
        return None
    try:
        recorded = int(json.loads(meta_path.read_text(encoding="utf-8"))["vocab_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{meta_path}: unreadable tokenizer record ({e})") from None
    if vocab_size is not None and recorded > vocab_size:
        raise DataError(f"{where + ': ' if where else ''}{prefix} was tokenized with a {recorded}-token vocabulary "
                        f"({meta_path}) but model.vocab_size is {vocab_size}; raise model.vocab_size to at least "
                        f"{recorded} or prepare the data with --vocab-size {vocab_size}")
    return recorded
