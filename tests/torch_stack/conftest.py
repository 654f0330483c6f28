"""The torch-stack tier (marker ``torch_stack``): runs only when selected with ``-m torch_stack``.

It is meant for its own environment (``make test-torch210``: Python 3.12, torch 2.10, no JAX);
a plain ``pytest`` elsewhere collects and skips it. Prints how long the tier took.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
_T0 = time.monotonic()
_SELECTED = re.compile(r"(?<!not )\btorch_stack\b")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _SELECTED.search(config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="torch-stack tier: make test-torch210 (or pytest -m torch_stack)")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not _SELECTED.search(config.getoption("markexpr") or ""):
        return
    import deepspeed
    import torch

    stats = terminalreporter.stats
    counts = ", ".join(f"{len(stats[k])} {k}" for k in ("passed", "failed", "error", "skipped") if stats.get(k))
    terminalreporter.write_line(f"torch-stack tier: {counts or 'no tests'} in {time.monotonic() - _T0:.0f} s "
                                f"(torch {torch.__version__}, deepspeed {deepspeed.__version__})")
