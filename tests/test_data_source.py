"""``build_source`` for both sources, and the embedded standard-library corpus."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from aurora_data import BlendedGPTDataset, DataError, SyntheticSource, build_source, global_batch
from aurora_data import corpus as corpus_mod
from aurora_data.corpus import ensure_default_dataset, select_stdlib_files
from aurora_data.prepare import prepare
from aurora_data.tokenizer import load_tokenizer, tokenizer_dir
from configs import Config


def indexed_cfg(file_list: str | Path = "", vocab: int = 258, seq: int = 16) -> Config:
    cfg = Config()
    cfg.data.source, cfg.data.file_list, cfg.data.seq_len = "indexed", str(file_list), seq
    cfg.model.vocab_size = vocab
    return cfg


@pytest.fixture
def byte_list(tmp_path: Path) -> Path:
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return prepare([text], tmp_path / "data", name="fox", tokenizer="byte", progress=False).file_list


def test_synthetic() -> None:
    cfg = Config()
    cfg.data.source = "synthetic"
    src = build_source(cfg)
    assert isinstance(src, SyntheticSource)
    np.testing.assert_array_equal(src.samples(3, 4), SyntheticSource(256, 32, 1234).samples(3, 4))


def test_indexed_from_file_list(byte_list: Path, tmp_path: Path) -> None:
    cfg = indexed_cfg(byte_list)
    src = build_source(cfg, cache_dir=tmp_path / "cache")  # num_samples: steps (10) x gbs (1), +0.5 %
    assert isinstance(src, BlendedGPTDataset) and len(src) == 11 and (src.seq_len, src.vocab_size) == (16, 258)
    batch = global_batch(src, 4, mbs=2, gas=1, dp=1)
    assert batch.shape == (1, 2, 17) and batch.dtype == np.int32
    assert bytes(batch[0, 0].astype(np.uint8)).decode() in ("The quick brown fox jumps over the lazy dog. " * 3)
    assert (byte_list.parent / "index-cache").is_dir()  # Megatron's place: beside the data
    bigger = build_source(cfg, num_samples=500, cache_dir=tmp_path / "cache")
    assert len(bigger) == 503 and bigger.samples(400, 3).shape == (3, 17)
    assert src.meta["corpus_mode"] == "concatenate-files" and src.meta["shuffle_sample_in_corpus"] is True


def test_corpus_mode_keys_reach_the_stream(byte_list: Path, tmp_path: Path) -> None:
    from configs import load_config

    cfg = load_config("tiny", {"data.source": "indexed", "data.file_list": str(byte_list), "data.seq_len": 16,
                               "model.vocab_size": 258, "data.blend_sample_in_corpus": "true",
                               "data.shuffle_sample_in_corpus": "false"})
    src = build_source(cfg, num_samples=8, cache_dir=tmp_path / "cache")
    assert (src.meta["corpus_mode"], src.meta["shuffle_sample_in_corpus"]) == ("blend-sample-in-corpus", False)


def test_tokenizer_vocab_larger_than_model(byte_list: Path) -> None:
    with pytest.raises(DataError, match=r"fox_file_list\.txt:2: .*fox_text_document was tokenized with a "
                                        r"258-token vocabulary .*model\.vocab_size is 256"):
        build_source(indexed_cfg(byte_list, vocab=256), num_samples=8)


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.txt: data\.file_list not found"):
        build_source(indexed_cfg(tmp_path / "nope.txt"), num_samples=8)
    cfg = Config()
    cfg.data.source = "hdf5"
    with pytest.raises(DataError, match=r"data\.source='hdf5'"):
        build_source(cfg)


def test_stdlib_selection_is_deterministic_and_capped() -> None:
    a, b = select_stdlib_files(0.5), select_stdlib_files(0.5)
    assert a == b and a == sorted(a) and len(a) > 5
    assert sum(p.stat().st_size for p in a) <= 0.5e6
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = {part for p in a for part in p.relative_to(root).parts}
    assert not parts & {"site-packages", "test", "tests"} and all(p.suffix == ".py" for p in a)
    assert len({p.relative_to(root).parts[0] for p in a}) > 3  # spread over the library


def test_default_corpus_prepared_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AURORA_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("AURORA_DATA_CORPUS_MB", "0.25")
    cfg = indexed_cfg("", vocab=512, seq=64)
    src = build_source(cfg, num_samples=64)
    (ds_dir,) = (tmp_path / "cache").glob("stdlib-*-v512-0.25mb")
    assert src.file_list == ds_dir / "stdlib_file_list.txt"
    tok = load_tokenizer(tokenizer_dir(ds_dir / "stdlib_text_document"))
    assert tok.vocab_size <= 512 and src.vocab_size == 512
    x = src.samples(0, 64)
    assert x.max() < tok.vocab_size and x.min() >= 0
    text = "".join(tok.decode(row) for row in x)
    assert "def " in text and "self" in text  # it is Python source
    # reused afterwards: preparing again would fail loudly
    monkeypatch.setattr(corpus_mod, "prepare", lambda *a, **k: pytest.fail("prepared twice"))
    again = build_source(cfg, num_samples=64)
    np.testing.assert_array_equal(again.samples(0, 64), x)
    assert ensure_default_dataset(tmp_path / "cache", 512, max_mb=0.25) == src.file_list


# ----------------------------------------------------------------------------- bad data in both trainers: exit 2
def _break(case: str, tmp_path: Path) -> tuple[Path, list[str]]:
    """A data-file-list broken as ``case`` says, and the overrides that train on it."""
    text = tmp_path / "t.txt"
    text.write_text("ab" if case == "smaller-than-a-sample" else "The quick brown fox jumps over the lazy dog. " * 40)
    if case == "token-past-vocab":  # short documents: every sample holds an end-of-document token (id 256)
        text = tmp_path / "t.jsonl"
        text.write_text('{"text": "The quick brown fox."}\n' * 100)
    fl = prepare([text], tmp_path / "data", name="fox", tokenizer="byte", progress=False).file_list
    prefix = fl.parent / "fox_text_document"
    vocab = "258"
    if case == "truncated-bin":
        raw = Path(f"{prefix}.bin").read_bytes()
        Path(f"{prefix}.bin").write_bytes(raw[: len(raw) // 2])
    elif case == "corrupt-idx":
        Path(f"{prefix}.idx").write_bytes(b"\0" * 64)
    elif case == "missing-file":
        Path(f"{prefix}.bin").unlink()
    elif case == "bad-weight":
        fl.write_text("heavy fox_text_document fox\n")
    elif case == "vocab-mismatch":
        vocab = "256"  # the byte tokenizer has 258 tokens
    elif case == "token-past-vocab":  # no tokenizer recorded: found only when the first batch is read
        import shutil

        shutil.rmtree(tokenizer_dir(prefix))
        vocab = "256"
    return fl, ["--data.source=indexed", f"--data.file_list={fl}", f"--model.vocab_size={vocab}"]


DATA_CASES = {
    "truncated-bin": "truncated data file", "corrupt-idx": "not a Megatron MMapIndexedDataset index",
    "missing-file": "fox_text_document.bin not found", "bad-weight": "weight 'heavy' is not a number",
    "vocab-mismatch": "was tokenized with a 258-token vocabulary", "smaller-than-a-sample": "fewer than one sample",
    "token-past-vocab": "holds token id 256, outside the model's vocabulary",
}


@pytest.mark.parametrize("trainer", ["jax_impl.train", "torch_ref.train"])
@pytest.mark.parametrize("case", list(DATA_CASES))
def test_trainers_report_bad_data_as_one_message_and_exit_2(tmp_path: Path, capsys, trainer: str, case: str,
                                                            monkeypatch) -> None:
    import importlib

    if trainer == "torch_ref.train" and case == "token-past-vocab":
        pytest.skip("needs real workers: test_torch_worker_bad_data_is_exit_2 (slow)")
    monkeypatch.setenv("AURORA_DATA_CACHE", str(tmp_path / "cache"))
    _, overrides = _break(case, tmp_path)
    argv = ["--preset", "tiny", "--steps", "2", "--mesh", "data=1", "--wandb", "disabled", "--quiet",
            "--out-dir", str(tmp_path / "runs"), "--name", "r", *overrides]
    if trainer == "torch_ref.train":
        argv += ["--zero", "1"]
    with pytest.raises(SystemExit) as e:
        importlib.import_module(trainer).main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert DATA_CASES[case] in err and "Traceback" not in err, err


@pytest.mark.slow
def test_torch_worker_bad_data_is_exit_2(tmp_path: Path) -> None:
    """A token id past the vocabulary is found by a worker, mid-run: the launcher prints its message, exit 2."""
    import subprocess
    import sys

    _, overrides = _break("token-past-vocab", tmp_path)
    r = subprocess.run([sys.executable, "-m", "torch_ref.train", "--preset", "tiny", "--steps", "2", "--mesh",
                        "data=2", "--zero", "1", "--wandb", "disabled", "--quiet", "--out-dir", str(tmp_path / "runs"),
                        "--name", "r", *overrides], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    assert DATA_CASES["token-past-vocab"] in r.stderr and "Traceback" not in r.stderr.split("error:")[-1]
