"""``python -m jax_impl.train``: train (or ``--dry-run`` plan) a Llama on a named device mesh.

    python -m jax_impl.train --preset small --mesh fsdp=8
    python -m jax_impl.train --preset llama2-70b --mesh data=8,fsdp=12 --zero 3 --parallel.hpz=true --dry-run
    python -m jax_impl.train --preset tiny --model.n_layers=4 --optim.lr=3e-3
    python -m jax_impl.train --preset small --mesh fsdp=8 --name r1 --ckpt-every 50       # checkpoints
    python -m jax_impl.train --preset small --mesh data=2,fsdp=4 --resume runs/r1         # continue (any mesh)
    python -m jax_impl.train ... --coordinator host0:1234 --num-processes 2 --process-id 0  # multi-process

Everything not listed below is a dotted config override (``--section.key=value``).
JAX is imported only after the device count is known, so the CPU can fake the mesh's devices.

Resilience (jax_impl/checkpoint.py, jax_impl/resilience.py, jax_impl/distributed.py): orbax checkpoints
every ``--ckpt-every`` steps and on SIGTERM/SIGINT (then exit 128+signal); ``--resume`` restores params,
optimizer state (schedule count included), step and data position onto the current mesh; a non-finite
loss/gradient norm stops the run (exit 3) naming the step and first bad parameter/gradient, or skips the
step (``--on-nonfinite skip``); a step over ``--watchdog-factor`` x median dumps all stacks and exits 75.
Under mpiexec/PALS/SLURM (or the explicit flags) every process joins ``jax.distributed``, feeds only its
own shards of the batch, and only process 0 writes the run directory.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from configs import Config, ConfigError, eval_due, lr_at, mesh_devices, valid_offset, valid_samples, validate_config
from configs.cli import layout_label, resolve_config, trainer_parser
from configs.schema import check_layout
from runtime.loop import BaseHook, Stop
from runtime.rundir import (
    MetricsLog,
    RunDirBusy,
    lock_run_dir,
    make_run_dir,
    out_dir_error,
    run_dir_path,
    truncate_metrics,
    write_config,
    write_meta,
)


def build_parser() -> argparse.ArgumentParser:
    ap = trainer_parser("python -m jax_impl.train", __doc__)
    ap.add_argument("--dry-run", action="store_true",
                    help="allocate nothing: parameter count, bytes per device, AOT-compiled memory analysis")
    ap.add_argument("--quiet", action="store_true", help="no progress bar, no loss.png")
    # --ckpt-every, --on-nonfinite, --watchdog-* ... (configs.cli) set the [checkpoint], [nonfinite] and
    # [watchdog] config keys; --resume and --init-from are actions on this start, not run options
    ck = ap.add_argument_group("resume / initial weights")
    ck.add_argument("--resume", metavar="PATH|auto",
                    help="a run directory, its checkpoints/ or one checkpoints/<step>; continues in that run "
                         "directory unless --name is given. An older step starts a new branch: the later "
                         "checkpoints and metrics rows are moved to abandoned-<time> names. auto: resume this "
                         "--name's run from its newest readable checkpoint, else start it fresh in that directory "
                         "(a requeued job)")
    ck.add_argument("--init-from", metavar="CKPT|HF_DIR",
                    help="start a new run (step 0, fresh optimizer state) from these weights: a checkpoint of "
                         "this project (any run's, or one made by `python -m jax_impl.checkpoint import`) or a "
                         "Hugging Face Llama directory (config.json + *.safetensors); with --resume auto only "
                         "until the run has a checkpoint of its own")
    mp = ap.add_argument_group("multi-process (else from mpiexec/PALS, SLURM or RANK/WORLD_SIZE variables)")
    mp.add_argument("--coordinator", help="HOST:PORT of process 0's coordination service")
    mp.add_argument("--num-processes", type=int)
    mp.add_argument("--process-id", type=int)
    mp.add_argument("--init-timeout-s", type=float, default=300.0,
                    help="how long every process waits for all the others to join (default 300); then the one(s) "
                         "missing are named and every process exits 69")
    return ap


@dataclass
class RunOptions:
    """This start's actions (``--resume``, ``--init-from``); the run options proper are the config's
    [checkpoint], [nonfinite] and [watchdog] sections."""

    resume: str | None = None
    init_from: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunOptions:
        return cls(resume=args.resume, init_from=args.init_from)


NONFINITE_EXIT = 3  # a rerun from the last checkpoint would repeat the failure
RUN_DIR_ERROR = "\0error:"  # broadcast by process 0 instead of the run directory when it cannot open one


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient norm (the message names the step and the first bad tensor)."""


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def compiled_memory(compiled) -> dict[str, int] | None:
    """Per-device bytes of a compiled step (XLA's memory analysis), or None where the backend has none."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # e.g. UNIMPLEMENTED from a plugin
        return None
    if ma is None:
        return None
    return {k: int(getattr(ma, k + "_size_in_bytes", 0) or 0) for k in ("argument", "output", "alias", "temp")}


def dry_run(cfg: Config, trainer, compiled_by_planner: dict[str, int] | None = None) -> dict[str, Any]:
    """Plan without allocating: counts, per-device state bytes, AOT-compiled memory analysis (``--mesh auto``:
    the planner's compile of the same step, cached by config hash, instead of compiling it again)."""
    n_dev = trainer.mesh.size
    state = trainer.state_bytes_per_device()
    total = cfg.model.n_params()
    print(f"model {cfg.model.name}: {total:,} parameters ({_gib(total * 4)} fp32)")
    print(f"mesh {dict(trainer.mesh.shape)} = {n_dev} devices, ZeRO-{cfg.parallel.zero}"
          + (" + hpZ" if cfg.parallel.hpz else "") + (" MiCS" if cfg.parallel.mics else "")
          + f"; stored ZeRO dims padded to a multiple of {trainer.plan.pad_multiple()}")
    for k, v in state.items():
        print(f"  {k:<10} {_gib(v)} per device")
    if compiled_by_planner is not None:
        mem, compile_s = dict(compiled_by_planner), 0.0
        print("AOT-compiled train step (by the --mesh auto planner; XLA:CPU, cached by config hash):")
    else:
        t0 = time.perf_counter()
        compiled = trainer.compile_step()
        compile_s = time.perf_counter() - t0
        mem = compiled_memory(compiled)
    if mem is None:  # a PJRT plugin need not implement it (the oneapi one is untested here)
        import jax

        print(f"AOT-compiled train step in {compile_s:.1f}s; the {jax.default_backend()} backend gives no memory "
              "analysis: plan with --platform cpu (XLA:CPU's buffer assignment of the same step)")
        return {"n_params": total, "devices": n_dev, "state_bytes": state, "memory": None, "peak_bytes": None,
                "compile_s": compile_s}
    peak = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
    if compiled_by_planner is None:
        print(f"AOT-compiled train step in {compile_s:.1f}s; per-device memory analysis:")
    for k, v in mem.items():
        print(f"  {k:<10} {_gib(v)}")
    print(f"  {'peak':<10} {_gib(peak)} (arguments + outputs - aliased + temporaries)")
    return {"n_params": total, "devices": n_dev, "state_bytes": state, "memory": mem, "peak_bytes": peak,
            "compile_s": compile_s}


def _planned_run_dir(cfg: Config, opts: RunOptions) -> Path:
    """The directory this run will write (the one ``_open_run_dir`` opens), known before anything starts."""
    if opts.resume and opts.resume != "auto" and not cfg.train.name:
        from jax_impl import checkpoint

        ck, _ = checkpoint.resolve_dir(opts.resume)
        if ck.name == "checkpoints" and (ck.parent / "config.json").exists():
            return ck.parent
    return run_dir_path(cfg, "jax")


@dataclass
class _Start:
    """What ``main`` settled before JAX starts (``_start``)."""

    cfg: Config
    args: argparse.Namespace
    opts: RunOptions
    platform: str
    decision: dict[str, Any] | None  # --mesh auto's layout decision
    planned: Path | None  # the run directory process 0 locked
    lock: Any  # its lock (process 0), or None
    lock_error: str  # why process 0 could not lock it (a multi-process run exits 2 on every process)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    s = _start(argv)
    import jax

    from jax_impl.sharding import make_mesh

    try:
        mesh = make_mesh(backend_check(s.cfg, jax.device_count()))
    except ConfigError as e:
        if s.lock is not None:
            s.lock.abandon()
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    from aurora_data import DataError
    from jax_impl.trainer import Trainer

    try:
        trainer = Trainer.build(s.cfg, mesh)
        if s.args.dry_run:
            pre = ((s.decision or {}).get("pick") or {}).get("jax_memory") if s.platform == "cpu" else None
            return dry_run(s.cfg, trainer, pre) | ({"layout_decision": s.decision} if s.decision else {})
        return train(s.cfg, trainer, s.platform, quiet=s.args.quiet, opts=s.opts, run_dir=s.planned,
                     lock_error=s.lock_error, layout_decision=s.decision)
    except DataError as e:  # bad data (most are found before compiling; a token id past the vocabulary mid-run)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if s.lock is not None:
            s.lock.release()


def backend_check(cfg: Config, n_devices: int) -> dict[str, int]:
    """The JAX backend's check, once the device count is known: the mesh's sizes (a -1 axis resolved; the layout
    checks that ``validate_config`` could not run without them run now). ``make_mesh`` then checks the count."""
    if "-1" in cfg.parallel.mesh:
        check_layout(cfg, n_devices)
    return cfg.mesh_shape(n_devices)


def _start(argv: list[str] | None) -> _Start:
    """Config, run-directory lock, ``jax.distributed`` and the platform, before JAX starts; bad input exits 2
    (a peer that never joins: 69), giving the lock back."""
    from jax_impl import devices, distributed  # neither imports jax

    lock, lock_error = None, ""
    try:
        # validated once, below: after --mesh auto has set the layout, before the run directory is locked
        cfg, args = resolve_config(build_parser(), argv, validate=False)
        opts = RunOptions.from_args(args)
        from jax_impl import checkpoint

        dist = distributed.detect(coordinator=args.coordinator, num_processes=args.num_processes,
                                  process_id=args.process_id)
        decision = None
        if args.mesh == "auto":  # the layout is decided before the run directory, devices or anything else
            cfg, decision = mesh_auto(cfg, args, opts, multi_process=dist is not None)
        validate_config(cfg, mesh_devices(cfg.parallel.mesh))  # a -1 axis: its sizes in backend_check
        planned = None
        if not args.dry_run and (dist is None or dist.process_id == 0):
            # one run per directory, decided before anything is compiled; process 0 holds the lock. With peers,
            # a refusal waits for them (the run-directory broadcast in train) so that every process exits 2
            try:
                planned = _planned_run_dir(cfg, opts)
                lock = lock_run_dir(planned)
            except (RunDirBusy, checkpoint.CheckpointError, OSError) as e:
                if dist is None:
                    raise ConfigError(out_dir_error(e, cfg.train.out_dir)) from None
                lock_error = out_dir_error(e, cfg.train.out_dir)
        n_mesh = mesh_devices(cfg.parallel.mesh)
        if dist is not None and n_mesh and n_mesh % dist.num_processes:
            raise ConfigError(f"mesh {cfg.parallel.mesh} ({n_mesh} devices) does not divide over "
                              f"{dist.num_processes} processes")
        # on CPU each process fakes its share of the mesh's devices
        per_process = n_mesh // dist.num_processes if dist and n_mesh else n_mesh
        platform = devices.configure(cfg.train.platform, per_process)
        if dist is not None:
            if args.init_timeout_s <= 0:
                raise ConfigError(f"--init-timeout-s {args.init_timeout_s:g} must be > 0 (seconds)")
            distributed.initialize(dist, platform, timeout_s=args.init_timeout_s, devices_per_process=per_process)
        devices.check_config(cfg, platform)
        devices.start(platform)  # the backend starts here: a device that is not there is a message, not a trace
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        if lock is not None:
            lock.abandon()
        raise SystemExit(2) from None
    except distributed.JoinError as e:  # a peer or the coordinator never came: a requeue elsewhere may help
        print(f"error: {e}", file=sys.stderr)
        if lock is not None:
            lock.abandon()
        raise SystemExit(distributed.JOIN_EXIT) from None
    return _Start(cfg, args, opts, platform, decision, planned, lock, lock_error)


def _resumed_run_dir(cfg: Config, opts: RunOptions) -> Path | None:
    """The run directory a ``--resume`` continues from (its recorded layout), or None (a fresh run)."""
    from jax_impl import checkpoint

    if not opts.resume:
        return None
    try:
        if opts.resume == "auto":
            src = _resume_source(cfg, opts)
            return Path(cfg.train.out_dir) / cfg.train.name if src is not None else None
        ck, _ = checkpoint.resolve_dir(opts.resume)
    except (checkpoint.CheckpointError, ConfigError, OSError):
        return None  # reported where the checkpoint is opened
    return ck.parent if ck.name == "checkpoints" else None


def mesh_auto(cfg: Config, args: argparse.Namespace, opts: RunOptions, multi_process: bool = False
              ) -> tuple[Config, dict[str, Any]]:
    """``--mesh auto``: the planner's layout at ``parallel.gbs`` and the config's sequence (a resumed run: the
    layout it recorded). Devices: ``--nodes`` x the cluster's tiles, else on CPU the preset's mesh size in fake
    devices, else the accelerators this process sees (whole nodes of ``--cluster``)."""
    from compare.plan import auto_layout  # here, not at import: jax_impl stays importable without compare
    from jax_impl import devices
    from runtime.rundir import recorded_layout

    run_dir = _resumed_run_dir(cfg, opts)
    recorded = recorded_layout(run_dir) if run_dir is not None else None
    n, cluster = None, args.cluster
    if args.nodes is None and recorded is None:
        platform = devices.detect(note=False) if cfg.train.platform == "auto" else cfg.train.platform
        if platform == "cpu":
            n = mesh_devices(cfg.parallel.mesh) or 1
            print(f"--mesh auto: {n} fake CPU devices (the preset's mesh {cfg.parallel.mesh}); --nodes N plans a "
                  "cluster job instead")
        elif multi_process:  # counting the devices would start JAX before jax.distributed joins
            raise ConfigError("--mesh auto in a multi-process job needs --nodes N (and --cluster, default aurora): "
                              "every process then plans the same layout before JAX starts")
        else:
            devices.configure(platform, None)
            n = devices.start(platform)
            cluster = cluster or ("aurora" if platform in ("xpu", "sycl") else "h100-node")
            print(f"--mesh auto: the {n} visible {platform} devices, per-device figures of cluster {cluster!r} "
                  "(--cluster to change)")
    cfg, rec, lines = auto_layout(cfg, framework="jax", nodes=args.nodes, cluster=cluster, devices=n,
                                  recorded=recorded)
    print("\n".join(lines), flush=True)
    return cfg, rec


def _resume_source(cfg: Config, opts: RunOptions) -> Path | None:
    """The checkpoint path to resume from (None: a fresh run); ``auto`` = this --name's run, if it has one."""
    from jax_impl import checkpoint

    if not opts.resume:
        return None
    if opts.resume != "auto":
        return Path(opts.resume)
    if not cfg.train.name:
        raise ConfigError("--resume auto needs --name (the run to continue)")
    ck = (Path(cfg.checkpoint.dir) if cfg.checkpoint.dir
          else Path(cfg.train.out_dir) / cfg.train.name / "checkpoints")
    return ck if checkpoint.steps_in(ck) else None


def _open_run_dir(cfg: Config, resume_from: Path | None, fresh_in_place: bool = False,
                  planned: Path | None = None) -> tuple[Path, bool]:
    """(run dir, continuing in place); only process 0 calls this. ``fresh_in_place`` (``--resume auto`` and no
    checkpoint yet): a named run directory left by an attempt that never saved is restarted from step 0, its
    rows kept aside. ``planned``: the (locked) directory main computed for a run without --name."""
    if resume_from is not None and not cfg.train.name:
        from jax_impl import checkpoint

        ck, _ = checkpoint.resolve_dir(resume_from)
        if ck.name == "checkpoints" and (ck.parent / "config.json").exists():
            return ck.parent, True
    if resume_from is not None and cfg.train.name:
        run_dir = Path(cfg.train.out_dir) / cfg.train.name
        if (run_dir / "metrics.jsonl").exists():
            return run_dir, True
    if fresh_in_place and cfg.train.name:
        stale = Path(cfg.train.out_dir) / cfg.train.name
        if (stale / "metrics.jsonl").exists():
            aside = truncate_metrics(stale, 0)
            (stale / "metrics.jsonl").unlink()  # empty now: its rows (if any) are in `aside`
            print(f"--resume auto: {stale} has no checkpoint yet; starting it again from step 0"
                  + (f" (the previous attempt's rows are kept in {aside.name})" if aside else ""))
    return make_run_dir(cfg, "jax", planned if not cfg.train.name else None), False


def check_writable_dir(path: Path, flag: str) -> None:
    """A directory this process can create or write into, or a ConfigError naming ``flag`` and why not."""
    probe = path
    while not probe.exists() and probe != probe.parent:  # the nearest existing ancestor decides creation
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{flag} {path}: {probe} is not a directory; point {flag} at a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == path else f"cannot be created ({probe} is not writable)"
        raise ConfigError(f"{flag} {path}: {what} by this user; pick a writable location")


def _check_resume_steps(cfg: Config, resume_from: Path) -> None:
    """Refuse, before anything is written, a resume whose checkpoint is already past ``--steps``."""
    from jax_impl import checkpoint

    d, step = checkpoint.resolve_dir(resume_from)
    steps = checkpoint.steps_in(d)
    step = step if step is not None else (steps[-1] if steps else None)
    if step is None:
        return
    try:
        meta = checkpoint.read_meta(d, step)
    except checkpoint.CheckpointError:
        return  # unreadable: restore says so (or --resume auto falls back), and the step is checked again then
    if not meta.get("params_only") and meta["step"] > cfg.train.steps:
        raise ConfigError(f"--steps {cfg.train.steps}, but the checkpoint to resume ({d / str(step)}) is already at "
                          f"step {meta['step']}: give --steps >= {meta['step']} (the run's total, not the steps to "
                          "add), or resume an older step with --resume <run>/checkpoints/<step>")


@dataclass
class JaxRun:
    """One run's state, built by ``train``'s setup functions and shared with the loop's hooks (``ctx``)."""

    cfg: Config
    trainer: Any
    opts: RunOptions
    quiet: bool
    lead: bool  # process 0: the only one writing the run directory and the metrics
    gbs: int
    dp: int
    source: Any = None
    valid: Any = None
    run_dir: Path = Path()
    in_place: bool = False  # continuing an existing run directory
    ckpt_dir: Path = Path()
    resume_from: Path | None = None
    params: Any = None
    opt_state: Any = None
    batch: Any = None  # the current step's global batch (a fault hook may replace it)
    compiled: Any = None
    eval_compiled: Any = None  # the evaluation step, when the run evaluates
    start_step: int = 0
    consumed0: int = 0
    restored_meta: dict[str, Any] | None = None
    restore_s: float | None = None
    compile_s: float = 0.0
    finite: bool = True  # the last step's loss and gradient norm were finite
    wall_due: bool = False  # process 0's clock says a wall-clock checkpoint is due (agreed by all)
    losses: list[float] = field(default_factory=list)
    skipped: int = 0

    def consumed(self, step: int) -> int:
        """Samples consumed before step ``step`` (1-based)."""
        return self.consumed0 + (step - 1 - self.start_step) * self.gbs


def train(cfg: Config, trainer, platform: str, quiet: bool = False, opts: RunOptions | None = None,
          run_dir: Path | None = None, lock_error: str = "", layout_decision: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    """Open the run directory, compile, init or restore, then ``runtime.loop.run`` with ``_hooks``; a stop
    request ends the run (NonFiniteError, or SystemExit 128 + signal after the checkpoint)."""
    import jax

    from jax_impl import checkpoint
    from jax_impl.sharding import dp_size
    from runtime import loop

    opts = opts or RunOptions()
    p, dp = cfg.parallel, dp_size(trainer.mesh)
    r = JaxRun(cfg, trainer, opts, quiet, lead=jax.process_index() == 0, gbs=p.mbs * p.gas * dp, dp=dp)
    _open_run(r, run_dir, lock_error)
    t0 = time.perf_counter()
    _init_state(r)
    r.compile_s = time.perf_counter() - t0
    if r.lead:
        _write_meta(r, platform, layout_decision)
    print(f"init + compile {r.compile_s:.1f}s")
    ckpt = checkpoint.Checkpointer(r.ckpt_dir, every=cfg.checkpoint.every, keep=cfg.checkpoint.keep)
    end = loop.run(r.start_step, cfg.train.steps, functools.partial(_step, r), _hooks(r, ckpt), ctx=r)
    if end.stop is not None:
        if end.stop.code == NONFINITE_EXIT:
            raise NonFiniteError(end.stop.reason)
        print(end.stop.reason, file=sys.stderr, flush=True)
        raise SystemExit(end.stop.code)
    if r.losses:
        print(f"done: loss {r.losses[0]:.4f} -> {r.losses[-1]:.4f}; metrics in {r.run_dir / 'metrics.jsonl'}"
              + (f"; {r.skipped} non-finite steps skipped" if r.skipped else ""))
        if r.lead and not quiet:
            from compare.plot import write_run_plot  # loss.png; a failure there only warns

            write_run_plot(r.run_dir)
    return {"run_dir": r.run_dir, "losses": r.losses, "compile_s": r.compile_s, "params": r.params,
            "opt_state": r.opt_state, "start_step": r.start_step, "skipped": r.skipped, "ckpt_dir": r.ckpt_dir,
            "ckpt_save_blocked_s": list(ckpt.save_s), "restore_s": r.restore_s}


def _open_run(r: JaxRun, planned: Path | None, lock_error: str) -> None:
    """Read the data (every process), open the run directory (process 0) and agree on it or on an error (exit 2
    everywhere, instead of the others waiting in a collective for a process 0 that is gone)."""
    from aurora_data import DataError, build_source
    from jax_impl import checkpoint, distributed

    cfg, opts = r.cfg, r.opts
    error = lock_error
    try:
        if opts.resume not in (None, "auto") and opts.init_from:
            raise ConfigError("--resume PATH and --init-from exclude each other: --resume continues a run (its "
                              "optimizer state and step), --init-from starts a new one from the weights "
                              "(with --resume auto, --init-from applies only while the run has no checkpoint)")
        r.source = build_source(cfg, num_samples=cfg.train.steps * r.gbs)
        r.valid = (build_source(cfg, num_samples=valid_samples(cfg, r.gbs), split="valid")
                   if cfg.train.eval_interval else None)
        r.resume_from = _resume_source(cfg, opts)
        if r.lead and not error:
            if cfg.checkpoint.dir:  # found unusable only at the first save, after compiling, otherwise
                check_writable_dir(Path(cfg.checkpoint.dir), "--ckpt-dir")
            if r.resume_from is not None:
                _check_resume_steps(cfg, r.resume_from)
            r.run_dir, r.in_place = _open_run_dir(cfg, r.resume_from, fresh_in_place=opts.resume == "auto",
                                                  planned=planned)
    except (ConfigError, checkpoint.CheckpointError, DataError, FileExistsError, OSError) as e:
        # an OSError with an errno is the file system's (--out-dir a file, not writable, ...)
        error = (f"--out-dir {cfg.train.out_dir}: cannot make the run directory there ({e}); pick a writable "
                 "directory" if isinstance(e, OSError) and e.errno is not None else str(e) or type(e).__name__)
    own_error = error
    shared = distributed.broadcast_str(RUN_DIR_ERROR + error if error else str(r.run_dir))
    if shared.startswith(RUN_DIR_ERROR):
        error = shared[len(RUN_DIR_ERROR):]
    if distributed.max_over_processes(int(bool(own_error))):  # a process other than 0 may have failed alone
        if error or own_error:
            print(f"error: {own_error or error}", file=sys.stderr)
        else:
            print("error: another process could not read its data or open the run directory (see its message)",
                  file=sys.stderr)
        raise SystemExit(2)
    r.run_dir = Path(shared)
    r.ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else r.run_dir / "checkpoints"
    _print_run_line(r)


def _print_run_line(r: JaxRun) -> None:
    import jax

    cfg, mesh, p = r.cfg, r.trainer.mesh, r.cfg.parallel
    print(f"run {r.run_dir} | {cfg.model.name} {cfg.model.n_params():,} params | mesh {dict(mesh.shape)} "
          f"ZeRO-{p.zero} | gbs {r.gbs} = mbs {p.mbs} x gas {p.gas} x dp {r.dp} | seq {cfg.data.seq_len} | "
          f"{cfg.train.dtype}"
          + (f" | process {jax.process_index()}/{jax.process_count()}" if jax.process_count() > 1 else ""))


def _init_state(r: JaxRun) -> None:
    """Compile the step, then restore, load or initialise the state; process 0 then writes config.json."""
    from jax_impl import resilience
    from runtime import hostmem

    # compiled on abstract arrays before any state exists: the compiler's working memory is freed (and given
    # back) before params and optimizer state are allocated, so the process's peak is the larger of the two,
    # not their sum (docs/performance.md, "Peak host memory")
    r.compiled = resilience.compile_guarded(r.trainer)
    if r.valid is not None and r.cfg.train.steps >= r.cfg.train.eval_interval:
        # the evaluation step too: compiled at the first evaluation, its compiler memory landed on top of the
        # state and raised the peak by ~90-110 MiB per process (bench, two pipeline stages)
        r.eval_compiled = r.trainer.compile_eval()
    hostmem.release_host_memory()
    if r.resume_from is not None:
        _restore(r)
    elif r.opts.init_from:
        _load_init(r)
    else:
        r.params, r.opt_state = r.trainer.init_state()
    if r.lead:  # after the resume checks: a refused resume leaves config.json as it was
        write_config(r.run_dir, r.cfg)


def _fresh_opt_state(r: JaxRun) -> Any:
    import jax

    from jax_impl.sharding import activate

    with activate(r.trainer.mesh):
        return jax.jit(r.trainer.tx.init, out_shardings=r.trainer.opt_sh)(r.params)


def _restore(r: JaxRun) -> None:
    """``--resume``: the checkpoint's state (a params-only one: fresh optimizer state at step 0); continuing in
    place from an older step moves the old branch's later checkpoints and rows aside."""
    from jax_impl import checkpoint

    cfg, trainer = r.cfg, r.trainer
    try:
        c = (checkpoint.restore_newest_readable(r.resume_from, trainer) if r.opts.resume == "auto"
             else checkpoint.restore(r.resume_from, trainer))
        if not c.meta["params_only"] and c.step > cfg.train.steps:
            raise checkpoint.CheckpointError(
                f"--steps {cfg.train.steps}, but checkpoint step {c.step} is already past it: give --steps >= "
                f"{c.step} (the run's total)")
    except checkpoint.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    r.params, r.opt_state, r.restored_meta, r.restore_s = c.params, c.opt_state, c.meta, c.seconds
    if r.opt_state is None:  # a params-only (imported) checkpoint: fresh optimizer state, step 0
        r.opt_state = _fresh_opt_state(r)
    else:
        r.start_step, r.consumed0 = c.step, c.meta["consumed_samples"]
    print(f"resumed from {r.resume_from} step {c.step} (consumed samples {r.consumed0}) in {r.restore_s:.2f}s")
    if r.lead:
        # a new branch from step k: the old branch's later checkpoints and rows are moved aside, not deleted
        moved = checkpoint.set_aside_after(r.ckpt_dir, r.start_step) if r.restored_meta is not None else None
        aside = truncate_metrics(r.run_dir, r.start_step) if r.in_place else None
        if moved or aside:
            print(f"resumed at step {r.start_step}: the previous branch's later "
                  + " and ".join(([f"checkpoints are in {moved}"] if moved else [])
                                 + ([f"metrics rows are in {aside}"] if aside else [])))


def _load_init(r: JaxRun) -> None:
    """``--init-from``: a new run from these weights, with fresh optimizer state."""
    from jax_impl import checkpoint
    from weightmap import hf

    try:
        r.params, what = checkpoint.load_init(r.opts.init_from, r.trainer)
    except (checkpoint.CheckpointError, hf.HFError) as e:
        print(f"error: --init-from {r.opts.init_from}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    r.opt_state = _fresh_opt_state(r)
    print(f"initial weights from {what}")


def _write_meta(r: JaxRun, platform: str, layout_decision: dict[str, Any] | None) -> None:
    import jax

    from jax_impl import devices
    from runtime import hostmem

    cfg, mesh = r.cfg, r.trainer.mesh
    write_meta(r.run_dir, {
        "framework": "jax", "jax": jax.__version__, "platform": platform, "devices": mesh.size,
        "platform_stack": devices.stack_info(platform),
        "host_allocator": hostmem.host_allocator(),
        "processes": jax.process_count(),
        "device_kind": jax.devices()[0].device_kind, "mesh": dict(mesh.shape), "layout": layout_label(cfg),
        "zero": cfg.parallel.zero, "dtype": cfg.train.dtype, "gbs": r.gbs, "compile_s": r.compile_s,
        "compiled_memory": compiled_memory(r.compiled), "data": getattr(r.source, "meta", None),
        "init_from": r.opts.init_from, "layout_decision": layout_decision,
        "resumed_from": None if r.restored_meta is None else {
            "path": str(r.resume_from), "step": r.restored_meta["step"], "mesh": r.restored_meta["mesh"],
            "restore_s": r.restore_s},
    })


# ----------------------------------------------------------------------------- the loop: one step and its hooks
def _step(r: JaxRun, step: int) -> dict[str, Any]:
    """One optimizer step (the batch is read by the ``_BatchHook``): its loss, gradient norm and time."""
    t = time.perf_counter()
    r.params, r.opt_state, metrics = r.compiled(r.params, r.opt_state, r.batch)
    loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])  # waits for the step
    r.finite = bool(metrics["finite"])
    return {"step": step, "loss": loss, "lr": lr_at(r.cfg, step - 1), "grad_norm": gnorm,
            "step_time_s": time.perf_counter() - t}


def _hooks(r: JaxRun, ckpt: Any) -> list[Any]:
    """The loop's hooks, in the order they act after each step (see runtime/loop.py)."""
    import jax

    from jax_impl import distributed, resilience
    from jax_impl.sharding import activate, batch_sharding
    from runtime import hostmem, loop

    cfg, mesh, p, wd = r.cfg, r.trainer.mesh, r.cfg.parallel, r.cfg.watchdog
    watchdog = resilience.Watchdog(wd.factor, wd.min_s, wd.first_s or math.inf,
                                   report=r.run_dir / f"watchdog.{jax.process_index()}.txt")
    watchdog.first_step = r.start_step + 1
    stop = resilience.StopSignal()
    saver = _Saver(r, ckpt)

    def evaluate(at: int) -> float:
        """Validation loss after step ``at``: the mean over ``eval_iters`` global batches of the valid split."""
        first = valid_offset(cfg, at, r.gbs)
        total = 0.0
        # the evaluation's temp buffer is not the train step's: with the free pages given back before and after
        # it, the heap takes it from pages the train step's buffer left, not on top of the process's peak
        hostmem.release_host_memory()
        for i in range(cfg.train.eval_iters):
            vb = distributed.local_batch(r.valid, batch_sharding(mesh), first + i * r.gbs, p.mbs, p.gas, r.dp)
            total += float(r.eval_compiled(r.params, vb))
        hostmem.release_host_memory()
        return total / cfg.train.eval_iters

    hooks: list[Any] = [
        _ContextHook(activate(mesh), stop, watchdog), _BatchHook(r),
        resilience.WatchdogHook(watchdog, enabled=bool(wd.first_s)), _StatsHook(r, saver),
        loop.EvalHook(lambda n: r.valid is not None and eval_due(cfg, n), evaluate),
    ]
    if r.lead:
        hooks.append(loop.MetricsLogHook(MetricsLog(r.run_dir, cfg, "jax")))
    bar = _progress_bar(r)
    hooks += [
        _NonFiniteHook(r),
        loop.CheckpointHook(lambda n: ckpt.due(n) or r.wall_due, saver.save, ckpt.close,
                            final=cfg.checkpoint.every > 0 or cfg.checkpoint.every_s > 0),
        loop.ProgressHook(functools.partial(_progress_line, r), bar.write if not r.quiet else print, bar.close,
                          advance=bar.update),
        *loop.installed_hooks("jax"),
        loop.SignalHook(stop.agreed, lambda n, sig: (
            f"stopped by {signal.Signals(sig).name} after step {n}; checkpoint in {r.ckpt_dir}; continue with "
            f"--resume {r.run_dir}")),
    ]
    return hooks


def _progress_bar(r: JaxRun):
    from tqdm import tqdm

    return tqdm(total=r.cfg.train.steps - r.start_step, desc="train", unit="step", disable=r.quiet, leave=False)


def _progress_line(r: JaxRun, step: int, row: dict[str, Any]) -> str | None:
    """Process 0's line every ``log_every`` steps, at the first step and with an evaluation."""
    if not r.lead or not (step % r.cfg.train.log_every == 0 or step == 1 or "val_loss" in row):
        return None
    val = f"val {row['val_loss']:.4f} | " if "val_loss" in row else ""
    return (f"step {step:>5} | loss {row['loss']:.4f} | {val}lr {row['lr']:.3e} | gnorm {row['grad_norm']:.3f} | "
            f"{row['step_time_s'] * 1e3:.0f} ms | {row['samples_per_s']:.2f} samples/s | "
            f"{row['tokens_per_s_per_device']:.0f} tok/s/dev | {row['tflops_per_device']:.4f} TFLOPS/dev")


class _Saver:
    """Saves the state after a step once (a step already saved is skipped) and notes when, for the wall clock."""

    def __init__(self, r: JaxRun, ckpt) -> None:
        self.r, self.ckpt = r, ckpt
        self.last_saved = r.start_step if r.restored_meta is not None else -1
        self.last_save_t = time.monotonic()

    def save(self, at: int) -> None:
        from jax_impl import checkpoint

        r = self.r
        if at == self.last_saved:
            return
        dt = self.ckpt.save(at, r.params, r.opt_state,
                            checkpoint.checkpoint_meta(r.cfg, r.trainer, at, r.consumed(at) + r.gbs))
        self.last_saved, self.last_save_t = at, time.monotonic()
        if r.lead and not r.quiet:
            print(f"checkpoint step {at} -> {r.ckpt_dir} (train loop blocked {dt:.2f}s; written in the "
                  "background)")


class _ContextHook(BaseHook):
    """Enters the loop's context managers (mesh, signal handlers, watchdog thread) for the steps' duration."""

    def __init__(self, *contexts: Any) -> None:
        self.contexts = contexts
        self.stack = contextlib.ExitStack()

    def on_start(self, ctx: Any) -> None:
        for c in self.contexts:
            self.stack.enter_context(c)

    def on_end(self, end: Any) -> None:
        self.stack.close()


class _BatchHook(BaseHook):
    """Reads the step's global batch (this process's shards) before the step; a later hook may replace it."""

    def __init__(self, r: JaxRun) -> None:
        self.r = r

    def before_step(self, step: int) -> None:
        from jax_impl import distributed
        from jax_impl.sharding import batch_sharding

        r, p = self.r, self.r.cfg.parallel
        r.batch = distributed.local_batch(r.source, batch_sharding(r.trainer.mesh), r.consumed(step), p.mbs, p.gas,
                                          r.dp)




class _StatsHook(BaseHook):
    """The row's throughput and memory columns; the peak RSS (the largest process's) and process 0's wall-clock
    checkpoint decision ride in one collective, so every process saves at the same step without another."""

    def __init__(self, r: JaxRun, saver: _Saver) -> None:
        self.r, self.saver = r, saver
        self.flops_per_sample = r.cfg.model.flops_per_sample(r.cfg.data.seq_len)

    def after_step(self, step: int, row: dict[str, Any]) -> None:
        from jax_impl import distributed

        r, n_dev = self.r, self.r.trainer.mesh.size
        r.losses.append(row["loss"])
        sps = r.gbs / row["step_time_s"]
        every_s = r.cfg.checkpoint.every_s
        wall_due = int(r.lead and every_s > 0 and time.monotonic() - self.saver.last_save_t >= every_s)
        peak_kib, wall_due = distributed.max_over_processes(
            [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, wall_due])
        r.wall_due = bool(wall_due)
        row.update(samples_per_s=sps, tokens_per_s_per_device=sps * r.cfg.data.seq_len / n_dev,
                   tflops_per_device=sps * self.flops_per_sample / n_dev / 1e12,
                   consumed_samples=r.consumed(step) + r.gbs, peak_mem_bytes=peak_kib * 1024)  # KiB: the largest
        return None



class _NonFiniteHook(BaseHook):
    """A step whose loss or gradient norm is not finite (the guard kept the pre-step state, so the bad tensor
    can still be found): stop, naming it (exit 3), or with ``--on-nonfinite skip`` warn and go on, up to
    ``--max-skips`` in a row."""

    def __init__(self, r: JaxRun) -> None:
        self.r, self.in_a_row = r, 0

    def after_step(self, step: int, row: dict[str, Any]) -> Any:
        from jax_impl import resilience

        r, nf = self.r, self.r.cfg.nonfinite
        if r.finite:
            self.in_a_row = 0
            return None
        try:
            diag = resilience.diagnose_nonfinite(r.trainer, r.params, r.batch)
        except Exception as e:  # the diagnosis must not hide the failure itself
            diag = {"param": f"(diagnosis failed: {e})", "grad": None}
        loss, gnorm = row["loss"], row["grad_norm"]
        msg = (f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {step} "
               f"(loss {loss}, grad norm {gnorm}): first non-finite parameter: {diag['param'] or 'none'}; "
               f"first non-finite gradient: {diag['grad'] or 'none'}")
        r.skipped, self.in_a_row = r.skipped + 1, self.in_a_row + 1
        if nf.action == "stop" or self.in_a_row > nf.max_skips:
            why = "" if nf.action == "stop" else f" ({self.in_a_row} steps in a row, over --max-skips)"
            return Stop(f"{msg}{why}; the update was not applied. run {r.run_dir}", code=NONFINITE_EXIT)
        print(f"warning: {msg}; step skipped (params and optimizer state unchanged)", file=sys.stderr)
        return None



def cli(argv: list[str] | None = None) -> None:
    """``python -m jax_impl.train``: main() with failures as messages and exit codes (3: non-finite)."""
    try:
        main(argv)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(NONFINITE_EXIT) from None


if __name__ == "__main__":
    from runtime.hostmem import reexec_with_allocator

    reexec_with_allocator()  # the host allocator both trainers run under (runtime/hostmem.py)
    cli()
