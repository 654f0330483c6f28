"""``python -m torch_ref.stack``: the torch stack this interpreter runs, checked against pin files.

    python -m torch_ref.stack --expect configs/aurora/torch-env.txt      # on Aurora, after make aurora-torch-env
    python -m torch_ref.stack --expect configs/aurora/torch210-ci.txt    # the CPU emulation (make test-torch210)

Prints Python, torch and DeepSpeed versions, DeepSpeed's accelerator and communication backend,
whether JAX is installed and whether anything imported intel-extension-for-pytorch (nothing here
should: torch reaches Intel GPUs through ``torch.xpu``, DeepSpeed >= 0.18.7 without IPEX). With
``--expect FILE`` every ``name==version`` line of FILE must match what is installed (torch by its
public version: ``2.10.0+xpu`` matches ``torch==2.10.0``) and DeepSpeed's own requirements must be
met; otherwise it names each mismatch and exits 2.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import platform
import sys
from pathlib import Path
from typing import Any


def read_pins(path: str | Path) -> dict[str, str]:
    """``name==version`` lines of a requirements file (comments and blank lines skipped), names lower-cased."""
    pins: dict[str, str] = {}
    for n, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise ValueError(f"{path}:{n}: {raw.strip()!r} is not a name==version pin")
        pins[name.strip().lower()] = version.strip()
    return pins


def installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _public(version: str) -> str:
    return version.split("+", 1)[0]


def check(pins: dict[str, str]) -> list[str]:
    """What differs from PINS, and DeepSpeed's unmet requirements; empty when the stack is as pinned."""
    from packaging.requirements import Requirement

    problems = []
    for name, want in pins.items():
        got = installed(name)
        if got is None:
            problems.append(f"{name}=={want} is pinned but not installed")
        elif _public(got) != want:
            problems.append(f"{name} {got} is installed; the pin is {name}=={want}")
    ds_requires = (md.requires("deepspeed") or []) if installed("deepspeed") else []
    for spec in ds_requires:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate():
            continue
        got = installed(req.name)
        if got is None or not req.specifier.contains(_public(got), prereleases=True):
            problems.append(f"deepspeed needs {req}; installed: {got or 'none'}")
    return problems


def report() -> dict[str, Any]:
    """Versions and the accelerator DeepSpeed picks, read in this process."""
    import torch

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "deepspeed": installed("deepspeed"), "xpu_available": bool(
                               hasattr(torch, "xpu") and torch.xpu.is_available())}
    if out["deepspeed"]:
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        out.update(accelerator=acc.device_name(), backend=acc.communication_backend_name())
    out["jax_installed"] = importlib.util.find_spec("jax") is not None
    out["ipex_imported"] = "intel_extension_for_pytorch" in sys.modules
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m torch_ref.stack", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--expect", action="append", default=[], type=Path, help="a pin file to check (repeatable)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    try:
        if importlib.util.find_spec("torch") is None:
            raise ValueError(f"torch is not importable by {sys.executable}; on Aurora run `module load "
                             "frameworks/2025.3.1` first (its torch is the one this stack builds on)")
        problems = [p for f in args.expect for p in check(read_pins(f))]
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    out = {**report(), "problems": problems}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(" | ".join(f"{k} {out[k]}" for k in ("python", "torch", "deepspeed", "accelerator", "backend",
                                                    "jax_installed", "ipex_imported") if k in out))
    if problems:
        print("error: the installed stack does not match " + ", ".join(map(str, args.expect)) + ":\n  "
              + "\n  ".join(problems), file=sys.stderr)
        raise SystemExit(2)
    return out


if __name__ == "__main__":
    main()
