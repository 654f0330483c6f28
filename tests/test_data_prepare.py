"""``prepare`` and the tokenizers: output read by an independent reader, EOD per document, clean failures."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from test_data_indexed import read_megatron

from aurora_data import DataError, parse_file_list
from aurora_data.prepare import main, prepare
from aurora_data.tokenizer import META_NAME, ByteTokenizer, load_tokenizer, train_bpe

TEXTS = ["Hello, world.\n", "Ünïcode ✓ text\n\twith a tab", "def f(x):\n    return x + 1\n"]


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text(TEXTS[0], encoding="utf-8")
    with (src / "b.jsonl").open("w", encoding="utf-8") as f:
        f.write(json.dumps({"text": TEXTS[1], "id": 1}) + "\n\n")  # a blank line is skipped
        f.write(json.dumps({"text": TEXTS[2]}) + "\n")
    return src


def test_byte_prepare_read_independently(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = prepare([inputs / "a.txt", str(inputs / "*.jsonl")], out, name="demo", tokenizer="byte", progress=False)
    assert (res.documents, res.file_list) == (3, out / "demo_file_list.txt")
    code, docs, doc_idx = read_megatron(out / "demo_text_document")
    assert code == 8 and doc_idx.tolist() == [0, 1, 2, 3]  # uint16, one sequence per document
    for doc, text in zip(docs, TEXTS, strict=True):
        assert doc[-1] == 256 and (doc[:-1] < 256).all()  # one EOD after each document
        assert bytes(doc[:-1].astype(np.uint8)).decode("utf-8") == text
    assert res.tokens == sum(len(d) for d in docs) and res.text_bytes == sum(len(t.encode()) for t in TEXTS)
    (entry,) = parse_file_list(res.file_list)
    assert entry.prefix == (out / "demo_text_document").resolve() and entry.corpus == "demo"
    meta = json.loads((out / "demo_tokenizer" / META_NAME).read_text())
    assert meta == {"kind": "byte", "file": None, "vocab_size": 258, "eod_id": 256, "bos_id": 257}
    assert sorted(p.name for p in out.iterdir()) == [
        "demo_file_list.txt", "demo_text_document.bin", "demo_text_document.idx", "demo_tokenizer"]


def test_trained_bpe_is_saved_and_reloads(inputs: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat; the dog sat on the log. " * 200 + "".join(TEXTS))
    res = prepare([corpus], tmp_path / "out", name="c", vocab_size=300, progress=False)
    tok = load_tokenizer(res.tokenizer_dir)
    assert tok.kind == "huggingface" and tok.vocab_size <= 300
    assert tok.eod_id == tok.tok.token_to_id("<|endoftext|>")
    _, (doc,), _ = read_megatron(res.prefix)
    assert doc[-1] == tok.eod_id and doc.max() < tok.vocab_size
    assert doc[:-1].tolist() == tok.encode(corpus.read_text())  # the saved tokenizer reproduces the data
    assert tok.decode(doc[:-1]) == corpus.read_text()  # byte-level BPE with room for 256 bytes: lossless
    assert len(doc) < 0.5 * len(corpus.read_bytes())  # merges were learned
    # the saved tokenizer.json is itself a valid --tokenizer input, EOD found by name
    again = prepare([corpus], tmp_path / "out2", tokenizer=res.tokenizer_dir / "tokenizer.json", progress=False)
    np.testing.assert_array_equal(read_megatron(again.prefix)[1][0], doc)


def test_small_bpe_fits_a_tiny_vocab() -> None:
    tok = train_bpe(["abcabc abcd " * 50 + "".join(TEXTS)], 64)
    assert tok.vocab_size <= 64 and max(tok.encode("abcabc abcd")) < 64


def test_sentencepiece_model(tmp_path: Path) -> None:
    import sentencepiece as spm

    lines = [f"the quick brown fox jumps over the lazy dog {i}" for i in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=60, minloglevel=2)
    model = tmp_path / "sp.model"
    model.write_bytes(buf.getvalue())
    text = tmp_path / "t.txt"
    text.write_text("the lazy fox\n")
    res = prepare([text], tmp_path / "out", tokenizer=model, progress=False)
    _, (doc,), _ = read_megatron(res.prefix)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert doc[-1] == sp.eos_id() == 2 and doc[:-1].tolist() == sp.encode("the lazy fox\n")
    tok = load_tokenizer(res.tokenizer_dir)
    assert tok.kind == "sentencepiece" and tok.eod_id == 2 and tok.decode(doc[:-1]) == "the lazy fox"


def test_cli_prints_summary(inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main([str(inputs / "*"), "--out", str(tmp_path / "o"), "--tokenizer", "byte", "--name", "x",
               "--corpus", "books", "--weight", "0.5", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "3 documents" in out and "MB/s" in out and "x_file_list.txt" in out
    (entry,) = parse_file_list(tmp_path / "o" / "x_file_list.txt")
    assert (entry.weight, entry.corpus) == (0.5, "books")


def test_bad_jsonl_fails_cleanly(inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = inputs / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    out = tmp_path / "new"
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not a JSON object"):
        prepare([inputs / "a.txt", bad], out, tokenizer="byte", progress=False)
    assert not out.exists()  # created by prepare, removed again
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    assert main([str(bad), "--out", str(existing), "--quiet"]) == 2  # fails during BPE training this time
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]  # nothing half-written


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "*.nothing", r"\*\.nothing: the pattern matches no files"),
        (lambda d: d / "absent.txt", r"absent\.txt: input file not found"),
        (lambda d: d, r"is a directory"),
    ],
)
def test_bad_inputs(inputs: Path, tmp_path: Path, make: Callable[[Path], Path], message: str) -> None:
    with pytest.raises(DataError, match=message):
        prepare([make(inputs)], tmp_path / "o", tokenizer="byte", progress=False)
    assert not (tmp_path / "o").exists()


def test_wrong_field_and_empty_corpus(tmp_path: Path) -> None:
    j = tmp_path / "x.jsonl"
    j.write_text('{"content": "a"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:1: expected an object with a string 'text' field"):
        prepare([j], tmp_path / "o", tokenizer="byte", progress=False)
    assert prepare([j], tmp_path / "o", tokenizer="byte", json_key="content", progress=False).documents == 1
    e = tmp_path / "e.jsonl"
    e.write_text('{"text": "  "}\n\n')
    with pytest.raises(DataError, match="no non-empty documents"):
        prepare([e], tmp_path / "o2", tokenizer=ByteTokenizer(), progress=False)
    assert not (tmp_path / "o2").exists()


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.model: tokenizer not found"):
        load_tokenizer(tmp_path / "nope.model")
    (tmp_path / "g.model").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"g\.model: not a readable SentencePiece model"):
        load_tokenizer(tmp_path / "g.model")
    tok = train_bpe(["abc abc"], 40)
    tok.tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match=r"tokenizer\.json: has no token '<eot>'"):
        load_tokenizer(tmp_path / "tokenizer.json", eod_token="<eot>")
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(DataError, match=r"junk\.json: not a readable Hugging Face tokenizer"):
        load_tokenizer(tmp_path / "junk.json")


def test_prepare_refuses_to_overwrite_a_dataset(tmp_path: Path, capsys) -> None:
    from aurora_data.prepare import main

    text = tmp_path / "a.txt"
    text.write_text("the quick brown fox\n")
    out = tmp_path / "out"
    assert main([str(text), "--out", str(out), "--name", "d", "--tokenizer", "byte", "--quiet"]) == 0
    before = (out / "d_text_document.bin").read_bytes()
    text.write_text("something else entirely\n")
    assert main([str(text), "--out", str(out), "--name", "d", "--tokenizer", "byte", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "d_text_document.bin already exists" in err and "--overwrite" in err and "Traceback" not in err
    assert (out / "d_text_document.bin").read_bytes() == before
    assert main([str(text), "--out", str(out), "--name", "d", "--tokenizer", "byte", "--quiet", "--overwrite"]) == 0
    assert (out / "d_text_document.bin").read_bytes() != before


def test_prepare_refuses_a_vocabulary_too_small_for_the_text(tmp_path: Path, capsys) -> None:
    from aurora_data.prepare import main

    text = tmp_path / "a.txt"
    text.write_text("".join(chr(c) for c in range(33, 127)) * 20 + "\n")  # 95 distinct bytes with the newline
    out = tmp_path / "out"
    assert main([str(text), "--out", str(out), "--name", "d", "--vocab-size", "64", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--vocab-size 64 is too small" in err and "95 distinct byte values" in err and "--vocab-size 96" in err
    assert not out.exists()  # nothing left behind
    assert main([str(text), "--out", str(out), "--name", "d", "--vocab-size", "96", "--quiet"]) == 0
