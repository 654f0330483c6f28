"""``python -m torch_ref.train``: the PyTorch + DeepSpeed reference trainer, same flags as ``jax_impl.train``.

    python -m torch_ref.train --preset tiny --mesh data=2 --zero 1 --steps 5
    python -m torch_ref.train --preset tiny --mesh data=1,fsdp=2 --zero 3 --parallel.hpz=true
    python -m torch_ref.train --preset tiny --mesh pipeline=2 --zero 1 --gas 4
    python -m torch_ref.train --preset tiny --mesh data=1,tensor=2 --zero 1
    python -m torch_ref.train --preset tiny --mesh data=1,fsdp=2 --zero 3 --parallel.mics=true

Run directly, it is its own launcher: it checks the layout (bad input exits 2 before any
worker starts), writes the run directory (config.json, ds_config.json, the initial weights
``init_params.npz`` for ``--init jax``, computed by ``python -m jax_impl.init_weights`` in a subprocess:
this package never imports JAX, and refuses ``--init jax`` where JAX is not installed), then starts one
worker process per mesh rank (world size = product of the mesh axes) with RANK/WORLD_SIZE/MASTER_ADDR/
MASTER_PORT, gloo on CPU and OMP_NUM_THREADS = cores / ranks. A worker that fails ends the run: the launcher stops
its siblings and exits with the first failure's traceback (a rank killed by a signal, else the first to
exit non-zero: ``runtime/procgroup.py``); the process group has a timeout (TORCH_REF_PG_TIMEOUT seconds,
default 300), so a lost peer cannot hang the others. SIGTERM/SIGINT to the launcher go on to every rank:
each finishes its step, saves a DeepSpeed checkpoint and exits 128+signal, and the launcher exits the same
only after all have. More local ranks than 4 per core, or than the machine's memory holds at 0.5 GiB each,
are refused (``--oversubscribe`` starts them anyway). Bad data is found here, before any worker starts.

On a cluster the same module runs under ``mpiexec`` / ``deepspeed`` / ``torchrun``: when a launcher
gave this process a rank (``runtime.launcher_env``: RANK, PALS_RANKID, PMIX_RANK, PMI_RANK,
OMPI_COMM_WORLD_RANK, SLURM_PROCID; world size from WORLD_SIZE, PMI_SIZE, ...), every process is a
worker; rank 0 writes the run directory and the JAX initial weights (the same subprocess).

``--platform``: ``xpu`` = Intel GPUs through ``torch.xpu`` (DeepSpeed's xpu accelerator, the ``xccl``
backend; no intel-extension-for-pytorch), ``cpu`` = gloo, ``gpu`` = CUDA (DeepSpeed's choice of backend),
``auto`` = xpu if ``torch.xpu.is_available()``, else CUDA if available, else cpu. Each XPU rank binds
its own tile, ``torch.xpu.set_device(LOCAL_RANK)``, with all 12 tiles of a node visible. Aurora jobs
come from ``python -m scripts.aurora.launch --trainer torch`` (docs/aurora.md; NOT run on Aurora).
A 70B run needs ``--init torch`` (JAX init of 69B fp32 weights on one host is not practical).
No rank builds the whole model unless its layout keeps it whole (ZeRO-0/1/2):
ZeRO-3/hpZ construct under ``deepspeed.zero.Init``, MiCS/FSDP2 and the pipeline stages materialise
only their own shards or layers, and each rank fills what it holds from ``torch_ref.weights``
(``torch_ref.build``). ``python -m torch_ref.memplan <same flags>`` builds one rank's share of a
layout on a fake process group and prints its parameter bytes (the 70B on 96 ranks: 1.34 GiB).

Checkpoints (DeepSpeed engines): ``--ckpt-every N`` calls ``engine.save_checkpoint`` on every rank
every N steps (tag ``global_stepN``, client state = step and consumed samples; DeepSpeed writes the
``latest`` file after the tag is complete), ``--ckpt-every-s S`` also when S seconds passed since the
last save (rank 0 decides, all ranks agree); ``--resume RUN_DIR`` continues that run directory from
its latest checkpoint (``engine.load_checkpoint``: module, ZeRO-partitioned optimizer state, engine
step counters); the per-step losses then equal an uninterrupted run's bit for bit (fp32, CPU).
``--resume RUN_DIR/checkpoints/global_stepK`` continues from an older tag: a new branch, whose later
tags and metrics rows are moved to ``abandoned-<time>`` names (runtime/rundir.py, docs/checkpoints.md).
``--resume auto`` (needs ``--name``): continue that run from its newest readable checkpoint (an
unreadable newer tag is said and skipped), else start it afresh in its directory -- what a requeued or
retried job wants. The run directory is locked (``runtime.rundir.lock_run_dir``) by the launcher, or
by rank 0 under an external launcher, so a second run in it is refused.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import zipfile
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from aurora_data import DataError, build_source
from configs import (
    Config,
    ConfigError,
    config_from_dict,
    eval_due,
    lr_at,
    mesh_devices,
    valid_offset,
    valid_samples,
)
from configs.cli import resolve_config as resolve_cli
from configs.cli import trainer_parser
from runtime import launcher_env, procgroup
from runtime.hostmem import allocator_env
from runtime.loop import BaseHook, Stop
from runtime.procgroup import ProcessGroup
from runtime.rundir import (
    MetricsLog,
    RunDirBusy,
    lock_run_dir,
    make_run_dir,
    out_dir_error,
    read_metrics,
    replace_text,
    run_dir_path,
    set_aside,
    truncate_metrics,
    write_config,
    write_meta,
)
from torch_ref.layouts import Layout, plan_layout

RUN_DIR_ENV = "TORCH_REF_RUN_DIR"  # set by our launcher for its workers
DATA_ERROR = "DataError: "  # a rank*.err that starts so holds a bad-data message, not a traceback
NONFINITE_EXIT = 3  # as jax_impl.train: a rerun from the last checkpoint would repeat the failure
# how the launcher starts a worker (None: ``python -m torch_ref.train`` with this interpreter); tests run the
# workers through tests/fault_runner.py this way
WORKER_COMMAND: list[str] | None = None
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# the own launcher's sanity limits: a rank per 1/4 core still trains on the tiny preset (data=2,fsdp=2 on 2
# cores is the test suite's widest); 0.5 GiB is a DeepSpeed CPU rank's floor before any model state
# (peak RSS 580 MiB per rank, tiny preset, data=2 ZeRO-1)
RANKS_PER_CORE = 4
RANK_FLOOR_BYTES = 512 * 2**20


def build_parser() -> argparse.ArgumentParser:
    ap = trainer_parser("python -m torch_ref.train", __doc__,
                        "xpu: torch.xpu + xccl; cpu: gloo; gpu: CUDA; auto: xpu if available, else CUDA, else cpu")
    ap.add_argument("--init", choices=("jax", "torch"), default="jax",
                    help="jax: jax_impl.model.init_params(seed), the JAX run's exact weights (default; written by "
                         "`python -m jax_impl.init_weights` in a subprocess, so it needs JAX installed); "
                         "torch: torch_ref.model.init_torch (same stds, torch's random stream)")
    ap.add_argument("--init-from", metavar="CKPT|HF_DIR|NPZ",
                    help="start from these weights instead of --init: a jax_impl checkpoint (read by "
                         "`python -m jax_impl.checkpoint export`, in a subprocess), a Hugging Face Llama directory "
                         "(config.json + *.safetensors) or an .npz of the flat JAX names (e.g. written by "
                         "`python -m jax_impl.init_weights`); with --resume auto only until the run has a checkpoint")
    ap.add_argument("--dry-run", action="store_true", help="print the layout and the DeepSpeed config; start nothing")
    ap.add_argument("--quiet", action="store_true", help="print only the first and last step; no loss.png")
    ap.add_argument("--oversubscribe", action="store_true",
                    help=f"start the local ranks even when they are over {RANKS_PER_CORE} per core or their "
                         f"memory floor ({RANK_FLOOR_BYTES / 2**30:.1f} GiB each) exceeds this machine's memory")
    ap.add_argument("--resume", metavar="RUN_DIR|auto",
                    help="continue this run directory from its latest DeepSpeed checkpoint (engine.load_checkpoint); "
                         "auto: this --name's run if it has a checkpoint, else start it fresh in that directory")
    # jax_impl.train's multi-process launch flags, accepted so both CLIs take the same command lines; refused if
    # set (the run-option flags, --ckpt-keep, --on-nonfinite, --watchdog-*, ..., set config keys: check_supported)
    jax_only = ap.add_argument_group("jax_impl.train only (refused here)")
    for flag in ("--coordinator", "--num-processes", "--process-id", "--init-timeout-s"):
        jax_only.add_argument(flag, dest="jaxonly_" + flag[2:].replace("-", "_"), help="JAX only")
    return ap


# What torch_ref does with each config key outside the sections it reads in full (model, optim, data, train):
# the keys below are honoured; UNSUPPORTED ones are refused at a non-default value (check_supported), before any
# worker starts; the [jax] section is never read (performance knobs of jax_impl that leave the arithmetic as is).
SUPPORTED = {
    "parallel": ("mesh", "zero", "hpz", "mics", "mbs", "gas", "gbs",
                 # accepted, not applied: torch_ref has no activation checkpointing (its memory is the no-remat one;
                 # remat=true prints a note), and DeepSpeed's PipelineEngine runs its own 1F1B schedule; the planner
                 # sets both
                 "remat", "pipeline_schedule"),
    "checkpoint": ("every", "every_s"),
    "nonfinite": ("action",),  # "stop" only: a non-finite loss ends the run (exit 3)
}
UNSUPPORTED = {  # key -> what torch_ref does instead
    "parallel.remat_policy": "has no activation checkpointing, so no policy",
    "checkpoint.keep": "keeps every DeepSpeed checkpoint tag",
    "checkpoint.dir": "saves into <run dir>/checkpoints",
    "nonfinite.action": "stops at a non-finite loss (action 'stop')",
    "nonfinite.max_skips": "never skips a step",
    "watchdog.factor": "has no step watchdog",
    "watchdog.min_s": "has no step watchdog",
    "watchdog.first_s": "has no step watchdog",
}


def check_supported(cfg: Config) -> None:
    """Refuse a non-default value of a key torch_ref does not honour (ConfigError naming key, value and fix)."""
    from configs.cli import SHORTHANDS

    default, flags = Config(), {key: f"--{flag.replace('_', '-')}" for flag, key in SHORTHANDS.items()}
    for key, instead in UNSUPPORTED.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value != getattr(getattr(default, section), name):
            flag = f" ({flags[key]})" if key in flags else ""
            raise ConfigError(f"{key}={value!r}{flag} is jax_impl.train only; torch_ref {instead}: drop it "
                              "(or run jax_impl.train)")


def resolve_config(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    # validated by plan_layout: its torch/DeepSpeed-specific checks speak first, then validate_config's
    return resolve_cli(build_parser(), argv, validate=False)


def mesh_auto(cfg: Config, args: argparse.Namespace, ext: launcher_env.LaunchEnv | None
              ) -> tuple[Config, dict[str, Any]]:
    """``--mesh auto``: the planner's layout at ``parallel.gbs`` among those torch_ref runs, the DeepSpeed memory
    model deciding (a resumed run: the layout it recorded). Ranks: ``--nodes`` x the cluster's tiles, else the
    launcher's world size, else the preset's mesh size."""
    from compare.plan import auto_layout  # here, not at import: torch_ref stays importable without compare
    from runtime.rundir import recorded_layout

    resume, _, _ = resolve_resume(cfg, args.resume)
    recorded = recorded_layout(Path(resume)) if resume else None
    n = None
    if args.nodes is None and recorded is None:
        n = ext.world_size if ext else (mesh_devices(cfg.parallel.mesh) or 1)
        print(f"--mesh auto: {n} ranks (" + ("the launcher's world size" if ext else
                                            f"the preset's mesh {cfg.parallel.mesh}") + "); --nodes N plans a "
              "cluster job instead")
    cfg, rec, lines = auto_layout(cfg, framework="torch", nodes=args.nodes, cluster=args.cluster, devices=n,
                                  recorded=recorded)
    if ext is None or ext.rank == 0:
        print("\n".join(lines), flush=True)
    return cfg, rec


# ----------------------------------------------------------------------------- environment
def external_rank_env() -> launcher_env.LaunchEnv | None:
    """This process's rank/world/local rank when an external launcher started it (``runtime.launcher_env``)."""
    return launcher_env.read()


def xpu_unavailable_reason(torch_mod: Any = None, env: Any = None, host: str | None = None) -> str:
    """Why ``torch.xpu`` has no device here, naming everything checked (for ``--platform xpu``'s refusal)."""
    torch_mod = torch_mod if torch_mod is not None else __import__("torch")
    env = os.environ if env is None else env
    host = host or socket.gethostname()
    xpu_build = getattr(getattr(torch_mod, "version", None), "xpu", None)
    has_xpu = hasattr(torch_mod, "xpu")
    facts = [f"torch.xpu.is_available() is False (torch {torch_mod.__version__}, "
             + (f"an XPU build: torch.version.xpu={xpu_build}" if xpu_build else
                "not an XPU build: torch.version.xpu is None" if has_xpu else "no torch.xpu module") + ")"]
    mask = env.get("ZE_AFFINITY_MASK")
    if mask is not None:
        facts.append(f"ZE_AFFINITY_MASK={mask!r} limits the visible devices (unset it: each rank binds its tile)")
    else:
        facts.append("ZE_AFFINITY_MASK is unset")
    if not env.get("PBS_JOBID") or "uan" in host:
        job = "set" if env.get("PBS_JOBID") else "unset"
        facts.append(f"host {host!r} looks like a login node (PBS_JOBID {job}): Aurora's GPUs are on compute nodes")
    return "; ".join(facts)


def select_platform(platform: str) -> tuple[str, str | None]:
    """``--platform`` -> (platform, process-group backend; None = DeepSpeed's accelerator decides). Sets
    DS_ACCELERATOR, which DeepSpeed reads once, at its first ``get_accelerator()``: call before that."""
    import torch

    if platform == "auto":
        platform = ("xpu" if hasattr(torch, "xpu") and torch.xpu.is_available() else
                    "gpu" if torch.cuda.is_available() else "cpu")
    if platform in ("xpu", "sycl"):
        if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
            raise ConfigError(f"--platform xpu: no Intel GPU: {xpu_unavailable_reason(torch)}. Run on an Aurora "
                              "compute node with `module load frameworks/2025.3.1` and .venv-aurora-torch "
                              "(docs/aurora.md), or pass --platform cpu")
        os.environ["DS_ACCELERATOR"] = "xpu"
        return "xpu", "xccl"  # frameworks >= 2025.3.1: torch's own oneCCL backend; the oneccl bindings are gone
    if platform == "gpu":
        if not torch.cuda.is_available():
            raise ConfigError(f"--platform gpu: torch.cuda.is_available() is False (torch {torch.__version__}); "
                              "pass --platform cpu or auto")
        os.environ["DS_ACCELERATOR"] = "cuda"
        return "gpu", None
    os.environ["DS_ACCELERATOR"] = "cpu"
    return "cpu", "gloo"


def bind_device(platform: str, local_rank: int) -> None:
    """Each rank takes device ``local_rank`` of its node, all of whose devices it sees (as ezpz does on Aurora).

    DeepSpeed's engine calls ``set_device(LOCAL_RANK)`` later too, which fails for an index >= the visible
    count -- what a ZE_AFFINITY_MASK wrapper showing each rank one tile, beside LOCAL_RANK 0..11, produced.
    """
    if platform not in ("xpu", "gpu"):
        return
    import torch

    mod = torch.xpu if platform == "xpu" else torch.cuda
    n = mod.device_count()
    if local_rank >= n:
        seen = ", ".join(f"{k}={os.environ.get(k)!r}" for k in ("ZE_AFFINITY_MASK", "ZE_FLAT_DEVICE_HIERARCHY",
                                                                 "CUDA_VISIBLE_DEVICES"))
        raise RuntimeError(f"local rank {local_rank} but torch sees {n} {platform} devices ({seen}): leave every "
                           "device of the node visible (on Aurora: FLAT, no mask) and start at most that many ranks "
                           "per node")
    mod.set_device(local_rank)


TAG_PREFIX = "global_step"


def tag_step(tag: str) -> int | None:
    """``global_step12`` -> 12 (None for any other name)."""
    rest = tag[len(TAG_PREFIX):] if tag.startswith(TAG_PREFIX) else ""
    return int(rest) if rest.isdigit() else None


def ckpt_tags(ckpt_dir: Path) -> list[str]:
    """The ``global_stepN`` directories, oldest first (finished or not: DeepSpeed writes ``latest`` last)."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and tag_step(p.name) is not None]
    return sorted(tags, key=lambda t: tag_step(t) or 0)


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag DeepSpeed's ``latest`` file names (written after the tag is complete), if it names one."""
    try:
        tag = (ckpt_dir / "latest").read_text().strip()
    except OSError:
        return None
    return tag if tag_step(tag) is not None and (ckpt_dir / tag).is_dir() else None


def unreadable_reason(tag_dir: Path) -> str | None:
    """Why a DeepSpeed tag cannot be loaded, or None. torch.save writes zip archives with a CRC per record:
    ``testzip`` reads every byte and checks them, without unpickling (a truncated file has no directory)."""
    import zipfile

    files = sorted(tag_dir.glob("*.pt"))
    if not any(f.name.endswith("model_states.pt") for f in files):
        return f"{tag_dir} has no *model_states.pt"
    for f in files:
        try:
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()
        except (OSError, zipfile.BadZipFile) as e:
            return f"{f.name}: {e}"
        if bad is not None:
            return f"{f.name}: record {bad} fails its CRC"
    return None


def resolve_resume(cfg: Config, resume: str | None) -> tuple[str | None, bool, str | None]:
    """``--resume`` -> (run directory to continue or None, start fresh in the named directory, tag to load).

    PATH may be a run directory (its ``latest`` tag), its ``checkpoints/`` or one ``checkpoints/global_stepK``.
    ``auto``: the newest readable tag up to ``latest``, warning about unreadable newer ones; none: start fresh.
    """
    if resume is None:
        return None, False, None
    if resume != "auto":
        p = Path(resume)
        if tag_step(p.name) is not None and p.parent.name == "checkpoints":
            if not p.is_dir():
                raise ConfigError(f"--resume {resume}: no such checkpoint tag (tags there: "
                                  f"{ckpt_tags(p.parent)})")
            return str(p.parent.parent), False, p.name
        run = p.parent if p.name == "checkpoints" else p
        tag = latest_tag(run / "checkpoints")
        if tag is None:
            raise ConfigError(f"--resume {resume}: no DeepSpeed checkpoint there (checkpoints/latest is missing "
                              "or names no tag)")
        return str(run), False, tag
    if not cfg.train.name:
        raise ConfigError("--resume auto needs --name (the run to continue)")
    run = Path(cfg.train.out_dir) / cfg.train.name
    ck = run / "checkpoints"
    newest = latest_tag(ck)
    if newest is None:
        return None, True, None
    for tag in reversed([t for t in ckpt_tags(ck) if (tag_step(t) or 0) <= (tag_step(newest) or 0)]):
        why = unreadable_reason(ck / tag)
        if why is None:
            if tag != newest:
                print(f"warning: --resume auto: checkpoint {newest} is unreadable; resuming from {tag}, the newest "
                      "readable one", file=sys.stderr, flush=True)
            return str(run), False, tag
        print(f"warning: --resume auto: checkpoint {ck / tag} is unreadable ({why})", file=sys.stderr, flush=True)
    raise ConfigError(f"--resume auto: no readable checkpoint in {ck}; start a new run with another --name, or "
                      "repair or remove them")


def planned_run_dir(cfg: Config, ckpt: dict[str, Any]) -> Path:
    """The run directory this launch writes (the one to lock)."""
    return Path(ckpt["resume"]) if ckpt.get("resume") else run_dir_path(cfg, "torch")


def default_extensions_dir() -> None:
    """Cache DeepSpeed's CPU shm op (compiled on first init_distributed, ~30 s) inside the running venv.

    The venv of this interpreter, not a fixed one: an op built against one torch must not be
    loaded by another (the torch 2.10 tier runs from its own venv beside the main one).
    """
    if "TORCH_EXTENSIONS_DIR" not in os.environ and sys.prefix != sys.base_prefix:
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _memory_bytes() -> int:
    """This machine's physical memory (MemTotal)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_local_ranks(ranks: int, mesh: str, cores: int | None = None, memory: int | None = None) -> None:
    """Refuse (ConfigError naming the numbers and ``--oversubscribe``) a local launch that cannot train here."""
    cores = cores or _cpu_count()
    memory = memory or _memory_bytes()
    floor = ranks * RANK_FLOOR_BYTES
    if ranks <= RANKS_PER_CORE * cores and floor <= memory:
        return
    why = []
    if ranks > RANKS_PER_CORE * cores:
        why.append(f"{ranks / cores:.0f} ranks per core on {cores} cores (limit {RANKS_PER_CORE})")
    if floor > memory:
        why.append(f"at least {floor / 2**30:.1f} GiB ({RANK_FLOOR_BYTES / 2**30:.1f} GiB per rank before any "
                   f"model state) on {memory / 2**30:.1f} GiB of memory")
    raise ConfigError(f"--mesh {mesh} starts {ranks} local ranks: {' and '.join(why)}; the machine would thrash "
                      "rather than train. Use a smaller mesh, start the ranks across nodes with mpiexec/torchrun "
                      "(each process then is one rank), or pass --oversubscribe to start them here anyway")


# ----------------------------------------------------------------------------- entry point
@dataclass
class _Launch:
    """What ``main`` checked before anything starts (``_check_launch``)."""

    ext: launcher_env.LaunchEnv | None
    cfg: Config
    args: argparse.Namespace
    layout: Layout
    platform: str
    decision: dict[str, Any] | None  # --mesh auto's layout decision
    resume: str | None
    fresh_in_place: bool
    tag: str | None
    init: str


def _check_launch(argv: list[str] | None) -> _Launch:
    """The config, layout, platform and resume/init options, checked before any worker or directory exists
    (ConfigError names the value and the fix)."""
    ext = external_rank_env()
    cfg, args = resolve_config(argv)
    jax_only = [f"--{k[8:].replace('_', '-')}" for k, v in vars(args).items() if k.startswith("jaxonly_") and v]
    if jax_only:
        raise ConfigError(f"{', '.join(jax_only)}: jax_impl.train only (torch_ref takes its ranks from the "
                          "launcher's environment); drop them")
    check_supported(cfg)
    decision = None
    if args.mesh == "auto":  # before the layout check, the run directory and any worker
        cfg, decision = mesh_auto(cfg, args, ext)
    layout = plan_layout(cfg, ext.world_size if ext else None)
    if cfg.parallel.remat and (ext is None or ext.rank == 0):  # accepted (presets, the planner), said, not applied
        print("note: parallel.remat=true: torch_ref has no activation checkpointing; every activation is kept",
              file=sys.stderr)
    if args.dry_run:
        platform = cfg.train.platform
    else:
        platform, _ = select_platform(cfg.train.platform)  # refuses a missing accelerator before any worker
    if ext is None and not args.dry_run and not args.oversubscribe:
        check_local_ranks(layout.world_size, cfg.parallel.mesh)
    resume, fresh_in_place, tag = resolve_resume(cfg, args.resume)
    if args.init_from and args.resume not in (None, "auto"):
        raise ConfigError("--resume RUN_DIR and --init-from exclude each other: --resume continues a run, "
                          "--init-from starts a new one from the weights")
    if args.init_from and not Path(args.init_from).exists():
        raise ConfigError(f"--init-from {args.init_from}: no such checkpoint or directory")
    init = "file" if args.init_from and not resume else args.init
    if init == "jax" and (why := jax_init_unavailable()):
        raise ConfigError(f"--init jax (the default) computes the JAX run's initial weights with "
                          f"`python -m jax_impl.init_weights`, but {why}; pass --init torch (torch's own draw), "
                          "or --init-from with weights written where JAX is installed (an .npz from "
                          "`python -m jax_impl.init_weights RUN_DIR/config.json OUT.npz`, a checkpoint, or a "
                          "Hugging Face directory)")
    wants_ckpt = cfg.checkpoint.every or cfg.checkpoint.every_s or resume
    if wants_ckpt and not layout.engine.startswith("deepspeed"):
        raise ConfigError(f"checkpoints are implemented for the DeepSpeed engines; layout {layout.label} runs "
                          f"{layout.engine}: drop --ckpt-every/--ckpt-every-s/--resume for it")
    if tag is not None and (tag_step(tag) or 0) > cfg.train.steps:
        raise ConfigError(f"--steps {cfg.train.steps}, but the checkpoint to resume ({resume}/checkpoints/{tag}) "
                          f"is already at step {tag_step(tag)}: give --steps >= {tag_step(tag)} (the run's "
                          "total, not the steps to add), or resume an older tag with --resume "
                          f"{resume}/checkpoints/{TAG_PREFIX}<K>")
    return _Launch(ext, cfg, args, layout, platform, decision, resume, fresh_in_place, tag, init)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    default_extensions_dir()
    if os.environ.get(RUN_DIR_ENV):  # a worker our launcher started: everything comes from the run dir
        _stop_with_launcher()
        return run_worker(Path(os.environ[RUN_DIR_ENV]))
    try:
        s = _check_launch(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    cfg, args, layout, init = s.cfg, s.args, s.layout, s.init
    if args.dry_run:
        from torch_ref.ds_config import installed_ds_config

        print(f"layout {layout.label}: {layout.description}; {layout.world_size} ranks, mesh {layout.mesh}")
        print(json.dumps(installed_ds_config(cfg), indent=2))
        return {"layout": layout, "ds_config": installed_ds_config(cfg)}
    ckpt = {"resume": s.resume, "resume_tag": s.tag, "fresh_in_place": s.fresh_in_place, "platform": s.platform,
            "init_from": str(Path(args.init_from).resolve()) if init == "file" else None,
            "layout_decision": s.decision}
    if s.ext is not None:
        try:
            return run_worker(None, cfg=cfg, init=init, quiet=args.quiet, ckpt=ckpt)
        except (RunDirError, DataError) as e:  # a configuration or data problem: no retry will help
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except FloatingPointError as e:  # exit 3 as jax_impl.train: a rerun from the last checkpoint repeats it
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(NONFINITE_EXIT) from None
    _check_data(cfg, layout)
    planned = planned_run_dir(cfg, ckpt)
    try:
        lock = lock_run_dir(planned)  # one run per directory, before any work
    except (RunDirBusy, OSError) as e:
        print(f"error: {out_dir_error(e, cfg.train.out_dir)}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        return launch(cfg, layout, init=init, quiet=args.quiet, ckpt=ckpt, run_dir=planned)
    except InitFromError as e:
        print(f"error: --init-from {args.init_from}: {e}" if init == "file" else f"error: --init {init}: {e}",
              file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        lock.release()


def _check_data(cfg: Config, layout: Layout) -> None:
    """Read the data here, once, before any worker starts: bad data is a message (exit 2), and the index maps the
    workers then load are built by one process, not raced for by all."""
    try:
        gbs = cfg.parallel.mbs * cfg.parallel.gas * layout.dp
        build_source(cfg, num_samples=cfg.train.steps * gbs)
        if cfg.train.eval_interval:
            build_source(cfg, num_samples=valid_samples(cfg, gbs), split="valid")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _branch_at(run_dir: Path, tag: str) -> None:
    """Continue ``run_dir`` from ``tag``: later tags (finished or cut short) and metrics rows of the old branch are
    moved to ``abandoned-<time>`` names, and ``latest`` names ``tag`` (written to a temporary file, then renamed)."""
    ck, step = run_dir / "checkpoints", tag_step(tag) or 0
    moved = set_aside(ck, [t for t in ckpt_tags(ck) if (tag_step(t) or 0) > step])
    replace_text(ck / "latest", tag)
    aside = truncate_metrics(run_dir, step)
    if moved or aside:
        print(f"resuming at step {step}: the previous branch's later "
              + " and ".join(([f"checkpoints are in {moved}"] if moved else [])
                             + ([f"metrics rows are in {aside}"] if aside else [])), flush=True)


def prepare_run_dir(cfg: Config, layout: Layout, init: str, quiet: bool, ckpt: dict[str, Any] | None = None,
                    planned: Path | None = None) -> Path:
    """Run directory with config.json, ds_config.json, launch.json and (``--init jax``) init_params.npz.
    ``planned``: the directory the caller locked (``planned_run_dir``)."""
    from torch_ref.ds_config import installed_ds_config

    ckpt = ckpt or {}
    if ckpt.get("resume"):  # continue in place: drop the previous attempt's failure files and result
        run_dir = Path(ckpt["resume"])
        for f in [*run_dir.glob("rank*.err"), run_dir / "result.json"]:
            f.unlink(missing_ok=True)
        _branch_at(run_dir, ckpt.get("resume_tag") or latest_tag(run_dir / "checkpoints") or "")
    else:
        if ckpt.get("fresh_in_place") and cfg.train.name:  # --resume auto, no checkpoint: this run from step 0
            stale = Path(cfg.train.out_dir) / cfg.train.name
            aside = truncate_metrics(stale, 0)  # the attempt's rows (a torn last line dropped) kept aside
            (stale / "metrics.jsonl").unlink(missing_ok=True)
            set_aside(stale / "checkpoints", ckpt_tags(stale / "checkpoints"))  # tags cut short before `latest`
            if aside:
                print(f"--resume auto: {stale} has no checkpoint yet; starting it again from step 0 (the previous "
                      f"attempt's rows are kept in {aside.name})", flush=True)
            for f in [*stale.glob("rank*.err"), stale / "result.json"]:
                f.unlink(missing_ok=True)
        run_dir = make_run_dir(cfg, "torch", planned)
    write_config(run_dir, cfg)
    if layout.engine.startswith("deepspeed"):
        (run_dir / "ds_config.json").write_text(json.dumps(installed_ds_config(cfg), indent=2) + "\n")
    t = time.perf_counter()
    if init == "jax":
        write_jax_init(run_dir / "config.json", run_dir / "init_params.npz")
    elif init == "file":
        write_init_from(Path(ckpt["init_from"]), cfg, run_dir / "init_params.npz")
    (run_dir / "launch.json").write_text(json.dumps({"init": init, "quiet": quiet, **ckpt,
                                                     "init_weights_s": time.perf_counter() - t}) + "\n")
    return run_dir


class InitFromError(ValueError):
    """--init-from weights that cannot be read or do not fit the model; the message says why."""


def _jax_env() -> dict[str, str]:
    # the subprocess imports jax_impl from this source tree, whatever the working directory
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}


def jax_init_unavailable() -> str | None:
    """Why ``--init jax`` cannot run here (no JAX, or no jax_impl beside this package), else None. Looks the
    modules up without importing them: this package never imports JAX."""
    if importlib.util.find_spec("jax") is None:
        return f"this Python ({sys.executable}) has no JAX"
    if not (PROJECT_ROOT / "jax_impl" / "init_weights.py").is_file() and importlib.util.find_spec("jax_impl") is None:
        return f"jax_impl is not installed beside torch_ref ({PROJECT_ROOT})"
    return None


def write_jax_init(config_json: Path, out: Path) -> None:
    """``--init jax``: ``python -m jax_impl.init_weights`` writes ``init_params(model, train.seed)`` of the run's
    config.json as the flat .npz the workers read shard by shard (a subprocess: no JAX in this process)."""
    cmd = [sys.executable, "-m", "jax_impl.init_weights", str(config_json.resolve()), str(out.resolve())]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_jax_env())
    if r.returncode != 0:
        tail = "\n".join(r.stderr.strip().splitlines()[-6:]) or "(no output)"
        raise InitFromError(f"`{' '.join(cmd[1:])}` failed (exit {r.returncode}); pass --init torch or --init-from "
                            f"instead:\n{tail}")


def write_init_from(src: Path, cfg: Config, out: Path) -> None:
    """``--init-from``: the weights as the flat .npz the workers read shard by shard (``NpzInit``).

    A Hugging Face directory is read here (numpy + safetensors); a jax_impl checkpoint by the JAX CLI in a
    subprocess, so this package never imports JAX (an environment without it gets a message saying so)."""
    from torch_ref.weights import NpzInit
    from weightmap import hf
    from weightmap.jaxtorch import unflatten
    from weightmap.npz import save_npz

    if src.is_file():  # an .npz of the flat JAX names: checked against the model, then copied as it is
        try:
            NpzInit(cfg.model, src)  # headers only
        except (ValueError, KeyError, OSError, zipfile.BadZipFile) as e:
            raise InitFromError(f"not an uncompressed .npz of this model's parameters (flat JAX names: embed, "
                                f"layers.wq, ...): {e}") from None
        shutil.copyfile(src, out)
        return
    if (src / hf.CONFIG).is_file():
        try:
            where = str(src / hf.CONFIG)
            hf.check_against(hf.model_fields(json.loads((src / hf.CONFIG).read_text()), where), cfg.model, where)
            _, tensors = hf.read(src)
            save_npz(out, unflatten(hf.to_flat(tensors, cfg.model, where=str(src))))
        except (hf.HFError, json.JSONDecodeError) as e:
            raise InitFromError(str(e)) from None
        return
    cmd = [sys.executable, "-m", "jax_impl.checkpoint", "export", "--to", "npz", str(src), str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_jax_env())
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        if "No module named 'jax" in r.stderr:
            why = ("reading a jax_impl checkpoint needs JAX, which this environment lacks; export it where JAX "
                   "is installed (`python -m jax_impl.checkpoint export --to hf CKPT DIR`) and pass DIR")
        raise InitFromError(why)
    try:
        NpzInit(cfg.model, out)  # checks every array's shape against the model (headers only)
    except (ValueError, KeyError) as e:
        raise InitFromError(f"its parameters do not fit model '{cfg.model.name}': {e}") from None


def launch(cfg: Config, layout: Layout, init: str = "jax", quiet: bool = False, ckpt: dict[str, Any] | None = None,
           run_dir: Path | None = None) -> dict[str, Any]:
    """Start one worker per rank, wait; a failed worker kills the rest and ends the run with its traceback."""
    try:
        run_dir = prepare_run_dir(cfg, layout, init, quiet, ckpt, run_dir)
    except OSError as e:  # a reused --name (no errno) or an --out-dir the file system refuses
        print(f"error: {e}" if e.errno is None else
              f"error: --out-dir {cfg.train.out_dir}: cannot make the run directory there ({e}); pick a writable "
              "directory", file=sys.stderr)
        raise SystemExit(2) from None
    n = layout.world_size
    port = procgroup.free_port()
    threads = os.environ.get("OMP_NUM_THREADS") or "1"  # one per rank: more oversubscribes a shared 2-core box
    procs: list[subprocess.Popen] = []
    base = allocator_env()  # workers start on the trainers' host allocator (runtime/hostmem.py)
    for r in range(n):
        env = {**base, RUN_DIR_ENV: str(run_dir), "RANK": str(r), "LOCAL_RANK": str(r),
               "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": threads, "PYTHONPATH": os.pathsep.join(
                   filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
        cmd = WORKER_COMMAND or [sys.executable, "-m", "torch_ref.train"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=os.getcwd()))
    group = ProcessGroup(procs)
    # SIGTERM/SIGINT go on to every rank, each saves, and this returns only when all have exited
    group.wait(stop_grace_s=float(os.environ.get("TORCH_REF_STOP_GRACE_S", 5.0)))
    failed = group.first_failure()
    if group.received is not None and failed is None:  # every rank stopped as asked (or was killed by a 2nd signal)
        name = signal.Signals(group.received).name
        print(f"torch_ref.train: stopped by {name}; all {n} ranks exited ({_codes(group)}); continue with "
              f"--resume {run_dir}", file=sys.stderr, flush=True)
        raise SystemExit(128 + group.received)
    if failed is not None:
        data_error = _data_error(run_dir, failed)
        if data_error:
            print(f"error: {data_error}", file=sys.stderr)
            raise SystemExit(2)
        raise SystemExit(_failure_report(run_dir, group, failed))
    result = json.loads((run_dir / "result.json").read_text())
    rows = read_metrics(run_dir)
    return {"run_dir": run_dir, "losses": [row["loss"] for row in rows], "metrics": rows, **result}


def _stop_with_launcher() -> None:
    """A worker of our launcher gets SIGTERM (finish the step, save, exit) when the launcher dies, even by
    SIGKILL, which it cannot pass on (Linux PR_SET_PDEATHSIG; elsewhere nothing changes)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before the call above
        os.kill(os.getpid(), signal.SIGTERM)


def _codes(group: ProcessGroup) -> str:
    return ", ".join(f"rank {r}: {group.describe(r)}" for r in range(len(group.procs)))


def _data_error(run_dir: Path, rank: int) -> str | None:
    f = run_dir / f"rank{rank}.err"
    text = f.read_text() if f.exists() else ""
    return text[len(DATA_ERROR):] if text.startswith(DATA_ERROR) else None


def _failure_report(run_dir: Path, group: ProcessGroup, first: int) -> str:
    """The root cause is the first failure (``ProcessGroup.first_failure``: a rank killed by a signal, else the
    first to exit non-zero); its peers fail after it (e.g. gloo 'Connection closed by peer')."""
    err = run_dir / f"rank{first}.err"
    code = group.codes[first]
    if err.exists():
        tb = err.read_text()
    elif code is not None and code < 0:
        tb = f"(no traceback: the worker was {group.describe(first)})"
    else:
        tb = "(no traceback: the worker died without raising)"
    n = len(group.procs)
    return (f"torch_ref.train: rank {first} of {n} failed first ({group.describe(first)}); the others followed or "
            f"were stopped by the launcher ({_codes(group)}). Its traceback:\n{tb}\nrun directory: {run_dir}")


# ----------------------------------------------------------------------------- worker
def run_worker(run_dir: Path | None, cfg: Config | None = None, init: str = "jax", quiet: bool = False,
               ckpt: dict[str, Any] | None = None) -> dict[str, Any]:
    """One rank: init the process group, build the layout's engine, train, log (rank 0)."""
    ext = external_rank_env()
    rank, world, local_rank = (ext.rank, ext.world_size, ext.local_rank) if ext else (0, 1, 0)
    from aurora_data import DataError

    try:
        return _worker(run_dir, rank, world, local_rank, cfg, init, quiet, ckpt or {})
    except DataError as e:  # bad data is a message for the launcher to print (exit 2), not a traceback
        if run_dir is not None:
            (run_dir / f"rank{rank}.err").write_text(f"{DATA_ERROR}{e}")
            raise SystemExit(2) from None
        raise
    except SystemExit:  # stopped by a signal, after saving
        raise
    except BaseException:
        if run_dir is not None:
            (run_dir / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


@dataclass
class TorchRun:
    """One rank's run, built by ``_worker``'s setup functions and shared with the loop's hooks (``ctx``)."""

    rank: int
    world: int
    local_rank: int
    cfg: Config
    init: str
    quiet: bool
    ckpt: dict[str, Any]
    stop: Any = None  # the _StopFlag
    t_start: float = 0.0
    layout: Any = None
    platform: str = "cpu"
    backend: str | None = None
    dev: Any = None
    dist_init_s: float = 0.0
    lock: Any = None  # rank 0's run-directory lock under an external launcher
    run_dir: Path = Path()
    runner: Any = None
    engine: Any = None  # the DeepSpeed engine (None for FSDP2)
    param_bytes: int = 0
    engine_init_s: float = 0.0
    init_s: float = 0.0
    gbs: int = 0
    source: Any = None
    valid: Any = None
    ckpt_dir: Path = Path()
    every: int = 0
    every_s: float = 0.0
    start_step: int = 0
    consumed0: int = 0
    losses: list[float] = field(default_factory=list)
    last_save_t: float = 0.0
    wall_due: bool = False  # rank 0's clock says a wall-clock checkpoint is due (agreed by all ranks)
    stop_sig: int = 0  # a SIGTERM/SIGINT seen by any rank (agreed by all)

    def consumed(self, step: int) -> int:
        """Samples consumed before step ``step`` (1-based)."""
        return self.consumed0 + (step - 1 - self.start_step) * self.gbs


def _worker(run_dir: Path | None, rank: int, world: int, local_rank: int, cfg: Config | None, init: str,
            quiet: bool, ckpt: dict[str, Any]) -> dict[str, Any]:
    from runtime import loop

    r = _start_worker(run_dir, rank, world, local_rank, cfg, init, quiet, ckpt)
    _init_distributed(r)
    if run_dir is None:  # external launcher: rank 0 prepares the run directory, the others learn its path
        _agree_run_dir(r)
    else:
        r.run_dir = run_dir
    _build_engine(r)
    _prepare_steps(r)
    if r.rank == 0:
        _report_start(r)
    log = MetricsLog(r.run_dir, r.cfg, "torch") if r.rank == 0 else None
    r.last_save_t = time.monotonic()
    if os.environ.get("TORCH_REF_PEAK_FROM_STEPS") == "1":
        # peak RSS of the training steps only, without the engine's construction transients
        # (benchmarks/ds_memory_check.py); Linux resets the high-water mark that ru_maxrss reads
        Path("/proc/self/clear_refs").write_text("5")
    end = loop.run(r.start_step, r.cfg.train.steps, functools.partial(_train_step, r), _worker_hooks(r, log),
                   ctx=r)
    return _end_worker(r, end)


def _start_worker(run_dir: Path | None, rank: int, world: int, local_rank: int, cfg: Config | None, init: str,
                  quiet: bool, ckpt: dict[str, Any]) -> TorchRun:
    """Allocator, threads, signal flag; our launcher's workers read the config and options from the run dir."""
    from runtime.hostmem import reuse_host_memory

    reuse_host_memory()  # before torch starts threads: the same allocator settings as the JAX side
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))
    t_start = time.perf_counter()
    stop = _StopFlag()  # SIGTERM/SIGINT: finish the step, save, exit 128 + signal (as jax_impl.train)
    if run_dir is not None:
        cfg = config_from_dict(json.loads((run_dir / "config.json").read_text())["config"])
        launch_opts = json.loads((run_dir / "launch.json").read_text())
        init, quiet = launch_opts["init"], launch_opts["quiet"]
        ckpt = {k: launch_opts.get(k) for k in ("resume", "resume_tag", "fresh_in_place", "platform",
                                                 "layout_decision")}
    assert cfg is not None
    return TorchRun(rank, world, local_rank, cfg, init, quiet, ckpt, stop=stop, t_start=t_start,
                    layout=plan_layout(cfg, world, validate=False))  # validated by the launcher (_check_launch)


def _init_distributed(r: TorchRun) -> None:
    """The rank's environment, platform and device, then the process group (DeepSpeed's init_distributed)."""
    os.environ.update({"RANK": str(r.rank), "WORLD_SIZE": str(r.world), "LOCAL_RANK": str(r.local_rank)})
    # under mpiexec nobody sets MASTER_ADDR: rank 0's host is the first of $PBS_NODEFILE / the SLURM node list
    os.environ.setdefault("MASTER_ADDR", launcher_env.coordinator_host() or "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    r.platform, backend = select_platform(r.ckpt.get("platform") or r.cfg.train.platform)  # before deepspeed
    bind_device(r.platform, r.local_rank)

    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    r.backend = backend or acc.communication_backend_name()  # gloo on CPU, xccl on xpu, nccl on CUDA
    r.dev = torch.device(acc.current_device_name()) if r.platform != "cpu" else torch.device("cpu")
    timeout = timedelta(seconds=float(os.environ.get("TORCH_REF_PG_TIMEOUT", 300)))
    t = time.perf_counter()
    deepspeed.init_distributed(dist_backend=r.backend, auto_mpi_discovery=False, timeout=timeout, verbose=False,
                               rank=r.rank, world_size=r.world)
    r.dist_init_s = time.perf_counter() - t


def _agree_run_dir(r: TorchRun) -> None:
    """Rank 0 locks and prepares the run directory and tells the others where, or why it could not: every rank
    then stops, none waits out the process-group timeout."""
    import torch.distributed as dist

    box: list[Any] = [None]
    if r.rank == 0:
        try:
            planned = planned_run_dir(r.cfg, r.ckpt)
            r.lock = lock_run_dir(planned)  # held by rank 0 for the run's life
            box = [{"run_dir": str(prepare_run_dir(r.cfg, r.layout, r.init, r.quiet, r.ckpt, planned))}]
        except (OSError, ConfigError, RunDirBusy) as e:
            box = [{"error": f"{type(e).__name__}: {e}"}]
    dist.broadcast_object_list(box, src=0)
    if "error" in box[0]:
        dist.destroy_process_group()
        raise RunDirError(f"rank 0 could not prepare the run directory: {box[0]['error']}")
    r.run_dir = Path(box[0]["run_dir"])


def _build_engine(r: TorchRun) -> None:
    """The layout's engine with the run directory's DeepSpeed config; each engine builds its own model and holds
    only its share (torch_ref.build); the initial weights are read or drawn one parameter shard at a time."""
    from torch_ref.build import local_param_bytes
    from torch_ref.ds_config import installed_ds_config
    from torch_ref.weights import weight_source

    t = time.perf_counter()
    ds_json = r.run_dir / "ds_config.json"  # the config DeepSpeed gets is the one in the run directory
    conf = json.loads(ds_json.read_text()) if ds_json.exists() else installed_ds_config(r.cfg)
    r.runner = build_runner(r.cfg, r.layout, conf, weight_source(r.cfg.model, r.init, r.cfg.train.seed, r.run_dir))
    r.param_bytes = local_param_bytes(r.runner.model)
    r.engine_init_s = time.perf_counter() - t
    r.init_s = time.perf_counter() - r.t_start
    r.engine = getattr(r.runner, "engine", None)


def _prepare_steps(r: TorchRun) -> None:
    """Data sources, checkpoint options and, with ``--resume``, the engine's checkpoint (step, samples)."""
    from aurora_data import build_source

    cfg, p = r.cfg, r.cfg.parallel
    r.gbs = p.mbs * p.gas * r.layout.dp
    r.source = build_source(cfg, num_samples=cfg.train.steps * r.gbs)
    r.valid = (build_source(cfg, num_samples=valid_samples(cfg, r.gbs), split="valid") if cfg.train.eval_interval
               else None)
    # the [checkpoint] section of config.json, which the launcher rewrites on a resume (it is not hashed)
    r.ckpt_dir, r.every, r.every_s = r.run_dir / "checkpoints", cfg.checkpoint.every, cfg.checkpoint.every_s
    if (r.every or r.every_s or r.ckpt.get("resume")) and r.engine is None:
        raise RuntimeError(f"checkpoints are implemented for the DeepSpeed engines; layout {r.layout.label} runs "
                           f"{r.layout.engine}")
    if r.ckpt.get("resume"):
        t = time.perf_counter()
        path, client = r.engine.load_checkpoint(str(r.ckpt_dir), tag=r.ckpt.get("resume_tag"))
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {r.ckpt_dir}")
        r.start_step, r.consumed0 = int(client["step"]), int(client["consumed_samples"])
        if r.rank == 0:
            print(f"resumed from {path} (step {r.start_step}, consumed samples {r.consumed0}) in "
                  f"{time.perf_counter() - t:.2f}s", flush=True)


def _report_start(r: TorchRun) -> None:
    """Rank 0: the run's line, the init times and meta.json."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    from runtime.hostmem import host_allocator

    cfg, p, layout = r.cfg, r.cfg.parallel, r.layout
    print(f"run {r.run_dir} | {cfg.model.name} {cfg.model.n_params():,} params | {layout.label}: "
          f"{layout.description} | {r.world} ranks x {torch.get_num_threads()} threads | gbs {r.gbs} = mbs {p.mbs} "
          f"x gas {p.gas} x dp {layout.dp} | seq {cfg.data.seq_len} | {cfg.train.dtype} | init {r.init}")
    print(f"init: process group {r.dist_init_s:.1f}s (DeepSpeed init_distributed, incl. its shm op), "
          f"engine {r.engine_init_s:.1f}s (deepspeed.initialize / FSDP2), total {r.init_s:.1f}s", flush=True)
    write_meta(r.run_dir, {
        "framework": "torch", "torch": torch.__version__, "deepspeed": deepspeed.__version__,
        "platform": r.platform, "accelerator": get_accelerator().device_name(), "backend": r.backend,
        "world_size": r.world, "devices": r.world,
        "mesh": layout.mesh, "layout": layout.label, "layout_impl": layout.description, "engine": layout.engine,
        "zero": p.zero, "dtype": cfg.train.dtype, "gbs": r.gbs, "init": r.init, "param_bytes_rank0": r.param_bytes,
        "threads_per_rank":
        torch.get_num_threads(), "host_allocator": host_allocator(), "dist_init_s": r.dist_init_s,
        "engine_init_s": r.engine_init_s, "init_s": r.init_s, "data": getattr(r.source, "meta", None),
        "layout_decision": r.ckpt.get("layout_decision"),
    })


# ----------------------------------------------------------------------------- the loop: one step and its hooks
def _rank_tokens(r: TorchRun, src: Any, first: int) -> Any:
    """This rank's microbatches of the global batch starting at sample ``first``."""
    import numpy as np
    import torch

    from aurora_data import global_batch, rank_slice

    p = r.cfg.parallel
    return torch.from_numpy(np.ascontiguousarray(rank_slice(
        global_batch(src, first, p.mbs, p.gas, r.layout.dp), r.layout.dp_rank(r.rank), p.mbs))).long().to(r.dev)


def _train_step(r: TorchRun, step: int) -> dict[str, Any]:
    """One optimizer step and its metrics row; the loss (mean over ranks), the peak RSS, rank 0's wall-clock
    checkpoint decision and any rank's stop signal are agreed in two all-reduces."""
    import torch
    import torch.distributed as dist

    consumed = r.consumed(step)
    tokens = _rank_tokens(r, r.source, consumed)
    lr = r.runner.set_lr(lr_at(r.cfg, step - 1))
    t = time.perf_counter()
    local_loss, gnorm = r.runner.step(tokens)
    wall_due = float(r.rank == 0 and r.every_s > 0 and time.monotonic() - r.last_save_t >= r.every_s)
    stats = torch.tensor([float(local_loss), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0,
                          wall_due, float(r.stop.signum or 0)], dtype=torch.float64, device=r.dev)
    peak = stats[1:].clone()
    dist.all_reduce(stats[:1])  # every rank's loss covers as many tokens: the mean is the global-batch loss
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    stats, peak = stats.cpu(), peak.cpu()
    dt = time.perf_counter() - t
    loss = float(stats[0]) / r.world
    r.losses.append(loss)
    r.wall_due, r.stop_sig = bool(peak[1] > 0), int(peak[2])
    sps, seq = r.gbs / dt, r.cfg.data.seq_len
    return {"step": step, "loss": loss, "lr": lr, "grad_norm": gnorm, "step_time_s": dt, "samples_per_s": sps,
            "tokens_per_s_per_device": sps * seq / r.world,
            "tflops_per_device": sps * r.cfg.model.flops_per_sample(seq) / r.world / 1e12,
            "consumed_samples": consumed + r.gbs, "peak_mem_bytes": int(peak[0])}


def _evaluate(r: TorchRun, at: int) -> float:
    """Validation loss after step ``at``: mean over ``eval_iters`` global batches of the valid split."""
    import torch
    import torch.distributed as dist

    cfg = r.cfg
    first = valid_offset(cfg, at, r.gbs)
    total = sum(float(r.runner.eval_loss(_rank_tokens(r, r.valid, first + i * r.gbs)))
                for i in range(cfg.train.eval_iters))
    v = torch.tensor([total / cfg.train.eval_iters], dtype=torch.float64, device=r.dev)
    dist.all_reduce(v)  # as the training loss: the mean over ranks is the global batches' loss
    return float(v.cpu()[0]) / r.world


def _progress_line(r: TorchRun, step: int, row: dict[str, Any]) -> str | None:
    """Every step's line (``--quiet``: the first, the last and those with an evaluation)."""
    val = row.get("val_loss")
    if r.quiet and step not in (1, r.cfg.train.steps) and val is None:
        return None
    vs = f" | val {val:.6f}" if val is not None else ""
    return (f"step {step:>5} | loss {row['loss']:.6f}{vs} | lr {row['lr']:.3e} | gnorm {row['grad_norm']:.4f} | "
            f"{row['step_time_s'] * 1e3:.0f} ms | {row['samples_per_s']:.2f} samples/s | "
            f"{row['tokens_per_s_per_device']:.0f} tok/s/dev | {row['tflops_per_device']:.5f} TFLOPS/dev | "
            f"peak {row['peak_mem_bytes'] / 2**20:.0f} MiB")


class _FiniteHook(BaseHook):
    """A non-finite loss ends the run (exit 3, as jax_impl.train's default)."""

    def __init__(self, r: TorchRun) -> None:
        self.r = r

    def after_step(self, step: int, row: dict[str, Any]) -> Stop | None:
        loss = row["loss"]
        if math.isfinite(loss):
            return None
        return Stop(f"loss became {loss} at step {step}; run {self.r.run_dir}", code=NONFINITE_EXIT)


def _save(r: TorchRun, step: int) -> None:
    """Every rank writes its own ZeRO partition; rank 0 then updates ``latest``."""
    t = time.perf_counter()
    r.engine.save_checkpoint(str(r.ckpt_dir), tag=f"global_step{step}",
                             client_state={"step": step, "consumed_samples": r.consumed(step) + r.gbs})
    r.last_save_t = time.monotonic()
    if r.rank == 0 and not r.quiet:
        print(f"checkpoint step {step} -> {r.ckpt_dir} ({time.perf_counter() - t:.2f}s)", flush=True)


def _worker_hooks(r: TorchRun, log: Any) -> list[Any]:
    """The loop's hooks, in the order they act after each step (see runtime/loop.py)."""
    from runtime import loop

    steps = r.cfg.train.steps

    def due(step: int) -> bool:  # the interval, the wall clock, a stop signal, and the last step
        return bool((r.every and step % r.every == 0) or r.wall_due or (r.stop_sig and r.engine is not None)
                    or ((r.every or r.every_s) and step == steps))

    def stopped(step: int, sig: int) -> str:
        saved = (f"checkpoint in {r.ckpt_dir}; continue with --resume {r.run_dir}" if r.engine is not None else
                 f"no checkpoint (layout {r.layout.label} runs {r.layout.engine})")
        return f"stopped by {signal.Signals(sig).name} after step {step}; {saved}"

    hooks: list[Any] = [loop.EvalHook(lambda n: r.valid is not None and eval_due(r.cfg, n),
                                      functools.partial(_evaluate, r))]
    if log is not None:  # rank 0
        hooks += [loop.MetricsLogHook(log),
                  loop.ProgressHook(functools.partial(_progress_line, r), functools.partial(print, flush=True))]
    return [*hooks, _FiniteHook(r), loop.CheckpointHook(due, functools.partial(_save, r)),
            *loop.installed_hooks("torch"),
            loop.SignalHook(lambda: r.stop_sig, stopped, checkpoint=False)]  # saved by the CheckpointHook


def _end_worker(r: TorchRun, end: Any) -> dict[str, Any]:
    """After the loop: a stop (exit 3 for a non-finite loss, else 128 + signal) or rank 0's result.json, final
    line and loss.png; then the process group ends."""
    import torch.distributed as dist

    if end.stop is not None and end.stop.code == NONFINITE_EXIT:
        raise FloatingPointError(end.stop.reason)
    if end.stop is not None:
        if r.rank == 0:
            print(end.stop.reason, file=sys.stderr, flush=True)
        dist.barrier()
        dist.destroy_process_group()
        raise SystemExit(end.stop.code)
    if r.rank == 0:
        (r.run_dir / "result.json").write_text(json.dumps({
            "layout": r.layout.label, "layout_impl": r.layout.description, "world_size": r.world,
            "dist_init_s": r.dist_init_s, "engine_init_s": r.engine_init_s, "init_s": r.init_s}) + "\n")
        print(f"done: loss {r.losses[0]:.4f} -> {r.losses[-1]:.4f}; metrics in {r.run_dir / 'metrics.jsonl'}"
              if r.losses else f"done: the checkpoint was already at step {r.cfg.train.steps}; nothing to train")
        if not r.quiet and r.losses:
            from compare.plot import write_run_plot  # loss.png; a failure there only warns

            write_run_plot(r.run_dir)
    dist.barrier()
    dist.destroy_process_group()
    if r.lock is not None:
        r.lock.release()
    return {"run_dir": r.run_dir, "losses": r.losses, "dist_init_s": r.dist_init_s,
            "engine_init_s": r.engine_init_s}


class _StopFlag:
    """Records the first SIGTERM/SIGINT instead of dying at once; the training loop then saves and stops."""

    def __init__(self) -> None:
        self.signum: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.signum is None:
            self.signum = signum


class RunDirError(RuntimeError):
    """Rank 0 could not prepare the run directory (every rank raises it)."""


def build_runner(cfg: Config, layout: Layout, conf: dict[str, Any], src):
    """The layout's engine; it builds its own (partitioned) model from the initial-weight source SRC."""
    from torch_ref import engines

    if layout.engine == "deepspeed-pipe":
        return engines.PipelineRunner(cfg, src, conf, layout)
    if layout.engine == "fsdp2-mics":
        return engines.FSDP2MicsRunner(cfg, src, layout)
    if layout.engine == "deepspeed-mics":
        return engines.DeepSpeedMicsRunner(cfg, src, conf)
    if layout.shape.tensor > 1:
        return engines.TensorParallelRunner(cfg, src, conf, layout)
    return engines.DeepSpeedRunner(cfg, src, conf)


def cli(argv: list[str] | None = None) -> None:
    """``python -m torch_ref.train``: main(), and a worker of our own launcher ends without interpreter teardown."""
    from runtime.hostmem import reexec_with_allocator

    reexec_with_allocator()  # the host allocator both trainers run under (runtime/hostmem.py)
    try:
        main(argv)
    except SystemExit as e:  # a worker stopped by a signal (after saving) or by bad data: the same fast exit
        if os.environ.get(RUN_DIR_ENV) and isinstance(e.code, int):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.code)
        raise
    if os.environ.get(RUN_DIR_ENV):
        # a worker of our own launcher, finished and flushed: skip interpreter teardown, where a C++ thread of
        # the gloo / AutoTP stack was seen to abort (SIGABRT) after a complete run, failing it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    cli()
