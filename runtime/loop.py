"""The training loop both trainers run: steps driven by ``run``, everything around a step done by hooks.

A trainer supplies ``step(n)`` (its framework code: one optimizer step, returning the step's metrics) and an
ordered list of hooks: metrics rows and progress lines, checkpoints, the non-finite guard, the watchdog, signals,
evaluation. ``run`` calls, for steps ``first + 1 .. last`` (1-based, as in ``metrics.jsonl``):

    on_start(ctx)                      every hook, in order, once
    before_step(n)                     every hook, in order
    metrics = step(n)
    after_step(n, metrics) -> Stop?    every hook, in order, until one returns a Stop
    on_end(end)                        every started hook, in reverse order (as nested ``with`` blocks unwind),
                                       also when a step or a hook raised (``end.error``)

``ctx`` is the trainer's own run state (parameters, the batch, the rank, ...), opaque to this module. Hooks share
the metrics dict: one may add keys (evaluation adds ``val_loss``) that the later ones read. A hook that returns
a ``Stop`` ends the run after that step; the hooks after it are not called for that step. Nothing here imports
jax or torch.

Hooks added by ``install`` (tests inject faults this way) are appended by the trainers to their own list.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Stop:
    """A hook's request to end the run after the current step.

    ``reason``: the message the trainer reports; ``code``: the exit code it ends with (None: a normal end);
    ``checkpoint``: whether the checkpoint hook saves the state of this step before the run ends."""

    reason: str
    code: int | None = None
    checkpoint: bool = False


@dataclass
class LoopEnd:
    """How ``run`` ended: the last step that finished (``first`` when none did), the stop requested if any, and
    the exception a step or hook raised (re-raised after ``on_end``)."""

    first: int
    last_step: int
    stop: Stop | None = None
    error: BaseException | None = None

    @property
    def completed(self) -> bool:
        """Every step ran (no stop, no error)."""
        return self.stop is None and self.error is None


@runtime_checkable
class Hook(Protocol):
    def on_start(self, ctx: Any) -> None: ...

    def before_step(self, step: int) -> None: ...

    def after_step(self, step: int, metrics: dict[str, Any]) -> Stop | None: ...

    def on_end(self, end: LoopEnd) -> None: ...


class BaseHook:
    """A hook that does nothing: subclasses override what they need."""

    def on_start(self, ctx: Any) -> None:
        pass

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, step: int, metrics: dict[str, Any]) -> Stop | None:
        return None

    def on_end(self, end: LoopEnd) -> None:
        pass


def run(first: int, last: int, step: Callable[[int], dict[str, Any]], hooks: Sequence[Hook],
        ctx: Any = None) -> LoopEnd:
    """Run steps ``first + 1 .. last`` with ``hooks`` (see the module docstring); returns how it ended.

    An exception from a step or a hook still reaches every started hook's ``on_end`` (with ``end.error`` set),
    then propagates unchanged."""
    end = LoopEnd(first=first, last_step=first)
    started: list[Hook] = []
    try:
        for h in hooks:
            h.on_start(ctx)
            started.append(h)
        for n in range(first + 1, last + 1):
            for h in hooks:
                h.before_step(n)
            metrics = step(n)
            end.last_step = n
            for h in hooks:
                end.stop = h.after_step(n, metrics)
                if end.stop is not None:
                    break
            if end.stop is not None:
                break
    except BaseException as e:
        end.error = e
        raise
    finally:
        _end_all(started, end)
    return end


def _end_all(started: list[Hook], end: LoopEnd) -> None:
    """``on_end`` of every started hook, last started first; the first exception among them is raised after all
    ran (one that is already propagating wins)."""
    failure: BaseException | None = None
    for h in reversed(started):
        try:
            h.on_end(end)
        except BaseException as e:
            failure = failure or e
    if failure is not None and end.error is None:
        raise failure


# ----------------------------------------------------------------------------- extra hooks
HookFactory = Callable[[str], "Hook | None"]
_installed: list[HookFactory] = []


@contextmanager
def install(factory: HookFactory) -> Iterator[None]:
    """While active, every training loop started in this process also runs ``factory(trainer)``'s hook
    (``trainer``: ``"jax"`` or ``"torch"``; a factory may return None to add nothing), after its own hooks."""
    _installed.append(factory)
    try:
        yield
    finally:
        _installed.remove(factory)


def installed_hooks(trainer: str) -> list[Hook]:
    """The hooks ``install`` added for ``trainer``, in installation order."""
    return [h for h in (f(trainer) for f in _installed) if h is not None]


# ----------------------------------------------------------------------------- hooks both trainers use
class EvalHook(BaseHook):
    """Adds ``val_loss`` and ``val_ppl`` to the metrics of a step where ``due(step)``: ``evaluate(step)`` is the
    validation loss after that step (a collective in a multi-process run: every process must call it)."""

    def __init__(self, due: Callable[[int], bool], evaluate: Callable[[int], float]):
        self.due, self.evaluate = due, evaluate

    def after_step(self, step: int, metrics: dict[str, Any]) -> Stop | None:
        if self.due(step):
            val = self.evaluate(step)
            metrics["val_loss"] = val
            metrics["val_ppl"] = math.exp(val) if val < 700 else None  # exp overflows past ~709
        return None


class MetricsLogHook(BaseHook):
    """Writes each step's metrics as a ``metrics.jsonl`` row (and to wandb): ``log`` is a ``runtime.rundir.MetricsLog``
    (or anything with ``write(row)`` and ``close()``), closed when the run ends, however it ends."""

    def __init__(self, log: Any):
        self.log = log

    def after_step(self, step: int, metrics: dict[str, Any]) -> Stop | None:
        self.log.write(metrics)
        return None

    def on_end(self, end: LoopEnd) -> None:
        self.log.close()


class ProgressHook(BaseHook):
    """Prints ``line(step, metrics)`` (None: nothing this step) through ``write``, then calls ``advance()`` (a
    progress bar's update); ``close`` (the bar's) runs when every step ran."""

    def __init__(self, line: Callable[[int, dict[str, Any]], str | None], write: Callable[[str], Any] = print,
                 close: Callable[[], Any] | None = None, advance: Callable[[], Any] | None = None):
        self.line, self.write, self.close, self.advance = line, write, close, advance

    def after_step(self, step: int, metrics: dict[str, Any]) -> Stop | None:
        text = self.line(step, metrics)
        if text is not None:
            self.write(text)
        if self.advance is not None:
            self.advance()
        return None

    def on_end(self, end: LoopEnd) -> None:
        if self.close is not None and end.completed:
            self.close()


class CheckpointHook(BaseHook):
    """Saves after a step where ``due(step)`` (the interval, a wall-clock deadline, ...), after the last step
    when ``final`` and every step ran, and at the stop step when a ``Stop`` asks for it; then ``close()``
    (waits for background writes). ``save(step)`` is the trainer's and may skip a step already saved."""

    def __init__(self, due: Callable[[int], bool], save: Callable[[int], Any], close: Callable[[], Any] | None = None,
                 final: bool = False):
        self.due, self.save, self.close, self.final = due, save, close, final

    def after_step(self, step: int, metrics: dict[str, Any]) -> Stop | None:
        if self.due(step):
            self.save(step)
        return None

    def on_end(self, end: LoopEnd) -> None:
        if end.error is None:
            if end.stop is not None and end.stop.checkpoint:
                self.save(end.last_step)
            elif end.completed and self.final and end.last_step > end.first:
                self.save(end.last_step)
        if self.close is not None:
            self.close()


class SignalHook(BaseHook):
    """Ends the run after a step in which ``agreed()`` (a signal number, agreed by every process; None or 0:
    none) says SIGTERM/SIGINT arrived: a ``Stop`` with exit code 128 + signal and ``message(step, signum)``."""

    def __init__(self, agreed: Callable[[], int | None], message: Callable[[int, int], str],
                 checkpoint: bool = True):
        self.agreed, self.message, self.checkpoint = agreed, message, checkpoint

    def after_step(self, step: int, metrics: dict[str, Any]) -> Stop | None:
        sig = self.agreed()
        if not sig:
            return None
        return Stop(self.message(step, sig), code=128 + sig, checkpoint=self.checkpoint)
