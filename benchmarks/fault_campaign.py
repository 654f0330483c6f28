"""A fault campaign: kill a training run again and again, requeue it with ``--resume auto``, compare the end.

For each trainer (``jax``: ``jax_impl.train``, one process; ``torch``: ``torch_ref.train``, its launcher and
DeepSpeed ZeRO-1 workers) and each mode, one run of ``--steps`` steps with a checkpoint every ``--every``
steps is interrupted ``--kills`` times at random moments and after each one started again exactly as a
requeued job is: the same command with ``--resume auto``. The moments: the first fault comes before the first
checkpoint (during start-up or the first steps), the others at a random step or while a checkpoint is being
written (an orbax ``*.orbax-checkpoint-tmp-*`` directory, or a DeepSpeed tag newer than ``latest``).

Modes: ``sigkill`` (kill -9: the whole process group), ``sigterm`` (a scheduler's preemption: the JAX trainer
saves and exits 143; the torch processes get it as a group), ``corrupt`` (kill -9, then the newest
checkpoint's files are cut in half: ``--resume auto`` must fall back to the one before).

The finished run is compared with an uninterrupted one: every step 1..N logged exactly once, and the
per-step loss, gradient norm and consumed samples bit-identical (fp32, CPU). Reported per trainer and mode:
faults injected, faults survived (the next attempt resumed and trained, or finished), steps recomputed
(rows the attempts logged past their last checkpoint, kept in ``metrics.abandoned-*.jsonl``), bytes lost
(the bytes of the uninterrupted run's per-step records that are missing or differ at the end: must be 0).

    python -m benchmarks.fault_campaign --trainer jax --kills 20 --steps 40 --every 4
    python -m benchmarks.fault_campaign --trainer torch --kills 20 --modes sigkill
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODES = ("sigkill", "sigterm", "corrupt")
COMPARED = ("step", "loss", "grad_norm", "consumed_samples")  # what must be bit-identical per step
POLL_S = 0.002


@dataclass
class Result:
    trainer: str
    mode: str
    steps: int
    every: int
    faults_injected: int = 0
    faults_survived: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    attempts: int = 0
    steps_recomputed: int = 0
    fallbacks: int = 0  # resumes that skipped an unreadable newest checkpoint
    bytes_lost: int = 0
    steps_logged: list[int] = field(default_factory=list)
    bit_identical: bool = False
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.bit_identical and self.bytes_lost == 0 and self.faults_survived == self.faults_injected
                and self.steps_logged == list(range(1, self.steps + 1)) and not self.errors)


def command(trainer: str, out: Path, name: str, steps: int, every: int, extra: list[str]) -> list[str]:
    common = ["--preset", "tiny", "--wandb", "disabled", "--quiet", "--steps", str(steps), "--ckpt-every", str(every),
              "--out-dir", str(out), "--name", name, "--dtype", "fp32", "--platform", "cpu"]
    if trainer == "jax":
        # a few ms of compute per step, so that a random moment can fall inside a step or a save
        return [sys.executable, "-m", "jax_impl.train", *common, "--mbs", "64", "--ckpt-keep", "4", *extra]
    return [sys.executable, "-m", "torch_ref.train", *common, "--mesh", "data=2", "--zero", "1", "--mbs", "16",
            *extra]


def env_for(trainer: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONUNBUFFERED"] = "1"  # the attempt logs must hold what a killed process printed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if trainer == "torch":
        env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_ext"))
    return env


def rows_logged(run: Path) -> int:
    try:
        return (run / "metrics.jsonl").read_bytes().count(b"\n")
    except OSError:
        return 0


def unfinished(trainer: str, ck: Path) -> set[tuple[str, int]]:
    """(name, inode) of the checkpoints not finished: orbax tmp directories, DeepSpeed tags newer than ``latest``.
    Killed saves leave theirs behind; the inode tells a new save of the same step from the old leftover."""
    try:
        entries = [(p.name, p.stat().st_ino) for p in ck.iterdir()]
    except OSError:
        return set()
    if trainer == "jax":
        return {e for e in entries if ".orbax-checkpoint-tmp" in e[0]}
    from torch_ref.train import latest_tag, tag_step

    latest = latest_tag(ck)
    done = tag_step(latest) or 0 if latest else 0
    return {e for e in entries if (tag_step(e[0]) or 0) > done}


def inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def finished_ckpts(trainer: str, ck: Path) -> list[Path]:
    if trainer == "jax":
        from jax_impl.checkpoint import steps_in

        return [ck / str(s) for s in steps_in(ck)]
    from torch_ref.train import ckpt_tags, latest_tag, tag_step

    latest = latest_tag(ck)
    return [ck / t for t in ckpt_tags(ck) if latest and (tag_step(t) or 0) <= (tag_step(latest) or 0)]


def corrupt_newest(trainer: str, ck: Path) -> bool:
    """Cut the newest finished checkpoint's data files in half (only when an older one exists to fall back to)."""
    done = finished_ckpts(trainer, ck)
    if len(done) < 2:
        return False
    files = [f for f in done[-1].rglob("*") if f.is_file() and (("/d/" in str(f)) if trainer == "jax"
                                                               else f.name.endswith("optim_states.pt"))]
    for f in files:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return bool(files)


def stop(p: subprocess.Popen, sig: int, trainer: str) -> None:
    """The fault itself: the JAX trainer is one process; torch's launcher and workers are one process group."""
    try:
        if trainer == "torch":
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)
    except ProcessLookupError:
        pass


def attempt(trainer: str, cmd: list[str], run: Path, log: Path, fault: str | None, rng: random.Random,
            resumed_rows: int, steps: int, every: int, sig: int, timeout_s: float, min_rows: int = 0,
            max_advance: int | None = None) -> tuple[int, str | None]:
    """One attempt; if ``fault`` is set, interrupt it at a moment of that kind. Returns (exit code, the kind of
    moment it was stopped at; None if it was not stopped)."""
    ck = run / "checkpoints"
    with log.open("a") as lf:
        lf.write(f"\n$ {' '.join(cmd)}\n")
        lf.flush()
        p = subprocess.Popen(cmd, cwd=ROOT, env=env_for(trainer), stdout=lf, stderr=subprocess.STDOUT,
                             start_new_session=True)
    deadline = time.monotonic() + timeout_s
    target = min(steps - 1, max(min_rows, resumed_rows + rng.randint(1, max_advance or 2 * every)))
    # before the first checkpoint: after 0 .. every-1 logged steps (0: at a random time in start-up/compilation)
    first_rows, first_delay = rng.randint(0, every - 1), rng.uniform(0.5, 5.0)
    # what the previous attempt left: unfinished saves, and rows past its checkpoint until this attempt's resume
    # moves them aside (replacing metrics.jsonl: a new inode), so they are not counted as this attempt's steps
    left_saves, metrics_ino = unfinished(trainer, ck), inode(run / "metrics.jsonl")
    stale = rows_logged(run) > resumed_rows
    t0 = time.monotonic()
    kind = None
    while p.poll() is None and time.monotonic() < deadline:
        if fault is None:
            time.sleep(0.05)
            continue
        if stale and inode(run / "metrics.jsonl") == metrics_ino:
            n = resumed_rows  # not resumed yet: the rows in the file are the previous attempt's
        else:
            n, stale = rows_logged(run), False
        saving = bool(unfinished(trainer, ck) - left_saves)
        if fault == "before-first-checkpoint":
            if n >= first_rows and (first_rows or time.monotonic() - t0 >= first_delay):
                kind = fault if not finished_ckpts(trainer, ck) and not saving else "random-step"
        elif fault == "during-save":
            if n > resumed_rows and saving:
                kind = fault
            elif n >= min(steps - 1, resumed_rows + 3 * every):  # no save seen in time: a random step it is
                kind = "random-step"
        elif n >= target:  # (an attempt after the last step was saved only starts, restores and ends)
            kind = "random-step" if resumed_rows < steps else "restart-of-a-finished-run"
        if kind:
            stop(p, sig, trainer)
            break
        time.sleep(POLL_S)
    if time.monotonic() >= deadline and p.poll() is None:
        stop(p, signal.SIGKILL, trainer)
        p.wait()
        return -999, None
    rc = p.wait()
    if trainer == "torch":  # nothing of the group may outlive the attempt (it would write into the next one)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return rc, kind


def campaign(trainer: str, mode: str, kills: int, steps: int, every: int, seed: int, work: Path,
             reference: list[dict[str, Any]], timeout_s: float = 600.0) -> Result:
    from runtime.rundir import read_metrics

    rng = random.Random(f"{seed}-{trainer}-{mode}")
    res = Result(trainer, mode, steps, every)
    name = f"{trainer}-{mode}"
    run, log = work / name, work / f"{name}.log"
    cmd = command(trainer, work, name, steps, every, ["--resume", "auto"])
    sig = signal.SIGTERM if mode == "sigterm" else signal.SIGKILL
    t0 = time.monotonic()
    pending_fault = False  # the previous attempt was stopped by us: did this one survive it?
    while True:
        fault = None
        if res.faults_injected < kills:
            fault = "before-first-checkpoint" if res.faults_injected == 0 else rng.choice(("during-save",
                                                                                            "random-step"))
        resumed = max((int(p.name[len("global_step"):]) if trainer == "torch" else int(p.name)
                       for p in finished_ckpts(trainer, run / "checkpoints")), default=0)
        # corrupt mode: every other fault damages the newest checkpoint, so the run first goes on until a second
        # one is finished (the others are plain kills, so the run also moves forward)
        corrupt_next = mode == "corrupt" and fault is not None and res.faults_injected % 2 == 1
        if corrupt_next:
            fault = "random-step"
        # spread the faults over the run: a fault lets it advance by at most twice its share of the steps left
        # (a SIGTERM saves where it lands, so without this the run would be over long before the last fault)
        left = kills - res.faults_injected
        advance = max(1, min(2 * every, 2 * (steps - 1 - resumed) // (left + 1))) if fault else None
        res.attempts += 1
        rc, kind = attempt(trainer, cmd, run, log, fault, rng, resumed, steps, every, sig, timeout_s,
                           min_rows=resumed + every + 2 if corrupt_next else 0, max_advance=advance)
        if pending_fault:
            # survived: the attempt after a fault ran (until the next fault stopped it, or to the end)
            if kind is not None or rc == 0:
                res.faults_survived += 1
            else:
                res.errors.append(f"attempt {res.attempts} after a fault exited {rc} (see {log})")
                break
        if kind is not None:
            res.faults_injected += 1
            res.kinds[kind] = res.kinds.get(kind, 0) + 1
            if rc == 128 + signal.SIGTERM:  # the JAX trainer's graceful stop: it saved, then exited 143
                res.kinds["saved-on-sigterm"] = res.kinds.get("saved-on-sigterm", 0) + 1
            pending_fault = True
            if corrupt_next and corrupt_newest(trainer, run / "checkpoints"):
                res.kinds["newest-corrupted"] = res.kinds.get("newest-corrupted", 0) + 1
            continue
        pending_fault = False
        if rc == 0:
            break
        res.errors.append(f"attempt {res.attempts} exited {rc} without a fault (see {log})")
        break
    res.seconds = time.monotonic() - t0
    text = log.read_text()
    res.fallbacks = text.count("the newest readable")
    try:
        rows = read_metrics(run)
    except (OSError, ValueError) as e:
        res.errors.append(f"metrics unreadable: {e}")
        rows = []
    res.steps_logged = [r["step"] for r in rows]
    res.steps_recomputed = sum(len(f.read_text().splitlines()) for f in run.glob("metrics.abandoned-*.jsonl"))
    got = {r["step"]: r for r in rows}
    for ref in reference:
        want = json.dumps({k: ref[k] for k in COMPARED})
        have = got.get(ref["step"])
        if have is None or json.dumps({k: have[k] for k in COMPARED}) != want:
            res.bytes_lost += len(want)
    res.bit_identical = res.bytes_lost == 0 and len(rows) == len(reference)
    return res


def reference_run(trainer: str, steps: int, every: int, work: Path) -> list[dict[str, Any]]:
    from runtime.rundir import read_metrics

    cmd = command(trainer, work, f"{trainer}-reference", steps, every, [])
    subprocess.run(cmd, cwd=ROOT, env=env_for(trainer), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)
    return read_metrics(work / f"{trainer}-reference")


def report(results: list[Result]) -> str:
    head = (f"{'trainer':<7} {'mode':<8} {'faults':>6} {'survived':>8} {'attempts':>8} {'recomputed':>10} "
            f"{'fallbacks':>9} {'bytes lost':>10} {'identical':>9}  moments")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.trainer:<7} {r.mode:<8} {r.faults_injected:>6} {r.faults_survived:>8} {r.attempts:>8} "
                     f"{r.steps_recomputed:>10} {r.fallbacks:>9} {r.bytes_lost:>10} {r.bit_identical!s:>9}  "
                     + ", ".join(f"{k} {v}" for k, v in sorted(r.kinds.items())))
        lines += [f"    error: {e}" for e in r.errors]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fault_campaign", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trainer", choices=("jax", "torch", "both"), default="jax")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--kills", type=int, default=20, help="faults per trainer and mode (default 20)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=4, help="--ckpt-every of the runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", help="directory for the runs (default: a temporary one, removed after)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad or args.kills < 1 or args.steps < 2 * args.every or args.every < 1:
        print(f"error: modes {bad} unknown (use {', '.join(MODES)}), or --kills < 1, or --steps < 2 x --every",
              file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fault-campaign-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for trainer in (("jax", "torch") if args.trainer == "both" else (args.trainer,)):
            ref = reference_run(trainer, args.steps, args.every, work)
            for mode in modes:
                r = campaign(trainer, mode, args.kills, args.steps, args.every, args.seed, work, ref)
                results.append(r)
                print(report([r]).splitlines()[-1 - len(r.errors)], flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(report(results))
    if args.out:
        Path(args.out).write_text(json.dumps([{**asdict(r), "ok": r.ok} for r in results], indent=2) + "\n")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
