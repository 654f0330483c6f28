"""Failure handling: non-finite steps (stop / skip), the step watchdog, fault hooks."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from fault_runner import RUNNER, faults, parse_faults, plant_inf

from configs import load_config
from jax_impl import resilience
from jax_impl.sharding import make_mesh
from jax_impl.train import NonFiniteError, main
from jax_impl.trainer import Trainer
from runtime.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--wandb", "disabled", "--quiet", "--mesh", "fsdp=8"]


def test_planted_inf_weight_stops_naming_step_and_parameter(tmp_path):
    with faults("nan_param=layers.w_up@3"), pytest.raises(NonFiniteError) as e:
        main([*TINY, "--steps", "5", "--out-dir", str(tmp_path), "--name", "nan"])
    msg = str(e.value)
    assert "non-finite loss at step 3" in msg
    assert "first non-finite parameter: layers.w_up" in msg and "the update was not applied" in msg
    rows = read_metrics(tmp_path / "nan")
    assert [r["step"] for r in rows] == [1, 2, 3] and not np.isfinite(rows[-1]["loss"])
    last = (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()[-1]
    assert '"loss": "NaN"' in last or '"loss": "Infinity"' in last, last  # strict JSON, no bare NaN


def test_bad_batch_is_skipped_and_training_goes_on(tmp_path):
    with faults("bad_batch@2"):
        out = main([*TINY, "--steps", "4", "--out-dir", str(tmp_path), "--name", "skip", "--on-nonfinite", "skip"])
    assert out["skipped"] == 1
    losses = out["losses"]
    assert not np.isfinite(losses[1]) and all(np.isfinite(losses[i]) for i in (0, 2, 3))
    assert int(out["opt_state"][1][0].count) == 3  # the skipped step moved neither Adam nor the schedule


@pytest.mark.slow
def test_guard_keeps_state_bitwise_and_names_first_bad_gradient():
    cfg = load_config("tiny", {"parallel.mesh": "fsdp=8"})
    tr = Trainer.build(cfg, make_mesh(cfg.mesh_shape(8)))
    params, opt = tr.init_state()
    params = jax.device_put(plant_inf(params, "final_norm"), tr.param_sh)
    before = jax.tree.map(np.asarray, (params, opt))
    batch = jax.device_put(np.zeros((1, 16, 33), np.int32), tr.batch_abstract().sharding)
    step = resilience.compile_guarded(tr)
    p2, o2, m = step(params, opt, batch)
    assert not bool(m["finite"])
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in
               zip(jax.tree.leaves(before), jax.tree.leaves(jax.tree.map(np.asarray, (p2, o2))), strict=True))
    diag = resilience.diagnose_nonfinite(tr, p2, batch)
    assert diag["param"] == "final_norm" and diag["grad"] is not None


def test_watchdog_fires_with_all_stacks(tmp_path, monkeypatch):
    fired = {}

    def fake_exit(code):  # in-process: record instead of ending pytest
        fired["code"] = code
        raise SystemExit  # ends the watchdog thread only

    monkeypatch.setattr(resilience.os, "_exit", fake_exit)
    report = tmp_path / "watchdog.txt"
    wd = resilience.Watchdog(factor=3, min_s=0.3, first_s=5, report=report, poll_s=0.02)
    with wd:
        for s in range(1, 6):
            wd.start(s)
            time.sleep(0.01)
            wd.done()
        assert wd.limit() == pytest.approx(0.3)
        wd.start(6)
        stuck = threading.Event()
        stuck.wait(2.0)  # a step that does not return
    assert fired["code"] == resilience.WATCHDOG_EXIT
    text = report.read_text()
    assert "watchdog: step 6 has run" in text and "over its limit 0.3s" in text
    assert "test_watchdog_fires_with_all_stacks" in text and 'Thread' in text  # the main thread's stack, named


def test_fault_spec_parsing():
    assert parse_faults("nan_param=layers.wq@3, stall=2.5@4,sigterm@5,bad_batch@6,raise=1@2") == {
        "nan_param": ("layers.wq", 3), "stall": (2.5, 4), "sigterm": 5, "bad_batch": 6, "raise": (1, 2)}
    with pytest.raises(ValueError, match="unknown fault"):
        parse_faults("explode@3")


@pytest.mark.slow
def test_watchdog_ends_a_stalled_training_process(tmp_path):
    """A step that never returns (planted sleep) ends the process with code 75 and every thread's stack."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    t = time.monotonic()
    r = subprocess.run([sys.executable, str(RUNNER), "stall=600@5", "jax", *TINY, "--steps", "8",
                        "--out-dir", str(tmp_path), "--name", "stall", "--watchdog-factor", "5",
                        "--watchdog-min-s", "3"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == resilience.WATCHDOG_EXIT, r.stderr[-3000:]
    assert time.monotonic() - t < 300
    assert "watchdog: step 5 has run" in r.stderr
    assert "Current thread" in r.stderr or "Thread 0x" in r.stderr
    assert 'in train' in r.stderr and "time.sleep" not in r.stdout
    assert [row["step"] for row in read_metrics(tmp_path / "stall")] == [1, 2, 3, 4]
    assert (tmp_path / "stall" / "watchdog.0.txt").read_text().startswith("\nwatchdog: step 5")


@pytest.mark.slow
def test_nonfinite_exit_code_from_the_command_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, str(RUNNER), "nan_param=embed@2", "jax", *TINY, "--steps", "3",
                        "--out-dir", str(tmp_path), "--name", "n"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 3, r.stderr[-3000:]
    assert "error: non-finite loss at step 2" in r.stderr and "first non-finite parameter: embed" in r.stderr
    assert "Traceback" not in r.stderr
