"""Wait on a group of local worker processes the way a launcher must: pass signals on, blame the right one.

Every local launcher uses it: ``torch_ref.train``'s (one process per rank), ``compare.report``'s (the
trainers, or the ranks of a multi-process JAX run), and the tests' multi-process runs (``start``: each
process's environment and log files, then ``ProcessGroup.wait``).

- SIGTERM / SIGINT received by the launcher while it waits are sent on to every worker still running, and
  the launcher keeps waiting until all of them have exited (each saves its checkpoint first), so no worker
  is left behind re-parented to init, training on. A second signal kills the workers (SIGKILL).
- The first failure is the one that caused the others: a worker killed by a signal the launcher did not
  send (kill -9, the OOM killer), else the first to exit non-zero in time order. Its peers' errors come
  after it ("Connection closed by peer" from gloo) and are consequences.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

FORWARDED = (signal.SIGTERM, signal.SIGINT)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for the coordinator of a group started here."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ProcessGroup:
    """Local worker processes, rank = index in ``procs``."""

    procs: Sequence[subprocess.Popen]
    poll_s: float = 0.1
    received: int | None = None  # the signal the launcher got (and forwarded), if any
    exits: list[tuple[int, int]] = field(default_factory=list)  # (rank, exit code) in the order seen
    stopped: set[int] = field(default_factory=set)  # ranks this launcher stopped (after a failure or the deadline)

    @property
    def codes(self) -> dict[int, int | None]:
        return {r: p.poll() for r, p in enumerate(self.procs)}

    def _observe(self) -> None:
        seen = {r for r, _ in self.exits}
        batch = [(r, c) for r, c in self.codes.items() if c is not None and r not in seen]
        # exits seen in the same poll: a rank killed by a signal first (its peers fail because it is gone)
        batch.sort(key=lambda rc: (not self._killed(*rc), rc[0]))
        self.exits.extend(batch)

    def _killed(self, rank: int, code: int) -> bool:
        """Killed by a signal that was not this launcher's doing."""
        return code < 0 and rank not in self.stopped and -code != self.received

    def _send(self, sig: int, stopping: bool = False) -> None:
        for r, p in enumerate(self.procs):
            if p.poll() is None:
                if stopping:
                    self.stopped.add(r)
                try:
                    p.kill() if sig == signal.SIGKILL else p.send_signal(sig)
                except ProcessLookupError:
                    pass

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.received is None:
            self.received = signum
            self._send(signum)
        else:  # asked twice: stop waiting for the checkpoints
            self._send(signal.SIGKILL, stopping=True)

    def wait(self, deadline: float | None = None, stop_on_failure: bool = True, failure_grace_s: float = 1.0,
             stop_grace_s: float = 5.0, kill_on_stop: bool = False) -> None:
        """Wait until every worker exited, or until one failed (``stop_on_failure``) or ``deadline`` (a
        ``time.monotonic()`` value) passed; then stop those still running (SIGTERM, SIGKILL after
        ``stop_grace_s``; SIGKILL at once with ``kill_on_stop``). After a failure the others get
        ``failure_grace_s`` first, so that those that saw it record theirs. A signal to the launcher is
        forwarded, and then the wait is for every worker, without a deadline."""
        main = threading.current_thread() is threading.main_thread()
        old = {s: signal.signal(s, self._on_signal) for s in FORWARDED} if main else {}
        try:
            while True:
                self._observe()
                if all(p.poll() is not None for p in self.procs):
                    break
                if self.received is None:
                    failed = stop_on_failure and any(c != 0 for _, c in self.exits)
                    if failed or (deadline is not None and time.monotonic() > deadline):
                        if failed:
                            end = time.monotonic() + failure_grace_s
                            while time.monotonic() < end and any(p.poll() is None for p in self.procs):
                                time.sleep(self.poll_s)
                            self._observe()
                        break
                time.sleep(self.poll_s)
        finally:
            self.stop(stop_grace_s, kill=kill_on_stop)  # after a failure, the deadline, or the launcher's own error
            for s, h in old.items():
                signal.signal(s, h)
        self._observe()

    def stop(self, grace_s: float = 5.0, kill: bool = False) -> None:
        """Terminate the workers still running (by their own pids), then kill those that ignore it."""
        alive = [p for p in self.procs if p.poll() is None]
        if not alive:
            return
        self._send(signal.SIGKILL if kill else signal.SIGTERM, stopping=True)
        end = time.monotonic() + grace_s
        for p in alive:
            while p.poll() is None and time.monotonic() < end:
                time.sleep(0.05)
            if p.poll() is None:
                p.kill()
            p.wait()

    def first_failure(self) -> int | None:
        """The rank whose failure the others followed (see the module docstring); None if none failed."""
        killed = [r for r, c in self.exits if self._killed(r, c)]
        if killed:
            return killed[0]
        stopped_ok = (0,) if self.received is None else (0, 128 + self.received, -self.received)
        return next((r for r, c in self.exits if c not in stopped_ok and r not in self.stopped), None)

    def stopped_cleanly(self) -> bool:
        """After a forwarded signal: every worker exited 0 or 128 + that signal (it saved and stopped)."""
        return self.received is not None and all(
            c in (0, 128 + self.received, -self.received) for c in self.codes.values())

    def describe(self, rank: int) -> str:
        code = self.codes[rank]
        if code is not None and code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit {code}"



Log = Path | tuple[Path, Path]


def start(argvs: Sequence[Sequence[str]], envs: Sequence[Mapping[str, str]], *, cwd: str | Path | None = None,
          logs: Sequence[Log] | None = None, poll_s: float = 0.1) -> ProcessGroup:
    """Start process ``i`` as ``argvs[i]`` with exactly the environment ``envs[i]``; its output goes to
    ``logs[i]`` (one file for stdout and stderr, or an (out, err) pair of files) or, without ``logs``, to this
    process's. Files, not pipes: a launcher that only polls would let a full pipe stall its child. If one
    cannot start, those already started are killed before the error propagates."""
    if len(argvs) != len(envs) or (logs is not None and len(logs) != len(argvs)):
        raise ValueError(f"{len(argvs)} commands, {len(envs)} environments and "
                         f"{'no' if logs is None else len(logs)} logs: give one of each per process")
    procs: list[subprocess.Popen] = []
    try:
        for i, (argv, env) in enumerate(zip(argvs, envs, strict=True)):
            with ExitStack() as files:  # the child holds its own descriptors; ours close once it started
                out = err = None
                if logs is not None:
                    log = logs[i]
                    out_path, err_path = log if isinstance(log, tuple) else (log, None)
                    out = files.enter_context(Path(out_path).open("w"))
                    err = files.enter_context(Path(err_path).open("w")) if err_path else subprocess.STDOUT
                procs.append(subprocess.Popen(list(argv), cwd=cwd, env=dict(env), stdout=out, stderr=err))
    except BaseException:
        ProcessGroup(procs).stop(kill=True)
        raise
    return ProcessGroup(procs, poll_s=poll_s)
