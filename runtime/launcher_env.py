"""Who am I in a multi-process launch: one reader of every launcher's variables, for both trainers.

Each quantity is read from the first variable in its row that is set (flags passed to ``read`` come first):

    rank              RANK | PALS_RANKID | PMIX_RANK | PMI_RANK | OMPI_COMM_WORLD_RANK | SLURM_PROCID
    world size        WORLD_SIZE | PMI_SIZE | OMPI_COMM_WORLD_SIZE | SLURM_NTASKS
    local rank        LOCAL_RANK | PALS_LOCAL_RANKID | PMI_LOCAL_RANK | MPI_LOCALRANKID |
                      OMPI_COMM_WORLD_LOCAL_RANK | SLURM_LOCALID
    local world size  LOCAL_WORLD_SIZE | PALS_LOCAL_SIZE | PMI_LOCAL_SIZE | MPI_LOCALNRANKS |
                      OMPI_COMM_WORLD_LOCAL_SIZE

torchrun's names come first because torchrun, DeepSpeed's launcher, ``torch_ref``'s own launcher and the
Aurora job script (``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``) set them deliberately. Aurora's ``mpiexec`` (PALS)
exports a rank but never a world size, and under ``--pmi=pmix`` no ``PMI_SIZE`` either: a process with a
rank and no world size is an error naming the variables (never a silent one-process run), and a world
size with no rank (e.g. an ``salloc`` shell outside ``srun``) is no launch at all.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from configs import ConfigError

RANK_VARS = ("RANK", "PALS_RANKID", "PMIX_RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID")
SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS")
LOCAL_RANK_VARS = ("LOCAL_RANK", "PALS_LOCAL_RANKID", "PMI_LOCAL_RANK", "MPI_LOCALRANKID",
                   "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "PALS_LOCAL_SIZE", "PMI_LOCAL_SIZE", "MPI_LOCALNRANKS",
                   "OMPI_COMM_WORLD_LOCAL_SIZE")


class LauncherEnvError(ConfigError):
    """Launcher variables that cannot describe a launch (the message names them and the fix)."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int | None  # None: no launcher said
    source: str  # the variables (or flags) the rank and world size came from, e.g. "PALS_RANKID/WORLD_SIZE"

    def torch_env(self) -> dict[str, str]:
        """RANK / WORLD_SIZE / LOCAL_RANK (and LOCAL_WORLD_SIZE when known), the names torch.distributed reads."""
        out = {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank)}
        if self.local_world_size is not None:
            out["LOCAL_WORLD_SIZE"] = str(self.local_world_size)
        return out


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, int] | None:
    for n in names:
        v = env.get(n, "").strip()
        if not v:
            continue
        if not v.isdigit():
            raise LauncherEnvError(f"{n}={env[n]!r} is not a non-negative integer; unset it or fix the launcher")
        return n, int(v)
    return None


def read(env: Mapping[str, str] | None = None, rank: int | None = None, world_size: int | None = None
         ) -> LaunchEnv | None:
    """The launch this process is part of; None when no launcher set a rank (a plain single-process run).

    ``rank`` / ``world_size`` are explicit values (command-line flags) that win over every variable.
    """
    env = os.environ if env is None else env
    r = ("--process-id", rank) if rank is not None else _first(env, RANK_VARS)
    w = ("--num-processes", world_size) if world_size is not None else _first(env, SIZE_VARS)
    if r is None:
        if world_size is not None and world_size > 1:
            raise LauncherEnvError(f"--num-processes {world_size} but no rank: pass --process-id or start the "
                                   f"processes with a launcher that sets one of {', '.join(RANK_VARS)}")
        return None
    if w is None:
        raise LauncherEnvError(
            f"{r[0]}={r[1]} gives this process a rank but nothing gives the world size: export WORLD_SIZE "
            f"(= nodes x ranks per node) before mpiexec, as the generated Aurora job does; read from "
            f"{', '.join(SIZE_VARS)} (PALS's mpiexec with --pmi=pmix sets none of them)")
    if w[1] < 1:
        raise LauncherEnvError(f"world size {w[1]} ({w[0]}) must be >= 1")
    if not 0 <= r[1] < w[1]:
        raise LauncherEnvError(f"process id {r[1]} ({r[0]}) is not in [0, {w[1]}) (world size from {w[0]})")
    lr = _first(env, LOCAL_RANK_VARS)
    ls = _first(env, LOCAL_SIZE_VARS)
    if lr is not None and ls is not None and not 0 <= lr[1] < ls[1]:
        raise LauncherEnvError(f"local rank {lr[1]} ({lr[0]}) is not in [0, {ls[1]}) ({ls[0]})")
    local = lr[1] if lr is not None else (r[1] % ls[1] if ls is not None else 0)
    return LaunchEnv(r[1], w[1], local, ls[1] if ls is not None else None, f"{r[0]}/{w[0]}")


def first_slurm_host(nodelist: str) -> str:
    """``nid[001-004,007],login1`` -> ``nid001`` (SLURM's compressed host list, first entry)."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise LauncherEnvError(f"cannot read SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def coordinator_host(env: Mapping[str, str] | None = None) -> str | None:
    """Rank 0's host as every rank can name it: MASTER_ADDR, else the first host of $PBS_NODEFILE (PBS puts
    the mother-superior node, where mpiexec starts rank 0, first), else of $SLURM_JOB_NODELIST; None if none."""
    env = os.environ if env is None else env
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    nodefile = env.get("PBS_NODEFILE")
    if nodefile and Path(nodefile).is_file():
        hosts = Path(nodefile).read_text().split()
        if hosts:
            return hosts[0]
    if env.get("SLURM_JOB_NODELIST"):
        return first_slurm_host(env["SLURM_JOB_NODELIST"])
    return None
