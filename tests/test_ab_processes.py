"""benchmarks/ab_processes.py: refuses a directory that is not a project tree; runs two trees as process pairs."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import ab_processes  # noqa: E402


def test_refuses_a_directory_that_is_not_a_project_tree(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        ab_processes.main(["--a", str(tmp_path), "--b", str(ROOT)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path.resolve()) in err and "git worktree add" in err


@pytest.mark.slow
def test_two_trees_as_process_pairs(capsys):
    ab_processes.main(["--a", str(ROOT), "--b", str(ROOT), "--preset", "tiny", "--rounds", "1", "--steps", "3"])
    out = capsys.readouterr().out
    assert "B/A median" in out
    m = re.search(r"round 1: A +([\d.]+) ms +B +([\d.]+) ms .*last loss A ([\d.]+), B ([\d.]+)", out)
    assert m, out
    assert float(m.group(1)) > 0 and float(m.group(2)) > 0
    assert m.group(3) == m.group(4)  # one tree twice: the same losses


@pytest.mark.parametrize("flag", ["--set", "--set-a", "--set-b"])
def test_refuses_a_setting_the_trainers_would_not_get(capsys, flag):
    with pytest.raises(SystemExit) as exc:
        ab_processes.main(["--a", str(ROOT), "--b", str(ROOT), flag, "checkpoint.every=5"])
    assert exc.value.code == 2
    assert f"{flag} 'checkpoint.every=5'" in capsys.readouterr().err
