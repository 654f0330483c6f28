"""torch_ref.stack: pin files read and checked against the installed packages, bad input named (exit 2)."""

from __future__ import annotations

import importlib.metadata as md

import pytest

from torch_ref import stack


def test_read_pins_skips_comments_and_names_a_bad_line(tmp_path):
    f = tmp_path / "pins.txt"
    f.write_text("# header\nTorch==2.10.0  # the module's\n\ndeepspeed==0.19.8\n")
    assert stack.read_pins(f) == {"torch": "2.10.0", "deepspeed": "0.19.8"}
    f.write_text("torch==2.10.0\ndeepspeed>=0.18\n")
    with pytest.raises(ValueError, match=r"pins\.txt:2: 'deepspeed>=0\.18' is not a name==version pin"):
        stack.read_pins(f)


def test_check_names_each_mismatch():
    torch_v = md.version("torch")
    public = torch_v.split("+")[0]
    assert stack.check({"torch": public, "deepspeed": md.version("deepspeed")}) == []  # local tag ignored
    assert stack.check({"torch": "0.0.1", "no-such-package-here": "1.0"}) == [
        f"torch {torch_v} is installed; the pin is torch==0.0.1",
        "no-such-package-here==1.0 is pinned but not installed",
    ]


def test_main_exits_2_on_a_mismatch_and_reports_the_stack(tmp_path, capsys):
    good = tmp_path / "good.txt"
    good.write_text(f"deepspeed=={md.version('deepspeed')}\n")
    out = stack.main(["--expect", str(good)])
    assert out["problems"] == [] and out["ipex_imported"] is False and out["backend"] == "gloo"
    bad = tmp_path / "bad.txt"
    bad.write_text("deepspeed==0.0.1\n")
    with pytest.raises(SystemExit) as e:
        stack.main(["--expect", str(bad)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"does not match {bad}" in err and "the pin is deepspeed==0.0.1" in err
    with pytest.raises(SystemExit) as e:
        stack.main(["--expect", str(tmp_path / "missing.txt")])
    assert e.value.code == 2 and "missing.txt" in capsys.readouterr().err
