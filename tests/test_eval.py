"""Validation loss (Megatron's --eval-interval / --eval-iters): the valid split, its position, and the JAX trainer."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fault_runner import faults

from aurora_data import BlendedGPTDataset, IndexedDatasetBuilder, build_source, global_batch
from aurora_data.gpt import GPTDataset, train_valid_test_split
from aurora_data.indexed import IndexedDataset
from configs import ConfigError, load_config, valid_offset, valid_samples
from jax_impl import train as jax_train
from jax_impl.model import cross_entropy, forward

TINY = ["--preset", "tiny", "--wandb", "disabled", "--quiet"]


def test_megatron_valid_sample_count_and_offsets():
    cfg = load_config("tiny", {"train.steps": 10, "train.eval_interval": 3, "train.eval_iters": 2})
    assert valid_samples(cfg, 4) == 2 * 4 * (10 // 3 + 1) == 32
    assert [valid_offset(cfg, s, 4) for s in (3, 6, 9)] == [0, 8, 16]  # each evaluation reads the next batches
    assert valid_samples(load_config("tiny"), 4) == 0  # evaluation off by default


@pytest.mark.parametrize("over, words", [
    ({"train.eval_interval": -1}, "train.eval_interval=-1 must be >= 0"),
    ({"train.eval_interval": 2, "train.eval_iters": 0}, "train.eval_iters=0 must be >= 1"),
])
def test_bad_eval_settings_are_named(over, words):
    with pytest.raises(ConfigError, match=words):
        load_config("tiny", over)


def test_valid_split_reads_other_documents_than_training(tmp_path):
    docs = [np.full(40, i, dtype=np.int32) for i in range(100)]  # document i holds only token i
    with IndexedDatasetBuilder(tmp_path / "d", np.uint16) as b:
        for d in docs:
            b.add_document(d)
    (tmp_path / "list.txt").write_text(f"1.0 {tmp_path / 'd'} c\n")
    bounds = train_valid_test_split("80,20,0", 100)
    train = GPTDataset(IndexedDataset(tmp_path / "d"), 50, 16, split="80,20,0")
    valid = GPTDataset(IndexedDataset(tmp_path / "d"), 50, 16, split="80,20,0", split_index=1)
    assert list(valid.documents) == list(range(bounds[1], bounds[2])) == list(range(80, 100))
    blend_t = BlendedGPTDataset(tmp_path / "list.txt", 16, 50, split="80,20,0", cache_dir=tmp_path / "c")
    blend_v = BlendedGPTDataset(tmp_path / "list.txt", 16, 50, split="80,20,0", cache_dir=tmp_path / "c",
                                split_index=1)
    seen_t, seen_v = set(np.unique(blend_t.samples(0, 50))), set(np.unique(blend_v.samples(0, 50)))
    assert seen_t <= set(range(80)) and seen_v <= set(range(80, 100)) and seen_v
    assert len(train) >= 50


def test_synthetic_valid_stream_is_not_the_training_stream():
    cfg = load_config("tiny")
    t, v = build_source(cfg), build_source(cfg, num_samples=8, split="valid")
    assert not np.array_equal(t.samples(0, 8), v.samples(0, 8))
    np.testing.assert_array_equal(v.samples(3, 2), build_source(cfg, 8, split="valid").samples(3, 2))


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_val_loss_logged_every_interval_equals_a_direct_forward_and_a_single_device_run(tmp_path):
    args = [*TINY, "--steps", "4", "--train.eval_interval=2", "--train.eval_iters=2", "--out-dir", str(tmp_path)]
    one = jax_train.main([*args, "--mesh", "data=1", "--mbs", "4", "--name", "one"])
    many = jax_train.main([*args, "--mesh", "data=2,fsdp=2", "--zero", "3", "--mbs", "1", "--name", "four"])
    r1, r4 = _rows(one["run_dir"]), _rows(many["run_dir"])
    assert [r["val_loss"] is not None for r in r1] == [False, True, False, True]
    for a, b in zip(r1, r4, strict=True):
        assert (a["val_loss"] is None) == (b["val_loss"] is None)
        if a["val_loss"] is not None:
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6)
            assert a["val_ppl"] == pytest.approx(np.exp(a["val_loss"]), rel=1e-12)
    # the step-4 evaluation, recomputed: final params, valid batches 2 and 3 (offset 2 * eval_iters * gbs)
    cfg = load_config("tiny", {"train.steps": 4, "train.eval_interval": 2, "train.eval_iters": 2})
    valid = build_source(cfg, num_samples=valid_samples(cfg, 4), split="valid")
    params = jax.tree.map(np.asarray, one["params"])
    losses = []
    for i in range(2):
        tokens = jnp.asarray(global_batch(valid, valid_offset(cfg, 4, 4) + 4 * i, 4, 1, 1)[0])
        losses.append(float(cross_entropy(forward(cfg.model, params, tokens[:, :-1]), tokens[:, 1:])))
    assert r1[3]["val_loss"] == pytest.approx(np.mean(losses), rel=1e-6)


def test_pipeline_val_loss_equals_single_device(tmp_path):
    args = [*TINY, "--steps", "2", "--train.eval_interval=1", "--train.eval_iters=1", "--out-dir", str(tmp_path),
            "--gas", "2", "--mbs", "2"]
    one = jax_train.main([*args, "--mesh", "data=1", "--name", "one"])
    pp = jax_train.main([*args, "--mesh", "pipeline=2", "--zero", "1", "--name", "pp"])
    for a, b in zip(_rows(one["run_dir"]), _rows(pp["run_dir"]), strict=True):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6)


def test_resumed_run_evaluates_the_same_batches(tmp_path):
    args = [*TINY, "--steps", "6", "--train.eval_interval=2", "--train.eval_iters=1", "--out-dir", str(tmp_path),
            "--mesh", "fsdp=2"]
    full = jax_train.main([*args, "--name", "full"])
    with faults("sigterm@3"), pytest.raises(SystemExit) as stop:  # preempted after step 3: saves, exits 128 + 15
        jax_train.main([*args, "--name", "cut"])
    assert stop.value.code == 143
    jax_train.main([*args, "--name", "cut", "--resume", "auto"])
    want = [r["val_loss"] for r in _rows(full["run_dir"])]
    got = [r["val_loss"] for r in _rows(tmp_path / "cut")]
    assert got == want and want[5] is not None
