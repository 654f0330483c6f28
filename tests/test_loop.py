"""runtime.loop: the order hooks are called in, stop requests, errors, installed hooks; no fault branches left in
the trainers (faults come from tests/fault_runner.py's hooks)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

from runtime import loop

ROOT = Path(__file__).resolve().parents[1]


class Recorder(loop.BaseHook):
    """Records every call as (name, event, step); stops after ``stop_at`` when asked."""

    def __init__(self, name: str, calls: list, stop_at: int | None = None, checkpoint: bool = False):
        self.name, self.calls, self.stop_at, self.checkpoint = name, calls, stop_at, checkpoint

    def on_start(self, ctx: Any) -> None:
        self.calls.append((self.name, "start", ctx))

    def before_step(self, step: int) -> None:
        self.calls.append((self.name, "before", step))

    def after_step(self, step: int, metrics: dict[str, Any]) -> loop.Stop | None:
        self.calls.append((self.name, "after", step))
        metrics.setdefault("seen_by", []).append(self.name)
        if step == self.stop_at:
            return loop.Stop(f"{self.name} stops", code=7, checkpoint=self.checkpoint)
        return None

    def on_end(self, end: loop.LoopEnd) -> None:
        self.calls.append((self.name, "end", end.last_step))


def test_hooks_run_in_order_around_each_step():
    calls: list = []
    rows: list = []

    def step(n: int) -> dict:
        calls.append(("step", "run", n))
        rows.append({"step": n})
        return rows[-1]

    end = loop.run(3, 5, step, [Recorder("a", calls), Recorder("b", calls)], ctx="CTX")
    assert end.completed and end.last_step == 5 and end.stop is None
    per_step = lambda n: [("a", "before", n), ("b", "before", n), ("step", "run", n), ("a", "after", n),  # noqa: E731
                          ("b", "after", n)]
    assert calls == [("a", "start", "CTX"), ("b", "start", "CTX"), *per_step(4), *per_step(5),
                     ("b", "end", 5), ("a", "end", 5)]  # steps 4, 5 (1-based after step 3); ends in reverse order
    assert rows[0]["seen_by"] == ["a", "b"]  # one metrics dict, shared by the hooks in order


def test_a_stop_ends_the_run_after_that_step_and_skips_later_hooks():
    calls: list = []
    end = loop.run(0, 10, lambda n: {}, [Recorder("a", calls, stop_at=2), Recorder("b", calls)])
    assert end.stop == loop.Stop("a stops", code=7) and end.last_step == 2 and not end.completed
    assert ("b", "after", 2) not in calls and ("a", "before", 3) not in calls
    assert calls[-2:] == [("b", "end", 2), ("a", "end", 2)]


def test_an_error_still_ends_every_started_hook_then_propagates():
    calls: list = []

    def step(n: int) -> dict:
        if n == 2:
            raise RuntimeError("boom")
        return {}

    ends: list[loop.LoopEnd] = []

    class Keep(loop.BaseHook):
        def on_end(self, end: loop.LoopEnd) -> None:
            ends.append(end)

    with pytest.raises(RuntimeError, match="boom"):
        loop.run(0, 5, step, [Recorder("a", calls), Keep()])
    assert calls[-1] == ("a", "end", 1)
    assert isinstance(ends[0].error, RuntimeError) and ends[0].last_step == 1


def test_checkpoint_hook_saves_on_interval_at_the_end_and_on_a_stop_that_asks():
    saved: list[int] = []
    closed: list[bool] = []
    ck = loop.CheckpointHook(lambda n: n % 2 == 0, saved.append, lambda: closed.append(True), final=True)
    loop.run(0, 5, lambda n: {}, [ck])
    assert saved == [2, 4, 5] and closed == [True]
    saved.clear()
    stop = Recorder("s", [], stop_at=3, checkpoint=True)
    loop.run(0, 5, lambda n: {}, [loop.CheckpointHook(lambda n: False, saved.append, final=True), stop])
    assert saved == [3]  # the stop's step, not the last one
    saved.clear()
    loop.run(5, 5, lambda n: {}, [loop.CheckpointHook(lambda n: False, saved.append, final=True)])
    assert saved == []  # no step ran: nothing new to save


def test_eval_log_progress_and_signal_hooks():
    rows: list[dict] = []
    closed: list[bool] = []

    class Log:
        def write(self, row: dict) -> None:
            rows.append(dict(row))

        def close(self) -> None:
            closed.append(True)

    lines: list[str] = []
    hooks = [loop.EvalHook(lambda n: n == 2, lambda n: 0.5), loop.MetricsLogHook(Log()),
             loop.ProgressHook(lambda n, m: f"step {n}" if n != 1 else None, lines.append),
             loop.SignalHook(lambda: 15 if len(rows) == 3 else None, lambda n, sig: f"stopped {sig} after {n}")]
    end = loop.run(0, 9, lambda n: {"step": n}, hooks)
    assert rows == [{"step": 1}, {"step": 2, "val_loss": 0.5, "val_ppl": pytest.approx(1.6487, rel=1e-4)},
                    {"step": 3}]
    assert lines == ["step 2", "step 3"] and closed == [True]
    assert end.stop == loop.Stop("stopped 15 after 3", code=128 + 15, checkpoint=True)


def test_installed_hooks_are_added_only_while_installed():
    hook = loop.BaseHook()
    with loop.install(lambda trainer: hook if trainer == "jax" else None):
        assert loop.installed_hooks("jax") == [hook] and loop.installed_hooks("torch") == []
    assert loop.installed_hooks("jax") == []


FAULT_VARIABLES = ("AURORA_TEST_FAULT", "TORCH_REF_FAULT")


def _production_modules() -> list[Path]:
    return [p for pkg in ("jax_impl", "torch_ref", "runtime", "configs", "aurora_data", "compare", "weightmap")
            for p in sorted((ROOT / pkg).rglob("*.py"))]


def test_no_production_module_reads_a_fault_variable():
    """Faults are hooks installed by tests (tests/fault_runner.py), never environment branches in the trainers."""
    found = []
    for path in _production_modules():
        text = path.read_text()
        found += [f"{path.relative_to(ROOT)}: {v}" for v in FAULT_VARIABLES if v in text]
        for node in ast.walk(ast.parse(text)):  # nor any other name spelled like a fault switch
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith("_FAULT"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value}")
    assert not found, found
    assert len(_production_modules()) > 30  # the scan saw the packages
