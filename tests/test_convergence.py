"""benchmarks/convergence.py: its statistics on hand-made curves, and one short real run of both trainers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("convergence", ROOT / "benchmarks" / "convergence.py")
conv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(conv)


def test_first_divergence_and_tail_gap():
    a = [4.0, 3.0, 2.0, 1.0]
    assert conv.first_divergence(a, a) is None
    assert conv.first_divergence(a, [4.0, 3.0001, 2.0, 1.0]) is None  # 3.3e-5 relative: not over 1e-4
    assert conv.first_divergence(a, [4.0, 3.0, 2.001, 1.0]) == 3
    assert conv.tail_gap(a, [4.0, 3.0, 2.0, 1.5], frac=0.25) == pytest.approx(0.5)
    assert conv.tail_gap(a, [5.0, 3.0, 2.0, 1.0], frac=0.01) == 0.0  # at least the last step, here equal


def test_bf16_gap_is_judged_against_each_trainers_seed_spread():
    def c(x):
        return {"loss": x, "val": [], "val_steps": []}

    by_seed = {0: {"jax": c([2.0, 1.00]), "torch": c([2.0, 1.01])},
               1: {"jax": c([2.0, 1.10]), "torch": c([2.0, 1.12])}}
    s = conv.bf16_summary(by_seed)
    assert s["seed_spread_last10pct"] == {"jax": pytest.approx(0.10), "torch": pytest.approx(0.11)}
    assert s["gap_by_seed"] == {0: pytest.approx(0.01), 1: pytest.approx(0.02)}
    assert s["gap_last10pct"] == pytest.approx(0.015)  # the mean over the seeds both trainers ran
    assert s["gap_inside_spread"] is True
    by_seed[0]["torch"] = c([2.0, 1.5])
    assert conv.bf16_summary(by_seed)["gap_inside_spread"] is False
    del by_seed[1]["torch"]  # DeepSpeed at one seed: the gap is that seed's, judged against JAX's spread
    s = conv.bf16_summary(by_seed)
    assert s["gap_seeds"] == [0] and s["gap_last10pct"] == pytest.approx(0.5)
    assert s["seed_spread_last10pct"]["torch"] is None and s["gap_inside_spread"] is False


@pytest.mark.slow
def test_short_real_fp32_run_agrees_and_writes_its_report(tmp_path):
    data = conv.main(["--preset", "tiny", "--steps", "8", "--seeds", "0", "--dtypes", "fp32", "--eval-interval", "4",
                      "--eval-iters", "1", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    f = data["summary"]["fp32"]
    assert f["first_step_over_1e-4"] is None and f["final_rel"] <= 1e-5 and f["max_val_rel"] <= 1e-5
    assert json.loads((tmp_path / "out" / "results.json").read_text())["curves"]["fp32"]["0"]["jax"]["val_steps"] \
        == [4, 8]
    assert (tmp_path / "out" / "convergence_fp32.png").is_file()
    assert "first step where the training losses differ" in (tmp_path / "out" / "README.md").read_text()
