"""GPT sample construction and blending against hand-checked cases and the Megatron algorithms."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aurora_data import BlendedGPTDataset, DataError, GPTDataset, IndexedDataset, IndexedDatasetBuilder, global_batch
from aurora_data.gpt import (
    DEFAULT_SEED,
    IndexCache,
    build_blending_indices,
    build_doc_idx,
    build_index_mappings,
    build_sample_idx,
    num_epochs,
    samples_per_file,
    train_valid_test_split,
)

REPO = Path(__file__).resolve().parents[1]


def write(prefix: Path, docs: list[list[int]] | list[np.ndarray]) -> Path:
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        for d in docs:
            b.add_document(d)
    return prefix


def file_list(path: Path, lines: list[tuple[float, Path, str]]) -> Path:
    path.write_text("".join(f"{w} {p} {c}\n" for w, p, c in lines))
    return path


def loop_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq: int, epochs: int, tokens: int) -> np.ndarray:
    """The C++ helper's document walk, written out as a loop (the reference for the vectorised version)."""
    n = (epochs * tokens - 1) // seq
    out = np.zeros((n + 1, 2), dtype=np.int64)
    d = off = 0
    for s in range(1, n + 1):
        need = seq + 1
        while need:
            have = int(sizes[doc_idx[d]]) - off
            if have >= need:
                off += need - 1
                need = 0
            else:
                need -= have
                d, off = d + 1, 0
        out[s] = (d, off)
    return out


# ----------------------------------------------------------------------------- hand-checked pieces
def test_sample_idx_by_hand() -> None:
    # documents of 3, 5 and 2 tokens, two epochs in a fixed order; samples of 4+1 tokens every 4 tokens:
    # stream  a0 a1 a2 | b0 b1 b2 b3 b4 | c0 c1 | a0 a1 a2 | b0 b1 b2 b3 b4 | c0 c1
    # token   0        | 3              | 8     | 10       | 13             | 18
    sizes = np.array([3, 5, 2], dtype=np.int32)
    doc_idx = np.array([0, 1, 2, 0, 1, 2], dtype=np.int32)
    got = build_sample_idx(sizes, doc_idx, seq_len=4, epochs=2, tokens_per_epoch=10)
    assert got.tolist() == [[0, 0], [1, 1], [2, 0], [3, 2], [4, 3]]


def test_sample_idx_matches_document_walk() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        sizes = rng.integers(0, 12, rng.integers(1, 10)).astype(np.int32)  # empty documents included
        if sizes.sum() < 2:
            continue
        seq, n = int(rng.integers(1, 12)), int(rng.integers(1, 30))
        tokens = int(sizes.sum())
        epochs = num_epochs(tokens, seq, n)
        doc_idx = build_doc_idx(np.arange(len(sizes), dtype=np.int32), epochs, np.random.RandomState(1), False)
        np.testing.assert_array_equal(build_sample_idx(sizes, doc_idx, seq, epochs, tokens),
                                      loop_sample_idx(sizes, doc_idx, seq, epochs, tokens))


def test_epochs_counts_and_split() -> None:
    assert num_epochs(10, 4, 4) == 2 and num_epochs(10, 4, 2) == 1 and num_epochs(10, 4, 3) == 2
    assert samples_per_file([1, 1], 100) == [51, 51]  # ceil(100 * 0.5 * 1.005)
    assert samples_per_file([3, 1], 1000) == [754, 252]
    assert train_valid_test_split("990,10,0", 1000) == [0, 990, 1000, 1000]
    assert train_valid_test_split("1,1,1", 10) == [0, 4, 7, 10]  # rounding remainder moved up
    assert train_valid_test_split("100", 7) == [0, 7, 7, 7]
    with pytest.raises(DataError, match="split 'a,b'"):
        train_valid_test_split("a,b", 10)


def test_blending_greedy_by_hand() -> None:
    # w=(0.7, 0.3): errors w*max(t,1) - count; t=0: .7,.3 -> 0; t=1: -.3,.3 -> 1; t=2: .4,-.4 -> 0 ...
    index, sample = build_blending_indices([0.7, 0.3], 10)
    assert index.tolist() == [0, 1, 0, 0, 1, 0, 0, 1, 0, 0]
    assert sample.tolist() == [0, 0, 1, 2, 1, 3, 4, 2, 5, 6]
    assert build_blending_indices([0.5, 0.5], 4)[0].tolist() == [0, 1, 0, 1]  # ties go to the first


def test_blending_many_datasets_matches_scalar_rule() -> None:
    w = np.random.default_rng(3).random(11)
    w /= w.sum()
    index, sample = build_blending_indices(w, 3000)  # the numpy path (more than 8 datasets)
    counts = np.zeros(11)
    for t in range(3000):
        err = w * max(t, 1) - counts
        best = int(np.flatnonzero(err == err.max())[0])
        assert index[t] == best and sample[t] == counts[best]
        counts[best] += 1


def test_rng_consumption_order_matches_megatron() -> None:
    # T=100 tokens, seq 10 -> 9 samples/epoch; 10 samples need 2 epochs and the second contributes 1 < 80%
    # of 9, so Megatron shuffles the last epoch apart: doc_idx (E-1 epochs), doc_idx (last), shuffle_idx
    # (first part), shuffle_idx (rest), all from one RandomState(seed).
    sizes = np.full(10, 10, dtype=np.int32)
    docs = np.arange(10, dtype=np.int32)
    doc_idx, sample_idx, shuffle_idx = build_index_mappings(sizes, docs, num_samples=10, seq_len=10, seed=1234)
    rng = np.random.RandomState(1234)
    first, last = docs.copy(), docs.copy()
    rng.shuffle(first)
    rng.shuffle(last)
    np.testing.assert_array_equal(doc_idx, np.concatenate((first, last)))
    assert sample_idx.shape == (20, 2)  # (2*100 - 1) // 10 = 19 samples
    head, tail = np.arange(9, dtype=np.uint32), np.arange(9, 19, dtype=np.uint32)
    rng.shuffle(head)
    rng.shuffle(tail)
    np.testing.assert_array_equal(shuffle_idx, np.concatenate((head, tail)))
    assert shuffle_idx.dtype == np.uint32 and doc_idx.dtype == np.int32


def test_two_epochs_without_separation_use_one_shuffle() -> None:
    sizes = np.full(10, 10, dtype=np.int32)
    docs = np.arange(10, dtype=np.int32)
    doc_idx, _, shuffle_idx = build_index_mappings(sizes, docs, num_samples=16, seq_len=10, seed=7)
    rng = np.random.RandomState(7)
    both = np.tile(docs, 2)
    rng.shuffle(both)
    np.testing.assert_array_equal(doc_idx, both)
    assert sorted(shuffle_idx.tolist()) == list(range(19))


# ----------------------------------------------------------------------------- datasets on files
def test_samples_overlap_by_one_token_and_follow_doc_idx(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 1000, n) for n in (7, 1, 30, 12, 5, 9)]
    prefix = write(tmp_path / "d_text_document", docs)
    ds = GPTDataset(IndexedDataset(prefix), num_samples=25, seq_len=8, split="1,0,0")
    assert num_epochs(64, 8, 25) == 4 == len(ds.doc_idx) // len(docs)  # 4 epochs of 64 tokens
    stream = np.concatenate([docs[i] for i in ds.doc_idx])
    unshuffled = [stream[j * 8: j * 8 + 9] for j in range(len(ds))]
    for j in range(len(ds) - 1):
        assert unshuffled[j][-1] == unshuffled[j + 1][0]  # consecutive samples share one token
    got = ds.gather(np.arange(len(ds)))
    assert got.dtype == np.int32 and got.shape == (len(ds), 9)
    for i in range(len(ds)):
        np.testing.assert_array_equal(got[i], unshuffled[ds.shuffle_idx[i]])
        np.testing.assert_array_equal(ds[i], got[i])


def three_files(tmp_path: Path, corpora: tuple[str, str, str]) -> Path:
    # file k holds only tokens in [100k, 100k+100): a sample's first token names its file
    rng = np.random.default_rng(5)
    lines = []
    for k, (w, c) in enumerate(zip((5.0, 3.0, 2.0), corpora, strict=True)):
        docs = [rng.integers(100 * k, 100 * k + 100, int(n)) for n in rng.integers(20, 200, 40)]
        lines.append((w, write(tmp_path / f"f{k}_text_document", docs), c))
    return file_list(tmp_path / "list.txt", lines)


@pytest.mark.parametrize("corpora", [("books", "books", "books"), ("a", "b", "c")])
def test_blending_proportions_within_one_percent(tmp_path: Path, corpora: tuple[str, str, str]) -> None:
    src = BlendedGPTDataset(three_files(tmp_path, corpora), seq_len=16, num_samples=10_000,
                            cache_dir=tmp_path / "cache")
    assert len(src) == sum(samples_per_file([5, 3, 2], 10_000)) >= 10_000
    x = src.samples(0, 10_000)
    which = x[:, 0] // 100
    assert ((x // 100) == which[:, None]).all()  # every sample comes from one file
    np.testing.assert_allclose(np.bincount(which, minlength=3) / 10_000, [0.5, 0.3, 0.2], atol=0.01)
    assert len(set(which[:50].tolist())) == 3  # interleaved, not concatenated


def test_default_is_upstreams_current_mode(tmp_path: Path) -> None:
    """ALCF's current launch: a corpus' files concatenated, then the corpus' samples permuted by RandomState(seed)."""
    lst = three_files(tmp_path, ("books",) * 3)
    src = BlendedGPTDataset(lst, seq_len=16, num_samples=1000)
    assert src.meta["corpus_mode"] == "concatenate-files"
    assert (src.meta["blend_sample_in_corpus"], src.meta["shuffle_sample_in_corpus"]) == (False, True)
    n = samples_per_file([5, 3, 2], 1000)
    order = np.arange(sum(n))
    np.random.RandomState(DEFAULT_SEED).shuffle(order)
    concat = np.repeat([0, 1, 2], n)
    assert (src.samples(0, len(src))[:, 0] // 100).tolist() == concat[order].tolist()
    blended = BlendedGPTDataset(lst, seq_len=16, num_samples=1000, blend_in_corpus=True)
    assert blended.meta["corpus_mode"] == "blend-sample-in-corpus"
    assert not np.array_equal(blended.samples(0, 1000), src.samples(0, 1000))


@pytest.mark.parametrize("blend", [False, True])
def test_zero_weight_file_contributes_no_samples(tmp_path: Path, blend: bool) -> None:
    rng = np.random.default_rng(3)
    prefixes = [write(tmp_path / f"z{k}_text_document", [rng.integers(100 * k, 100 * k + 100, 60) for _ in range(20)])
                for k in range(3)]
    lst = file_list(tmp_path / "l.txt", [(2, prefixes[0], "c"), (0, prefixes[1], "c"), (1, prefixes[2], "d")])
    src = BlendedGPTDataset(lst, seq_len=16, num_samples=300, blend_in_corpus=blend)
    which = np.bincount(src.samples(0, len(src))[:, 0] // 100, minlength=3)
    assert which.tolist() == [samples_per_file([2, 0, 1], 300)[0], 0, samples_per_file([2, 0, 1], 300)[2]]


def test_concat_in_corpus_without_shuffle(tmp_path: Path) -> None:
    src = BlendedGPTDataset(three_files(tmp_path, ("books",) * 3), seq_len=16, num_samples=1000,
                            blend_in_corpus=False, shuffle_in_corpus=False)
    which = src.samples(0, len(src))[:, 0] // 100
    n = samples_per_file([5, 3, 2], 1000)
    assert which.tolist() == [0] * n[0] + [1] * n[1] + [2] * n[2]


def digest(file_list_path: Path, cache: Path) -> str:
    src = BlendedGPTDataset(file_list_path, seq_len=16, num_samples=400, cache_dir=cache)
    return hashlib.sha256(src.samples(0, 400).tobytes()).hexdigest()


def test_deterministic_across_runs_and_processes(tmp_path: Path) -> None:
    lst = three_files(tmp_path, ("a", "a", "b"))
    here = digest(lst, tmp_path / "c1")
    assert digest(lst, tmp_path / "c2") == here  # fresh cache: rebuilt, same stream
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            "import test_data_gpt as t; print(t.digest(Path(sys.argv[2]), Path(sys.argv[3])))")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(lst), str(tmp_path / "c3")],
                         capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == here
    other = BlendedGPTDataset(lst, seq_len=16, num_samples=400, seed=99, cache_dir=tmp_path / "c1")
    assert hashlib.sha256(other.samples(0, 400).tobytes()).hexdigest() != here  # the seed matters


def test_resume_from_consumed_samples(tmp_path: Path) -> None:
    lst = three_files(tmp_path, ("a", "a", "b"))
    mbs, gas, dp, steps = 2, 2, 2, 8
    gbs = mbs * gas * dp
    first = BlendedGPTDataset(lst, seq_len=32, num_samples=steps * gbs, cache_dir=tmp_path / "cache")
    run = [global_batch(first, k * gbs, mbs, gas, dp) for k in range(steps)]
    assert not np.array_equal(run[4], run[3])
    for cache in ("cache", "elsewhere"):  # restart: fresh objects, same files; cache hit or rebuild
        again = BlendedGPTDataset(lst, seq_len=32, num_samples=steps * gbs, cache_dir=tmp_path / cache)
        for k in range(4, steps):
            np.testing.assert_array_equal(global_batch(again, k * gbs, mbs, gas, dp), run[k])


def test_index_cache_is_reused_and_keyed_by_inputs(tmp_path: Path) -> None:
    lst = three_files(tmp_path, ("a", "b", "b"))
    cache = tmp_path / "cache"
    a = BlendedGPTDataset(lst, seq_len=16, num_samples=300, cache_dir=cache)
    assert a.cache.builds == 4 and a.cache.hits == 0  # three files + the blend
    b = BlendedGPTDataset(lst, seq_len=16, num_samples=300, cache_dir=cache)
    assert b.cache.builds == 0 and b.cache.hits == 4
    np.testing.assert_array_equal(b.samples(0, 300), a.samples(0, 300))
    # same document count, other contents: only the .idx digest can tell the old cache entry is stale
    write(tmp_path / "f0_text_document", [np.full(25 + i % 2, 7 + i % 2) for i in range(40)])
    c = BlendedGPTDataset(lst, seq_len=16, num_samples=300, cache_dir=cache)
    assert c.cache.builds == 2 and c.cache.hits == 2  # f0 and the blend rebuilt; f1, f2 reused
    x = c.samples(0, 300)
    assert set(np.unique(x[x < 100]).tolist()) <= {7, 8}
    assert IndexCache(cache).directory == cache and any(cache.glob("*_shuffle_idx.npy"))


def test_unwritable_cache_falls_back_to_memory(tmp_path: Path) -> None:
    lst = three_files(tmp_path, ("a", "a", "a"))
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="could not write the data index cache"):
        src = BlendedGPTDataset(lst, seq_len=16, num_samples=50, cache_dir=blocker / "sub")
    assert src.samples(0, 50).shape == (50, 17)


# ----------------------------------------------------------------------------- errors
def test_sequence_longer_than_the_data(tmp_path: Path) -> None:
    lst = file_list(tmp_path / "l.txt", [(1, write(tmp_path / "small_text_document", [[1, 2, 3], [4, 5]]), "c")])
    with pytest.raises(DataError, match=r"l\.txt:1: .*small_text_document: the training split holds 5 tokens.*"
                                        r"seq_len\+1 = 9"):
        BlendedGPTDataset(lst, seq_len=8, num_samples=10)


def test_token_outside_vocab_names_the_file(tmp_path: Path) -> None:
    lst = file_list(tmp_path / "l.txt", [(1, write(tmp_path / "x_text_document", [np.arange(300)]), "c")])
    src = BlendedGPTDataset(lst, seq_len=8, num_samples=10, vocab_size=256, split="1,0,0")
    with pytest.raises(DataError, match=r"l\.txt:1: .*x_text_document\.bin holds token id 29\d.*\[0, 256\)"):
        src.samples(0, 10)
    assert BlendedGPTDataset(lst, seq_len=8, num_samples=10, vocab_size=300).samples(0, 2).max() < 300


def test_reading_past_the_built_samples(tmp_path: Path) -> None:
    lst = file_list(tmp_path / "l.txt", [(1, write(tmp_path / "x_text_document", [np.arange(100)]), "c")])
    src = BlendedGPTDataset(lst, seq_len=8, num_samples=10)
    assert len(src) == 11  # ceil(10 * 1.005)
    with pytest.raises(IndexError, match=r"samples \[8, 12\) outside the 11 built"):
        src.samples(8, 4)


def test_corpus_composition_matches_alcf(tmp_path: Path) -> None:
    # ALCF with --blend-sample-in-corpus: files of a corpus blended by n_i / sum(n), the corpus permuted by
    # RandomState(seed), corpora sorted by name and blended by size; here corpus "z" (files 0, 1) is listed
    # first but sorts last.
    rng = np.random.default_rng(9)
    prefixes = [write(tmp_path / f"g{k}_text_document", [rng.integers(100 * k, 100 * k + 100, 50 + 13 * j)
                                                         for j in range(12)]) for k in range(3)]
    lst = file_list(tmp_path / "l.txt", [(2, prefixes[0], "z"), (1, prefixes[1], "z"), (1.5, prefixes[2], "a")])
    src = BlendedGPTDataset(lst, seq_len=24, num_samples=300, seed=77, blend_in_corpus=True)
    n = samples_per_file([2, 1, 1.5], 300)
    files = [GPTDataset(IndexedDataset(p), c, 24, seed=77) for p, c in zip(prefixes, n, strict=True)]

    def corpus(members: list[int]) -> list[np.ndarray]:
        sizes = np.array([n[m] for m in members])
        di, dsi = build_blending_indices(sizes / sizes.sum(), int(sizes.sum()))
        order = np.arange(int(sizes.sum()))
        np.random.RandomState(77).shuffle(order)
        return [files[members[di[k]]][dsi[k]] for k in order]

    corpora = [corpus([2]), corpus([0, 1])]  # sorted by name: "a", "z"
    sizes = np.array([len(c) for c in corpora], dtype=np.float64)
    ci, cs = build_blending_indices(sizes / sizes.sum(), int(sizes.sum()))
    expected = np.stack([corpora[c][s] for c, s in zip(ci, cs, strict=True)])
    np.testing.assert_array_equal(src.samples(0, len(src)), expected)


def test_corpora_are_ordered_by_name(tmp_path: Path) -> None:
    # equal corpus sizes make every other greedy step a tie, which the first corpus *by name* wins
    lst = file_list(tmp_path / "l.txt", [(1, write(tmp_path / "b_text_document", [np.full(40, 2)]), "zeta"),
                                         (1, write(tmp_path / "a_text_document", [np.full(40, 1)]), "alpha")])
    first = BlendedGPTDataset(lst, seq_len=4, num_samples=6).samples(0, 6)[:, 0]
    assert first.tolist() == [1, 2, 1, 2, 1, 2]
