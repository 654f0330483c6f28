"""torch_ref on the Aurora torch stack's CPU emulation: every layout's losses against the 1-rank run.

Run in the torch 2.10 environment (``make test-torch210``; no JAX installed): each layout trains
the tiny preset for 5 steps with ``--init torch`` on 2-4 CPU ranks (gloo) and must give the
single-rank run's per-step losses and gradient norms to fp32 rounding, as the main stack's
2-rank-vs-1-rank tests require. The first test pins the stack it ran on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from torch_ref import train as torch_train

pytestmark = pytest.mark.torch_stack

ROOT = Path(__file__).resolve().parents[2]
CI_PINS = ROOT / "configs" / "aurora" / "torch210-ci.txt"
RTOL = 1e-5
TINY = ["--preset", "tiny", "--steps", "5", "--wandb", "disabled", "--quiet", "--init", "torch"]

LAYOUTS = [  # label, flags; the global batch is 4 everywhere
    ("zero1", "--mesh", "data=2", "--zero", "1", "--mbs", "2"),
    ("zero2", "--mesh", "data=2", "--zero", "2", "--mbs", "2"),
    ("zero3", "--mesh", "data=2", "--zero", "3", "--mbs", "2"),
    ("zero3+hpz", "--mesh", "data=1,fsdp=2", "--zero", "3", "--parallel.hpz=true", "--mbs", "2"),
    ("zero3+mics", "--mesh", "data=2,fsdp=2", "--zero", "3", "--parallel.mics=true", "--mbs", "1"),
    ("zero1+tp2", "--mesh", "data=1,tensor=2", "--zero", "1", "--mbs", "4"),
    ("zero2+tp2", "--mesh", "data=1,tensor=2", "--zero", "2", "--mbs", "4"),
]


def run(tmp_path: Path, name: str, *args: str) -> dict:
    return torch_train.main([*TINY, "--out-dir", str(tmp_path), "--name", name.replace("+", "_"), *args])


def assert_same_run(got: dict, want: dict) -> None:
    rel = [abs(g - w) / abs(w) for g, w in zip(got["losses"], want["losses"], strict=True)]
    assert len(rel) == 5 and max(rel) <= RTOL, f"per-step relative differences {rel}"
    gn = [r["grad_norm"] for r in got["metrics"]]
    assert gn == pytest.approx([r["grad_norm"] for r in want["metrics"]], rel=1e-4)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict:
    """1 rank, the global batch 4 as one microbatch."""
    return run(tmp_path_factory.mktemp("base"), "base", "--mesh", "data=1", "--zero", "1", "--mbs", "4")


@pytest.fixture(scope="module")
def baseline_gas4(tmp_path_factory) -> dict:
    """1 rank, the global batch 4 as 4 microbatches of 1 (the pipeline's split)."""
    return run(tmp_path_factory.mktemp("base4"), "base4", "--mesh", "data=1", "--zero", "1", "--mbs", "1",
               "--gas", "4")


def test_the_tier_runs_on_the_pinned_stack():
    import torch

    from torch_ref.stack import check, read_pins, report

    pins = read_pins(CI_PINS)
    assert pins["torch"].startswith("2.10.")
    assert torch.__version__.split("+")[0] == pins["torch"]
    assert check(pins) == []  # DeepSpeed and every other pin as installed, DeepSpeed's requirements met
    r = report()
    assert r["python"].startswith("3.12.")
    assert (r["jax_installed"], r["ipex_imported"], r["accelerator"], r["backend"]) == (False, False, "cpu", "gloo")


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda a: a[0])
def test_layout_matches_one_rank(tmp_path, baseline, layout):
    label, *args = layout
    got = run(tmp_path, label, *args)
    assert_same_run(got, baseline)
    meta = json.loads((got["run_dir"] / "meta.json").read_text())
    import torch

    assert (meta["layout"], meta["init"], meta["torch"]) == (label, "torch", torch.__version__)


def test_pipeline_two_stages_matches_one_rank(tmp_path, baseline_gas4):
    got = run(tmp_path, "pp2+zero1", "--mesh", "pipeline=2", "--zero", "1", "--mbs", "1", "--gas", "4")
    assert_same_run(got, baseline_gas4)
    meta = json.loads((got["run_dir"] / "meta.json").read_text())
    assert (meta["layout"], meta["engine"]) == ("pp2+zero1", "deepspeed-pipe")
