"""The user documentation stays a manual: no work-diary language, and every README command runs as written.

README.md's commands (code blocks and inline ``python -m ...`` spans) are parsed, and every ``--flag`` is
checked against ``--help`` of the module or script it is given to (a subcommand's own ``--help`` too);
``--section.key`` config overrides are checked against the config schema.
"""

import dataclasses
import functools
import re
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from configs.schema import Config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted([README, *(ROOT / "docs").rglob("*.md"), *(ROOT / "benchmarks").rglob("README.md")])

# how the work was organised is not the software's business: dates and machines identify measurements
DIARY = re.compile(r"\bsessions?\b|not drawn|\blent\b|the issue asked|work period|§\s*\d|\bissue #?\d+"
                   r"|\d{4}-\d\d-\d\d-s\d+\b", re.IGNORECASE)
PYTHON = re.compile(r"^(?:\S*/)?python3?(?:\.\d+)?$")
# modules whose argv takes --section.key=value config overrides (configs.cli)
OVERRIDES = {"jax_impl.train", "torch_ref.train", "torch_ref.memplan", "scripts.aurora.launch", "jax_impl.checkpoint"}


def test_docs_do_not_speak_of_work_periods_or_loaned_machines():
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in DOCS
            for n, line in enumerate(p.read_text().splitlines(), 1) if DIARY.search(line)]
    assert not hits, "\n".join(hits)


def _commands(text: str) -> list[str]:
    """Shell lines of the fenced code blocks (continuations joined, comments dropped) and inline
    `python -m ...` spans."""
    lines = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                lines.append(line)
    lines += re.findall(r"`((?:\S*/)?python3? -m [^`]+)`", text)
    return lines


def _invocations(text: str) -> list[tuple[str, list[str]]]:
    """(module or script, its arguments) for every python command in the README."""
    out = []
    for line in _commands(text):
        try:
            toks = shlex.split(line)
        except ValueError:
            toks = line.split()
        for i, t in enumerate(toks[:-1]):
            if not PYTHON.match(t):
                continue
            if toks[i + 1] == "-m" and i + 2 < len(toks):
                target, args = toks[i + 2], toks[i + 3:]
            elif toks[i + 1].endswith(".py"):
                target, args = toks[i + 1], toks[i + 2:]
            else:
                continue
            args = [a.strip("[]") for a in args]
            end = next((k for k, a in enumerate(args) if a in ("|", "&&", ";", ">", "2>&1")), len(args))
            out.append((target, args[:end]))
    return out


@functools.cache
def _help(target: str, *sub: str) -> str:
    cmd = [sys.executable, *(["-m", target] if not target.endswith(".py") else [target]), *sub, "--help"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(cmd[1:])} failed:\n{r.stderr[-2000:]}"
    return r.stdout


def _override_ok(flag: str) -> bool:
    section, _, key = flag[2:].partition(".")
    cls = typing.get_type_hints(Config).get(section)
    return dataclasses.is_dataclass(cls) and key in {f.name for f in dataclasses.fields(cls)}


def _bad_flags(target: str, args: list[str]) -> list[str]:
    flags = [a.split("=", 1)[0] for a in args if a.startswith("--")]
    if not flags:
        return []
    text = _help(target)
    subs = re.search(r"\{([\w,-]+)\}", text.split("\n\n")[0])  # usage line: {info,export,import}
    first = next((a for a in args if not a.startswith("-")), None)
    if subs and first in subs.group(1).split(","):
        text += _help(target, first)
    known = set(re.findall(r"--[A-Za-z0-9][\w.-]*", text))
    bad = []
    for f in flags:
        if f in known:
            continue
        if "." in f and target in OVERRIDES and _override_ok(f):
            continue
        if f.startswith("--cluster.") and target == "compare.plan":
            from compare.cluster import Cluster

            if f.removeprefix("--cluster.") in {x.name for x in dataclasses.fields(Cluster)}:
                continue
        bad.append(f"python {'-m ' if not target.endswith('.py') else ''}{target} ... {f}")
    return bad


def test_readme_commands_use_flags_their_cli_accepts():
    calls = _invocations(README.read_text())
    assert len({t for t, _ in calls}) >= 5, calls  # the parser found the README's commands
    bad = [b for target, args in calls for b in _bad_flags(target, args)]
    assert not bad, "README names flags its CLIs do not accept:\n" + "\n".join(bad)


def test_docs_commands_use_flags_their_cli_accepts():
    bad = [f"{p.relative_to(ROOT)}: {b}" for p in DOCS if p != README
           for target, args in _invocations(p.read_text()) for b in _bad_flags(target, args)]
    assert not bad, "\n".join(bad)


def test_the_checker_catches_a_removed_flag_and_a_wrong_override():
    text = "```bash\n.venv/bin/python -m jax_impl.train --preset tiny --no-such-flag 3   # comment --ignored\n```\n"
    ((target, args),) = _invocations(text)
    assert target == "jax_impl.train" and "--ignored" not in args
    assert _bad_flags(target, args) == ["python -m jax_impl.train ... --no-such-flag"]
    assert _bad_flags(target, ["--parallel.hpz=true", "--model.n_layers=4"]) == []
    assert _bad_flags(target, ["--parallel.no_such_key=1"]) == ["python -m jax_impl.train ... --parallel.no_such_key"]


@pytest.mark.parametrize("line", ["Sess|ion 9 measured it", "on a le|nt H200", "see §|13", "the iss|ue asked for",
                                  "benchmarks/results/cpu-2026-11-27-s|9/"])
def test_the_diary_pattern_catches(line):
    assert DIARY.search(line.replace("|", ""))  # split so that a grep of this file stays clean


def test_results_paths_named_in_the_docs_exist():
    named = {m.rstrip("/.,)`") for p in DOCS for m in re.findall(r"benchmarks/results/[\w./-]+", p.read_text())}
    missing = sorted(m for m in named if not (ROOT / m).exists())
    assert not missing, missing
