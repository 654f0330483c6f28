"""Failure handling for long runs: non-finite guard, step watchdog, preemption signals.

- ``compile_guarded``: the trainer's step (``guard=True``), but a step whose loss or gradient norm is not finite leaves
  params and optimizer state unchanged (inside the same jit, buffers still donated). The loop then
  stops (default) or skips the step (``--on-nonfinite skip``); ``diagnose_nonfinite`` names the first
  non-finite parameter and gradient from the kept pre-step state.
- ``Watchdog``: a daemon thread timing each step. A step running longer than ``factor`` x the median
  of the finished steps (never less than ``min_s``; the first step, which compiles, gets
  ``first_s``) -- a slow step or a collective that never returns -- dumps every thread's stack
  (faulthandler) to stderr and ``<run>/watchdog.txt`` and ends the process with exit code 75:
  a peer that hangs in C++ cannot be interrupted any other way.
- ``StopSignal``: SIGTERM/SIGINT (a scheduler's preemption, Ctrl-C) set a flag the loop reads at the
  end of a step: it saves a checkpoint and exits 128+signal. In a multi-process run the flag is
  OR-reduced over processes every step, so all of them stop at the same step.
- ``WatchdogHook``: the watchdog as a hook of the training loop (``runtime.loop``).

Faults for tests (a planted inf, a stalled step, a signal, a bad batch) are hooks the tests install
(``runtime.loop.install``; tests/fault_runner.py for a trainer run as a process).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jax_impl.checkpoint import path_name
from runtime.loop import BaseHook

WATCHDOG_EXIT = 75  # EX_TEMPFAIL: "try again" for a requeueing job script


# ----------------------------------------------------------------------------- non-finite guard
def compile_guarded(trainer) -> Any:
    """The trainer's step with its finiteness guard, compiled ahead of time."""
    return trainer.compile_step(guard=True)


def first_nonfinite(tree: Any) -> str | None:
    """Name of the first leaf (in tree order) holding a NaN or inf, or None. Every leaf's flag comes from one
    compiled call, not one eager multi-device reduction per leaf."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    flags = jax.device_get(jax.jit(lambda ls: [~jnp.all(jnp.isfinite(a)) for a in ls])([a for _, a in flat]))
    return next((path_name(p) for (p, _), bad in zip(flat, flags, strict=True) if bool(bad)), None)


def diagnose_nonfinite(trainer, params: Any, batch: jax.Array) -> dict[str, str | None]:
    """First non-finite parameter and gradient of ``params`` (the kept pre-step state) on ``batch``."""
    from jax_impl.sharding import activate

    with activate(trainer.mesh):
        grads = jax.jit(lambda p, b: jax.tree.map(
            lambda *g: sum(g) / len(g), *[jax.grad(trainer.loss_fn)(p, b[i]) for i in range(b.shape[0])]))(
            params, batch)
        return {"param": first_nonfinite(params), "grad": first_nonfinite(grads)}


# ----------------------------------------------------------------------------- watchdog
class Watchdog:
    """Kills a process whose current step outlives ``max(min_s, factor * median)`` (``first_s`` for step 1)."""

    def __init__(self, factor: float = 10.0, min_s: float = 60.0, first_s: float = 1800.0,
                 report: Path | None = None, exit_code: int = WATCHDOG_EXIT, poll_s: float = 0.2):
        self.factor, self.min_s, self.first_s = factor, min_s, first_s
        self.report, self.exit_code, self.poll_s = report, exit_code, poll_s
        self.times: list[float] = []
        self.first_step = 1  # the loop sets the first step it runs (a resumed run starts later)
        self._step: int | None = None
        self._t0 = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def limit(self) -> float:
        if not self.times:
            return self.first_s
        return max(self.min_s, self.factor * statistics.median(self.times[-50:]))

    def start(self, step: int) -> None:
        with self._lock:
            self._step, self._t0 = step, time.monotonic()

    def done(self, seconds: float | None = None) -> None:
        with self._lock:
            dt = time.monotonic() - self._t0 if seconds is None else seconds
            if self._step is not None and self._step > self.first_step:  # the first includes warm-up
                self.times.append(dt)
            self._step = None

    def pause(self) -> None:
        """Not timing (checkpoint saves, evaluation)."""
        with self._lock:
            self._step = None

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                step, t0, limit = self._step, self._t0, self.limit()
            if step is not None and time.monotonic() - t0 > limit:
                self._fire(step, time.monotonic() - t0, limit)

    def _fire(self, step: int, elapsed: float, limit: float) -> None:
        med = statistics.median(self.times[-50:]) if self.times else float("nan")
        msg = (f"\nwatchdog: step {step} has run {elapsed:.1f}s, over its limit {limit:.1f}s "
               f"(max(min {self.min_s}s, {self.factor:g} x median {med:.3f}s); first step {self.first_s}s) "
               f"-- a stalled collective, a lost peer or a hung device. process {jax.process_index()} "
               f"pid {os.getpid()}; stacks of all threads follow; exiting with code {self.exit_code}\n")
        sys.stderr.write(msg)
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        if self.report is not None:
            try:
                with open(self.report, "w") as f:
                    f.write(msg)
                    faulthandler.dump_traceback(file=f, all_threads=True)
            except OSError:
                pass
        sys.stderr.flush()
        os._exit(self.exit_code)  # the main thread may be blocked in C++: nothing else would end it


class WatchdogHook(BaseHook):
    """Times each step of the training loop with ``watchdog`` (``enabled``: False leaves it idle)."""

    def __init__(self, watchdog: Watchdog, enabled: bool = True) -> None:
        self.watchdog, self.enabled = watchdog, enabled

    def before_step(self, step: int) -> None:
        if self.enabled:
            self.watchdog.start(step)

    def after_step(self, step: int, metrics: dict[str, Any]) -> None:
        self.watchdog.done(metrics["step_time_s"])


# ----------------------------------------------------------------------------- signals
class StopSignal:
    """SIGTERM/SIGINT -> a flag the train loop reads between steps (handlers restored on exit)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint at the end of this step, then exiting",
              file=sys.stderr, flush=True)

    def agreed(self) -> int | None:
        """The signal, agreed across processes (any process signalled -> all stop at this step)."""
        if jax.process_count() == 1:
            return self.signum
        import numpy as np
        from jax.experimental import multihost_utils

        got = multihost_utils.process_allgather(np.int32(self.signum or 0))
        return int(np.max(got)) or None
