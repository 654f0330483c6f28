"""The fault campaign (benchmarks/fault_campaign.py), small: kill, requeue with --resume auto, compare bit for bit.

The full campaign (20 faults per trainer and mode, 40 steps) is run by hand; its figures are in
docs/checkpoints.md. Here a few faults per trainer keep the slow tier's cost down.
"""

from __future__ import annotations

import pytest

from benchmarks import fault_campaign as fc

STEPS, EVERY = 16, 4


def check(r: fc.Result, kills: int) -> None:
    assert r.errors == []
    assert r.faults_injected == r.faults_survived == kills, r
    assert r.kinds.get("before-first-checkpoint") == 1, r.kinds  # a requeue of a run that never saved
    assert r.steps_logged == list(range(1, STEPS + 1))  # no step lost, none twice
    assert r.bytes_lost == 0 and r.bit_identical
    assert r.ok


@pytest.mark.slow
@pytest.mark.parametrize("mode, kills", [("sigkill", 5), ("sigterm", 3), ("corrupt", 3)])
def test_jax_survives_faults_bit_identically(tmp_path, mode, kills):
    ref = fc.reference_run("jax", STEPS, EVERY, tmp_path)
    r = fc.campaign("jax", mode, kills, STEPS, EVERY, seed=1, work=tmp_path, reference=ref)
    check(r, kills)
    if mode == "sigterm":
        assert r.kinds.get("saved-on-sigterm", 0) >= 1  # the graceful stop saved before exiting 143


@pytest.mark.slow
def test_torch_survives_kill9_bit_identically(tmp_path):
    ref = fc.reference_run("torch", STEPS, EVERY, tmp_path)
    r = fc.campaign("torch", "sigkill", 5, STEPS, EVERY, seed=1, work=tmp_path, reference=ref)
    check(r, 5)
