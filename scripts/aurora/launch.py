"""PBS job scripts for Aurora (ALCF) that start ``jax_impl.train`` or ``torch_ref.train`` on N nodes.

    python -m scripts.aurora.launch --trainer jax --nodes 8 --preset llama2-70b --mesh data=8,fsdp=12 \\
        --parallel.hpz=true --ckpt-every 100 --print-only
    python -m scripts.aurora.launch --trainer torch --nodes 8 --preset llama2-70b --mesh data=8,fsdp=12 \\
        --zero 3 --parallel.hpz=true --out jobs/ds_hpz_8n.pbs          # then: qsub jobs/ds_hpz_8n.pbs

NOT RUN: these scripts were generated and unit-tested (tests/test_launchers.py) on a machine without
Aurora access, Intel GPUs, oneCCL or intel-extension-for-pytorch; nothing here has been submitted to
Aurora's PBS. Check the module name, the account/queue/filesystems and the oneCCL settings against
ALCF's current documentation before the first submission.

What a job does (one MPI rank per PVC tile, 12 per node, PALS's ``mpiexec``):

- ``module load frameworks`` (torch + intel-extension-for-pytorch + oneCCL bindings) and an optional
  venv holding this project (``pip install -e '.[xpu]'`` for JAX: intel-extension-for-openxla, which
  pairs with its own jax version -- see README "Platforms").
- tile binding: ``scripts/aurora/tile_bind.sh`` sets ``ZE_FLAT_DEVICE_HIERARCHY=FLAT`` and
  ``ZE_AFFINITY_MASK=$PALS_LOCAL_RANKID``, so each rank sees one tile; CPU cores bound in blocks of 8
  away from cores 0 and 52 (``--cpu-bind list:...``, the OS cores).
- JAX: ``--platform sycl``; every rank joins ``jax.distributed`` with the first host of
  ``$PBS_NODEFILE`` as coordinator, ``--num-processes`` = nodes x 12, its rank from ``PALS_RANKID``
  (``jax_impl/distributed.py``); only process 0 writes the run directory. ``--jax-ppn 1`` instead
  starts one process per node that sees all 12 tiles.
- torch: DeepSpeed on ``xpu`` (``DS_ACCELERATOR=xpu``, IPEX) with the ``ccl`` backend; ranks from the
  PALS/PMI environment, ``MASTER_ADDR`` = first host; ``--init torch`` (the 70B cannot take JAX's
  one-host initialisation).
- both: ``--resume auto`` (JAX) / ``--resume RUN_DIR`` (torch, when it has a checkpoint) so a requeued
  job continues from its last checkpoint; JAX exits 75 when its watchdog ends a hung step, which the
  script reports.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from configs import ConfigError, load_config, validate_config
from configs.schema import parse_overrides

TILES_PER_NODE = 12
# 8 cores per tile rank, skipping cores 0 and 52 (the first core of each socket, left to the OS)
CPU_BIND = "list:1-8:9-16:17-24:25-32:33-40:41-48:53-60:61-68:69-76:77-84:85-92:93-100"
CCL_ENV = {  # oneCCL over Slingshot (cxi) with PALS/PMIx, as ALCF's frameworks module expects
    "CCL_PROCESS_LAUNCHER": "pmix",
    "CCL_ATL_TRANSPORT": "mpi",
    "CCL_KVS_MODE": "mpi",
    "CCL_KVS_CONNECTION_TIMEOUT": "600",
    "FI_PROVIDER": "cxi",
    "FI_CXI_DEFAULT_CQ_SIZE": "131072",
    "FI_CXI_OVFLOW_BUF_SIZE": "8388608",
    "FI_CXI_CQ_FILL_PERCENT": "20",
    "PALS_PMI": "pmix",
}


@dataclass
class Job:
    trainer: str
    nodes: int
    ppn: int
    name: str
    env: dict[str, str] = field(default_factory=dict)
    mpiexec: list[str] = field(default_factory=list)
    pbs: str = ""
    argv: list[str] = field(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m scripts.aurora.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trainer", choices=("jax", "torch"), required=True)
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--preset", default="llama2-70b")
    ap.add_argument("--mesh", required=True, help="the trainer's --mesh; its device count must be nodes x 12")
    ap.add_argument("--zero", type=int, choices=(0, 1, 2, 3))
    ap.add_argument("--steps", type=int)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    ap.add_argument("--name", help="run (and PBS job) name; default <preset>-<trainer>-<nodes>n")
    ap.add_argument("--out-dir", default="runs")
    ap.add_argument("--ckpt-every", type=int, default=0)
    ap.add_argument("--jax-ppn", type=int, choices=(1, TILES_PER_NODE), default=TILES_PER_NODE,
                    help="JAX processes per node: 12 (one per tile, default) or 1 (one sees all 12 tiles)")
    ap.add_argument("--account", default="AuroraGPT")
    ap.add_argument("--queue", default="prod")
    ap.add_argument("--walltime", default="06:00:00")
    ap.add_argument("--filesystems", default="flare:home")
    ap.add_argument("--module", default="frameworks", help="module providing torch/IPEX/oneCCL (and oneAPI)")
    ap.add_argument("--venv", default="${PBS_O_WORKDIR}/.venv-aurora", help="venv with this project installed")
    ap.add_argument("--workdir", default="${PBS_O_WORKDIR}")
    ap.add_argument("--out", help="write the PBS script here (executable)")
    ap.add_argument("--print-only", action="store_true", help="print the script, write nothing")
    return ap


def make_job(args: argparse.Namespace, extra: list[str], argv: list[str] | None = None) -> Job:
    """The job for parsed flags; ``extra`` are trainer overrides (``--parallel.hpz=true`` ...), checked here."""
    if args.nodes < 1:
        raise ConfigError(f"--nodes {args.nodes} must be >= 1")
    overrides: dict[str, object] = {"parallel.mesh": args.mesh, "train.dtype": args.dtype,
                                    "train.platform": "sycl" if args.trainer == "jax" else "auto"}
    if args.zero is not None:
        overrides["parallel.zero"] = args.zero
    if args.steps is not None:
        overrides["train.steps"] = args.steps
    overrides.update(parse_overrides(extra))
    cfg = load_config(args.preset, overrides)
    n_tiles = args.nodes * TILES_PER_NODE
    validate_config(cfg, n_tiles)  # the layout's errors now, not after hours in the queue
    mesh = cfg.mesh_shape(n_tiles)
    n_mesh = mesh["pipeline"] * mesh["data"] * mesh["fsdp"] * mesh["tensor"]
    if n_mesh != n_tiles:
        raise ConfigError(f"--mesh {args.mesh} uses {n_mesh} tiles but {args.nodes} nodes have {n_tiles}; "
                          f"make the mesh's product {n_tiles} (one axis may be -1)")
    ppn = args.jax_ppn if args.trainer == "jax" else TILES_PER_NODE
    name = args.name or f"{args.preset}-{args.trainer}-{args.nodes}n"
    job = Job(args.trainer, args.nodes, ppn, name, argv=list(argv) if argv is not None else sys.argv[1:])
    job.env = {"ZE_FLAT_DEVICE_HIERARCHY": "FLAT", **CCL_ENV, "OMP_NUM_THREADS": "8" if ppn > 1 else "96",
               "MASTER_ADDR": "$(head -n 1 \"$PBS_NODEFILE\")", "MASTER_PORT": "29500",
               "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    common = ["--preset", args.preset, "--mesh", args.mesh, "--dtype", args.dtype, "--name", name,
              "--out-dir", args.out_dir]
    if args.zero is not None:
        common += ["--zero", str(args.zero)]
    if args.steps is not None:
        common += ["--steps", str(args.steps)]
    if args.ckpt_every:
        common += ["--ckpt-every", str(args.ckpt_every)]
    if args.trainer == "jax":
        job.env.update({"JAX_PLATFORMS": "sycl", "JAX_COORDINATOR_PORT": "1234"})
        cmd = ["python", "-m", "jax_impl.train", *common, "--platform", "sycl",
               "--coordinator", "${MASTER_ADDR}:1234", "--num-processes", "$((NNODES * PPN))", "--resume", "auto",
               *extra]
    else:
        job.env.update({"DS_ACCELERATOR": "xpu", "TORCH_REF_PG_TIMEOUT": "1800"})
        cmd = ["python", "-m", "torch_ref.train", *common, "--init", "torch", *extra, "${RESUME}"]
    bind = ["--cpu-bind", CPU_BIND, "scripts/aurora/tile_bind.sh"] if ppn == TILES_PER_NODE else [
        "--cpu-bind", "depth", "-d", "96"]
    job.mpiexec = ["mpiexec", "-n", "$((NNODES * PPN))", "--ppn", "${PPN}", "--pmi=pmix", "--genvall", *bind, *cmd]
    job.pbs = render(job, args)
    return job


def _q(word: str) -> str:
    """Shell-quote, but leave ``$VAR``/``$((..))``/``$(..)`` expansions to the job's shell."""
    return f'"{word}"' if "$" in word else shlex.quote(word)


def render(job: Job, args: argparse.Namespace) -> str:
    env_lines = "\n".join(f"export {k}={v if v.startswith('$(') else _q(v)}" for k, v in job.env.items())
    resume = ""
    if job.trainer == "torch":
        resume = (f'RESUME=""\nif [ -f "{args.out_dir}/{job.name}/checkpoints/latest" ]; then '
                  f'RESUME="--resume {args.out_dir}/{job.name}"; fi\n')
    lines: list[list[str]] = [[]]
    for w in job.mpiexec:  # a new line before an option (never between a flag and its value) or the program
        if lines[-1] and (w.startswith("--") or w in ("scripts/aurora/tile_bind.sh", "python")) and \
                sum(len(x) + 1 for x in lines[-1]) > 60:
            lines.append([])
        lines[-1].append(_q(w))
    cmd = " \\\n    ".join(" ".join(line) for line in lines)
    if job.trainer == "torch":  # an empty RESUME must vanish, not become an empty argument
        cmd = cmd.replace('"${RESUME}"', "${RESUME}")
    watchdog = ('if [ $rc -eq 75 ]; then echo "a training step hung: the watchdog ended the run '
                '(all stacks in the job log)" >&2; fi\n') if job.trainer == "jax" else ""
    return f"""#!/bin/bash -l
# {job.name}: {job.trainer} trainer on {job.nodes} Aurora nodes x {TILES_PER_NODE} tiles, {job.ppn} ranks per node.
# Generated by: python -m scripts.aurora.launch {" ".join(shlex.quote(a) for a in job.argv)}
# NOT RUN: generated and unit-tested without Aurora access; nothing here was ever submitted.
#PBS -N {job.name[:15]}
#PBS -l select={job.nodes}
#PBS -l place=scatter
#PBS -l walltime={args.walltime}
#PBS -l filesystems={args.filesystems}
#PBS -q {args.queue}
#PBS -A {args.account}
#PBS -j oe
set -euo pipefail
cd "{args.workdir}"
module load {args.module}
if [ -d "{args.venv}" ]; then source "{args.venv}/bin/activate"; fi

NNODES=$(wc -l < "$PBS_NODEFILE")
PPN={job.ppn}
if [ "$NNODES" -ne {job.nodes} ]; then echo "expected {job.nodes} nodes, PBS gave $NNODES" >&2; exit 2; fi
{env_lines}
{resume}
set +e
{cmd}
rc=$?
set -e
{watchdog}exit $rc
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
