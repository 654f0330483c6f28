"""runtime/rundir.py, the run directory both trainers share: the lock, strict-JSON metrics, torn lines, set-aside."""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from configs import load_config
from runtime.rundir import (
    LOCK_FILE,
    MetricsLog,
    RunDirBusy,
    lock_run_dir,
    read_metrics,
    set_aside,
    truncate_metrics,
)

ROOT = Path(__file__).resolve().parents[1]


def _raise_on_constant(name: str):
    raise ValueError(f"bare {name} is not JSON")


def test_nonfinite_metrics_are_strict_json_and_read_back_as_floats(tmp_path):
    log = MetricsLog(tmp_path, load_config("tiny", {"train.wandb": "disabled"}), "jax")
    log.write({"step": 1, "loss": math.nan, "grad_norm": math.inf, "lr": -math.inf})
    log.write({"step": 2, "loss": 1.5})
    log.close()
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=_raise_on_constant)  # strict: no bare NaN / Infinity
    rows = read_metrics(tmp_path)
    assert math.isnan(rows[0]["loss"]) and rows[0]["grad_norm"] == math.inf and rows[0]["lr"] == -math.inf
    assert rows[1]["loss"] == 1.5


def test_torn_last_line_is_dropped_with_a_warning(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    with pytest.warns(UserWarning, match="torn last line 2"):
        rows = read_metrics(tmp_path, allow_torn=True)
    assert rows == [{"step": 1, "loss": 2.0}]
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):  # a finished run's report reads strictly
        read_metrics(tmp_path)


def test_truncate_metrics_keeps_the_later_rows_aside_and_drops_a_torn_line(tmp_path):
    rows = [json.dumps({"step": s, "loss": float(s)}) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 6, "loss"')
    with pytest.warns(UserWarning, match="torn"):
        aside = truncate_metrics(tmp_path, 3)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert aside is not None and aside.name.startswith("metrics.abandoned-") and aside.parent == tmp_path
    assert [json.loads(line)["step"] for line in aside.read_text().splitlines()] == [4, 5]
    assert truncate_metrics(tmp_path, 3) is None  # nothing after step 3 any more: nothing set aside


def test_set_aside_moves_without_deleting(tmp_path):
    for n in ("4", "6"):
        (tmp_path / n).mkdir()
        (tmp_path / n / "data").write_bytes(n.encode())
    dest = set_aside(tmp_path, ["4", "6", "8"])  # 8 does not exist: skipped
    assert dest is not None and dest.name.startswith("abandoned-")
    assert sorted(p.name for p in dest.iterdir()) == ["4", "6"] and (dest / "6" / "data").read_bytes() == b"6"
    assert not (tmp_path / "4").exists() and set_aside(tmp_path, ["4"]) is None


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    code = ("import sys, time; from runtime.rundir import lock_run_dir; lock_run_dir(__import__('pathlib').Path("
            f"{str(run_dir)!r})); print('held', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def test_lock_refuses_a_second_run_naming_the_holder_and_frees_on_kill9(tmp_path):
    run = tmp_path / "r"
    holder = _hold_lock(run)
    try:
        with pytest.raises(RunDirBusy) as e:
            lock_run_dir(run)
        assert f"pid {holder.pid} on host {platform.node()}" in str(e.value) and "another --name" in str(e.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = lock_run_dir(run)  # the kernel dropped the dead holder's lock: a requeue is never blocked
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


@pytest.mark.parametrize("trainer", ["jax_impl", "torch_ref"])
def test_trainer_refuses_a_locked_run_directory(tmp_path, trainer, capsys):
    """Refused before anything compiles or any worker starts: exit 2, the holder named, nothing written."""
    import importlib

    main = importlib.import_module(f"{trainer}.train").main
    run = tmp_path / "busy"
    holder = _hold_lock(run)
    try:
        with pytest.raises(SystemExit) as e:
            main(["--preset", "tiny", "--wandb", "disabled", "--quiet", "--steps", "2", "--mesh", "data=1",
                  "--out-dir", str(tmp_path), "--name", "busy"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"is in use by another run (pid {holder.pid}" in err, err
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # no config.json, no metrics
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["jax_impl", "torch_ref"])
def test_two_runs_started_at_once_in_one_directory(tmp_path, trainer):
    """Both started together: one trains, the other is refused (exit 2, naming the holder); every step once."""
    args = [sys.executable, "-m", f"{trainer}.train", "--preset", "tiny", "--wandb", "disabled", "--quiet",
            "--mesh", "data=1", "--steps", "8", "--ckpt-every", "4", "--out-dir", str(tmp_path), "--name", "c"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [o[1][-2000:] for o in outs]
    refused = outs[[p.returncode for p in procs].index(2)][1]
    assert "is in use by another run (pid" in refused and "Traceback" not in refused
    assert [r["step"] for r in read_metrics(tmp_path / "c")] == list(range(1, 9))
