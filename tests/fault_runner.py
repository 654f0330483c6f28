"""Faults for the trainers, injected as training-loop hooks (``runtime.loop.install``), for tests and benchmarks.

In-process: ``with faults("nan_param=layers.wq@3"): jax_impl.train.main(argv)``. As a process (a trainer whose
fault must fire inside a subprocess, e.g. the watchdog ending it):

    python tests/fault_runner.py "stall=600@5" jax --preset tiny ...     # jax_impl.train.cli(argv)
    python tests/fault_runner.py "raise=1@2" torch --preset tiny ...     # torch_ref.train, its workers too

Spec: comma-separated ``KIND[=VALUE]@STEP`` (steps 1-based): ``nan_param=layers.wq@3`` plants an inf in that
weight before step 3, ``stall=20@4`` sleeps 20 s inside step 4 (the watchdog is timing it), ``sigterm@5`` sends
SIGTERM to the process after step 5's row and progress line (it is seen at that step), ``bad_batch@6`` puts an
out-of-vocabulary token (a NaN embedding) into step 6's batch; torch: ``raise=R@S`` makes rank R raise before step S.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the project, not tests/, must come first
    sys.path.insert(0, str(ROOT))

from runtime import loop  # noqa: E402

RUNNER = Path(__file__).resolve()
KINDS = "nan_param=NAME@STEP, stall=SECONDS@STEP, sigterm@STEP, bad_batch@STEP, raise=RANK@STEP"


def parse_faults(spec: str) -> dict[str, Any]:
    """``"nan_param=layers.wq@3,stall=2.5@4"`` -> {"nan_param": ("layers.wq", 3), "stall": (2.5, 4)}; also
    ``"sigterm": step``, ``"bad_batch": step``, ``"raise": (rank, step)``."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        what, _, at = part.partition("@")
        key, _, val = what.partition("=")
        if key == "nan_param":
            out[key] = (val, int(at))
        elif key == "stall":
            out[key] = (float(val), int(at))
        elif key in ("sigterm", "bad_batch"):
            out[key] = int(at)
        elif key == "raise":
            out[key] = (int(val), int(at))
        else:
            raise ValueError(f"unknown fault {part!r} ({KINDS})")
    return out


def plant_inf(params: dict, name: str) -> dict:
    """``params`` with one element of parameter ``name`` (``layers.wq``) set to +inf."""
    import jax.numpy as jnp

    keys = name.split(".")
    leaf = params
    for k in keys:
        leaf = leaf[k]
    bad = leaf.at[(0,) * leaf.ndim].set(jnp.inf)
    out = dict(params)
    if len(keys) == 1:
        out[keys[0]] = bad
    else:
        out[keys[0]] = {**params[keys[0]], keys[1]: bad}
    return out


class JaxFaults(loop.BaseHook):
    """The faults of ``parse_faults`` in ``jax_impl.train``'s loop (ctx: its ``JaxRun``)."""

    def __init__(self, faults: dict[str, Any]) -> None:
        self.faults, self.run = faults, None

    def on_start(self, ctx: Any) -> None:
        self.run = ctx

    def before_step(self, step: int) -> None:
        import jax

        from jax_impl.sharding import batch_sharding

        r, f = self.run, self.faults
        if f.get("bad_batch") == step:  # a corrupt sample: token id >= vocab -> NaN embedding
            r.batch = jax.device_put(r.batch.at[0, 0, 0].set(r.cfg.model.padded_vocab + 7),
                                     batch_sharding(r.trainer.mesh))
        if f.get("nan_param", (None, -1))[1] == step:
            r.params = jax.device_put(plant_inf(r.params, f["nan_param"][0]), r.trainer.param_sh)
        if f.get("stall", (0, -1))[1] == step:
            time.sleep(f["stall"][0])  # a step that hangs (e.g. a lost peer)

    def after_step(self, step: int, metrics: dict[str, Any]) -> None:
        if self.faults.get("sigterm") == step:
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's preemption


class TorchFaults(loop.BaseHook):
    """``raise=R@S`` in ``torch_ref.train``'s worker loop (ctx: its ``TorchRun``)."""

    def __init__(self, faults: dict[str, Any]) -> None:
        self.faults, self.rank = faults, -1

    def on_start(self, ctx: Any) -> None:
        self.rank = ctx.rank

    def before_step(self, step: int) -> None:
        if self.faults.get("raise") == (self.rank, step):
            raise RuntimeError(f"injected fault on rank {self.rank} at step {step}")


@contextlib.contextmanager
def faults(spec: str) -> Iterator[None]:
    """Every training loop started in this process while active runs the faults of ``spec``."""
    parsed = parse_faults(spec)

    def factory(trainer: str) -> loop.Hook:
        return JaxFaults(parsed) if trainer == "jax" else TorchFaults(parsed)

    with loop.install(factory):
        yield


def worker_command(spec: str) -> list[str]:
    """The command ``torch_ref.train``'s launcher starts its workers with, so that they run the faults too."""
    return [sys.executable, str(RUNNER), spec, "torch"]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[1] not in ("jax", "torch"):
        raise SystemExit("usage: python tests/fault_runner.py SPEC jax|torch [trainer arguments]")
    spec, trainer, rest = args[0], args[1], args[2:]
    from runtime.hostmem import reexec_with_allocator

    reexec_with_allocator()  # as the trainers' own entry points
    with faults(spec):
        if trainer == "jax":
            from jax_impl import train

            train.cli(rest)
        else:
            from torch_ref import train

            train.WORKER_COMMAND = worker_command(spec)  # in the launcher: its workers run through here too
            train.cli(rest)


if __name__ == "__main__":
    main()
