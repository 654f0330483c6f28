"""PBS job scripts for Aurora (ALCF) that run ``jax_impl.train`` or ``torch_ref.train`` on N nodes.

    python -m scripts.aurora.launch --trainer jax --nodes 8 -A MyProject --preset llama2-70b \\
        --mesh data=8,fsdp=12 --parallel.hpz=true --print-only
    python -m scripts.aurora.launch --trainer torch --nodes 8 -A MyProject --preset llama2-70b \\
        --mesh data=8,fsdp=12 --zero 3 --parallel.hpz=true --out jobs/ds_hpz_8n.pbs   # then: qsub jobs/...

The job picks its queue from nodes x walltime (ALCF's table, scripts/aurora/alcf.py), exports the
documented oneCCL/libfabric settings and WORLD_SIZE (PALS's mpiexec sets ranks but no world size),
starts one rank per tile (torch, and JAX with --jax-ppn 12) or one JAX process per node (the default),
each binding its own tiles in-app with all 12 visible. Both trainers run with --resume auto and
wall-clock checkpoints sized to the walltime; a failed attempt is retried inside the job while time
is left (not after exit 2, a configuration error). The torch job loads the pinned frameworks module and
.venv-aurora-torch; the JAX job only .venv-aurora. Details: docs/aurora.md.

NOT RUN: generated and unit-tested (tests/test_aurora_job.py) without Aurora access; nothing here has
been submitted to PBS.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from configs import ConfigError, load_config, validate_config
from configs.schema import parse_overrides
from scripts.aurora import alcf

TILES_PER_NODE = 12
FRAMEWORKS_MODULE = "frameworks/2025.3.1"  # torch 2.10 + xccl, Python 3.12 (ALCF PyTorch page)
VENVS = {"jax": "${PBS_O_WORKDIR}/.venv-aurora", "torch": "${PBS_O_WORKDIR}/.venv-aurora-torch"}
# the plugin finds its oneAPI 2025.1 libraries by RUNPATH, which LD_LIBRARY_PATH overrides: a oneAPI module
# loaded by default must not hand it another libsycl/MKL/MPI (docs/aurora.md "Two oneAPI runtimes")
LIB_FIRST = 'export LD_LIBRARY_PATH="$VENV/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"\n'
VENV_RECIPES = {"jax": "make aurora-env (a plain Python >= 3.12, no frameworks module)",
                "torch": "the .venv-aurora-torch recipe in docs/aurora.md (module load "
                         f"{FRAMEWORKS_MODULE}; venv --system-site-packages; DeepSpeed >= 0.18.7 --no-deps)"}
NO_RETRY = {2: "a configuration error", 3: "a non-finite loss (a rerun from the same checkpoint repeats it)"}
JAX_UNKNOWN = """\
# JAX on Aurora, what is unknown until this runs: no Intel or ALCF document shows multi-process JAX there.
#   Whether jax-oneapi-plugin's client joins jax.distributed across processes, whether its collectives work
#   across processes (over what transport) and whether it honours jax_oneapi_visible_devices (--jax-ppn 12)
#   has not been seen to run anywhere we know of. With one process per node (--jax-ppn 1, the default) a
#   node's 12 tiles stay inside one process: 1 node needs no cross-process step at all; N nodes need it only
#   between nodes.
"""


@dataclass
class Job:
    trainer: str
    nodes: int
    ppn: int
    name: str
    queue: str = ""
    walltime_s: int = 0
    ckpt_every_s: int = 0
    env: dict[str, str] = field(default_factory=dict)
    mpiexec: list[str] = field(default_factory=list)
    pbs: str = ""
    argv: list[str] = field(default_factory=list)


def default_ckpt_every_s(walltime_s: int) -> int:
    """A sixth of the walltime, between 10 minutes and 1 hour: at most ~1/6 of a job's work is lost to a failure,
    and a 70B save (minutes) is not repeated more than ~6 times an hour-long job."""
    return max(600, min(3600, walltime_s // 6))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m scripts.aurora.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trainer", choices=("jax", "torch"), required=True)
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("-A", "--account", required=True, help="the ALCF project to charge (#PBS -A); no default")
    ap.add_argument("--preset", default="llama2-70b")
    ap.add_argument("--mesh", required=True, help="the trainer's --mesh; its device count must be nodes x 12")
    ap.add_argument("--zero", type=int, choices=(0, 1, 2, 3))
    ap.add_argument("--steps", type=int)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    ap.add_argument("--name", help="run (and PBS job) name; default <preset>-<trainer>-<nodes>n")
    ap.add_argument("--out-dir", default="runs")
    ap.add_argument("--ckpt-every", type=int, default=0, help="also checkpoint every N steps (default 0: off)")
    ap.add_argument("--ckpt-every-s", type=int,
                    help="checkpoint when this many seconds passed since the last one; default: walltime / 6, "
                         "between 600 and 3600; 0: off")
    ap.add_argument("--jax-ppn", type=int, choices=(1, TILES_PER_NODE), default=1,
                    help="JAX processes per node: 1 (default: one process drives the node's 12 tiles) or 12")
    ap.add_argument("--queue", default="auto", help="auto (default: from nodes and walltime) or one of "
                    + ", ".join(alcf.QUEUES))
    ap.add_argument("--walltime", default="06:00:00", help="[[HH:]MM:]SS (default 06:00:00)")
    ap.add_argument("--filesystems", default="flare:home")
    ap.add_argument("--frameworks-module", "--module", dest="module", default=FRAMEWORKS_MODULE,
                    help=f"module the torch job loads (default {FRAMEWORKS_MODULE}); the JAX job loads none")
    ap.add_argument("--venv", help="the venv to activate; default ${PBS_O_WORKDIR}/.venv-aurora (jax) or "
                    ".venv-aurora-torch (torch)")
    ap.add_argument("--retries", type=int, default=2,
                    help="rerun a failed attempt (with --resume auto) up to N times inside the job (default 2)")
    ap.add_argument("--retry-min-s", type=int, default=900,
                    help="start a retry only with at least this many seconds of walltime left (default 900)")
    ap.add_argument("--workdir", default="${PBS_O_WORKDIR}")
    ap.add_argument("--out", help="write the PBS script here (executable)")
    ap.add_argument("--print-only", action="store_true", help="print the script, write nothing")
    return ap


def make_job(args: argparse.Namespace, extra: list[str], argv: list[str] | None = None) -> Job:
    """The job for parsed flags; ``extra`` are trainer overrides (``--parallel.hpz=true`` ...), checked here."""
    if args.nodes < 1:
        raise ConfigError(f"--nodes {args.nodes} must be >= 1")
    if args.retries < 0:
        raise ConfigError(f"--retries {args.retries} must be >= 0")
    walltime_s = alcf.parse_walltime(args.walltime)
    queue = alcf.choose_queue(args.nodes, walltime_s, args.queue)
    overrides: dict[str, object] = {"parallel.mesh": args.mesh, "train.dtype": args.dtype, "train.platform": "xpu"}
    if args.zero is not None:
        overrides["parallel.zero"] = args.zero
    if args.steps is not None:
        overrides["train.steps"] = args.steps
    overrides.update(parse_overrides(extra))
    cfg = load_config(args.preset, overrides)
    n_tiles = args.nodes * TILES_PER_NODE
    validate_config(cfg, n_tiles)  # the layout's errors now, not after hours in the queue
    n_mesh = cfg.layout(n_tiles).world
    if n_mesh != n_tiles:
        raise ConfigError(f"--mesh {args.mesh} uses {n_mesh} tiles but {args.nodes} nodes have {n_tiles}; "
                          f"make the mesh's product {n_tiles} (one axis may be -1)")
    ppn = args.jax_ppn if args.trainer == "jax" else TILES_PER_NODE
    name = args.name or f"{args.preset}-{args.trainer}-{args.nodes}n"
    every_s = default_ckpt_every_s(walltime_s) if args.ckpt_every_s is None else args.ckpt_every_s
    job = Job(args.trainer, args.nodes, ppn, name, queue, walltime_s, every_s,
              argv=list(argv) if argv is not None else sys.argv[1:])
    job.env = {s.name: s.value for s in alcf.ENV}
    job.env.update({
        # PALS's mpiexec gives each rank PALS_RANKID/PMIX_RANK but no world size (runtime/launcher_env.py)
        "WORLD_SIZE": "$((NNODES * PPN))", "LOCAL_WORLD_SIZE": "${PPN}",
        "MASTER_ADDR": "$(head -n 1 \"$PBS_NODEFILE\")", "MASTER_PORT": "29500",
        "OMP_NUM_THREADS": "4" if ppn == TILES_PER_NODE else "16",  # 4 = the cores each tile rank is bound to
        "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"})
    common = ["--preset", args.preset, "--mesh", args.mesh, "--dtype", args.dtype, "--name", name,
              "--out-dir", args.out_dir, "--platform", "xpu", "--resume", "auto"]
    if args.zero is not None:
        common += ["--zero", str(args.zero)]
    if args.steps is not None:
        common += ["--steps", str(args.steps)]
    if args.ckpt_every:
        common += ["--ckpt-every", str(args.ckpt_every)]
    if every_s:
        common += ["--ckpt-every-s", str(every_s)]
    if args.trainer == "jax":
        job.env["JAX_COORDINATOR_PORT"] = "1234"
        cmd = ["python", "-m", "jax_impl.train", *common, *extra]
    else:
        job.env["TORCH_REF_PG_TIMEOUT"] = "1800"
        cmd = ["python", "-m", "torch_ref.train", *common, "--init", "torch", *extra]
    bind = alcf.CPU_BIND_12 if ppn == TILES_PER_NODE else alcf.CPU_BIND_1
    job.mpiexec = ["mpiexec", "-n", "$((NNODES * PPN))", "--ppn", "${PPN}", "--pmi=pmix", "--envall",
                   "--cpu-bind", bind, *cmd]
    job.pbs = render(job, args)
    return job


def _q(word: str) -> str:
    """Shell-quote, but leave ``$VAR``/``$((..))``/``$(..)`` expansions to the job's shell."""
    return f'"{word}"' if "$" in word else shlex.quote(word)


def render(job: Job, args: argparse.Namespace) -> str:
    env_lines = "\n".join(f"export {k}={v if v.startswith('$(') else _q(v)}" for k, v in job.env.items())
    lines: list[list[str]] = [[]]
    for w in job.mpiexec:  # a new line before an option (never between a flag and its value) or the program
        if lines[-1] and (w.startswith("--") or w == "python") and sum(len(x) + 1 for x in lines[-1]) > 60:
            lines.append([])
        lines[-1].append(_q(w))
    cmd = " \\\n        ".join(" ".join(line) for line in lines)
    venv = args.venv or VENVS[job.trainer]
    place = "scatter:group=tier0" if job.nodes <= alcf.RACK_NODES else "scatter"
    module = (f'module load {args.module} || {{ echo "error: module load {args.module} failed: the torch job '
              f'needs it (--frameworks-module)" >&2; exit 2; }}\n') if job.trainer == "torch" else (
        "# no frameworks module: the plugin brings its own oneAPI runtime (only the GPU driver's Level Zero "
        "loader is used)\n")
    no_retry_cases = "\n".join(f'        {rc}) echo "exit {rc}: {why}; not retrying" >&2; break ;;'
                               for rc, why in NO_RETRY.items())
    watchdog = ('        75) echo "exit 75: a training step hung and the watchdog ended the run (all stacks in the '
                'job log)" >&2 ;;\n'
                '        69) echo "exit 69: a process did not join within --init-timeout-s (the message names it)" '
                '>&2 ;;\n') if job.trainer == "jax" else ""
    return f"""#!/bin/bash -l
# {job.name}: {job.trainer} trainer, {job.nodes} Aurora nodes x {TILES_PER_NODE} tiles, {job.ppn} process(es) per node.
# Generated by: python -m scripts.aurora.launch {" ".join(shlex.quote(a) for a in job.argv)}
# NOT RUN: generated and unit-tested without Aurora access; nothing here was ever submitted to PBS.
# Queue {job.queue} for {job.nodes} nodes x {alcf.hms(job.walltime_s)} (ALCF queue table: scripts/aurora/alcf.py).
# Checkpoints every {job.ckpt_every_s}s of wall clock and at the last step; --resume auto continues this run.
{JAX_UNKNOWN if job.trainer == "jax" else ""}#PBS -N {job.name[:15]}
#PBS -A {args.account}
#PBS -q {job.queue}
#PBS -l select={job.nodes}
#PBS -l place={place}
#PBS -l walltime={alcf.hms(job.walltime_s)}
#PBS -l filesystems={args.filesystems}
#PBS -k doe
#PBS -j oe
set -uo pipefail
cd "{args.workdir}" || {{ echo "error: cannot cd to {args.workdir}" >&2; exit 2; }}
{module}VENV="{venv}"
if [ ! -f "$VENV/bin/activate" ]; then
    echo "error: venv $VENV is missing; build it with {VENV_RECIPES[job.trainer]}, or pass --venv" >&2
    exit 2
fi
source "$VENV/bin/activate"
{LIB_FIRST if job.trainer == "jax" else ""}
NNODES=$(wc -l < "$PBS_NODEFILE")
PPN={job.ppn}
if [ "$NNODES" -ne {job.nodes} ]; then echo "expected {job.nodes} nodes, PBS gave $NNODES" >&2; exit 2; fi
{env_lines}

# attempts: the first, then up to RETRIES reruns (each continues from the last checkpoint, --resume auto)
# while at least RETRY_MIN_S seconds of the walltime are left
WALLTIME_S={job.walltime_s}
RETRIES={args.retries}
RETRY_MIN_S={args.retry_min_s}
attempt=0
while true; do
    attempt=$((attempt + 1))
    echo "attempt $attempt of $((RETRIES + 1)) at $(date) (${{SECONDS}}s into the job)"
    {cmd}
    rc=$?
    if [ $rc -eq 0 ]; then break; fi
    case $rc in
{no_retry_cases}
{watchdog}        *) echo "exit $rc" >&2 ;;
    esac
    left=$((WALLTIME_S - SECONDS))
    if [ $attempt -gt $RETRIES ]; then echo "no retries left ($RETRIES)" >&2; break; fi
    if [ $left -lt $RETRY_MIN_S ]; then
        echo "not retrying: ${{left}}s of walltime left, under RETRY_MIN_S=$RETRY_MIN_S" >&2; break
    fi
    echo "retrying: ${{left}}s of walltime left" >&2
done
exit $rc
"""


def main(argv: list[str] | None = None) -> Job:
    args, extra = build_parser().parse_known_args(argv)
    try:
        job = make_job(args, extra, argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.out and not args.print_only:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(job.pbs)
        out.chmod(0o755)
        print(f"wrote {out}: qsub {out}")
    else:
        print(job.pbs, end="")
    return job


if __name__ == "__main__":
    main()
