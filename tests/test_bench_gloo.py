"""benchmarks/gloo_collectives.py: times each collective across two processes; a shape it cannot split is refused."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gloo_collectives  # noqa: E402


def test_every_collective_is_timed_across_two_processes(capsys):
    gloo_collectives.main(["--reps", "2", "--shape", "2,256"])
    out = capsys.readouterr().out
    assert out.startswith("2 processes, one CPU device each, gloo")
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+) +2x256 fp32  median +([\d.]+) ms", out, re.M)}
    assert set(rows) == set(gloo_collectives.OPS) and min(rows.values()) > 0, out


def test_a_shape_the_processes_cannot_split_is_refused():
    with pytest.raises(SystemExit, match=r"make it a multiple of 2"):
        gloo_collectives.main(["--reps", "1", "--shape", "3,256"])


def test_one_process_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        gloo_collectives.main(["--processes", "1"])
    assert exc.value.code == 2 and "at least 2" in capsys.readouterr().err
