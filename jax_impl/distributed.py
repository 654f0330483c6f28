"""Multi-controller JAX: one process per host (or per tile), started by mpiexec/PALS, SLURM or by hand.

``detect`` reads who-am-I from explicit flags first, then the launcher's environment:

    rank          PALS_RANKID | PMI_RANK | OMPI_COMM_WORLD_RANK | PMIX_RANK | SLURM_PROCID | RANK
    world size    --num-processes | PMI_SIZE | OMPI_COMM_WORLD_SIZE | SLURM_NTASKS | WORLD_SIZE
    local rank    PALS_LOCAL_RANKID | MPI_LOCALRANKID | OMPI_COMM_WORLD_LOCAL_RANK | SLURM_LOCALID | LOCAL_RANK
    coordinator   --coordinator | JAX_COORDINATOR_ADDRESS | MASTER_ADDR[:MASTER_PORT] | first host of
                  $PBS_NODEFILE (Aurora/PBS) | first host of $SLURM_JOB_NODELIST; port JAX_COORDINATOR_PORT
                  (default 1234)

and ``initialize`` calls ``jax.distributed.initialize`` with it (gloo collectives on CPU). Each
process then holds ``jax.local_devices()``; ``jax.devices()`` is the global list the mesh is built
from. ``local_batch`` builds the global batch array from the samples of the local shards only, so
no process reads (or holds) the whole global batch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from configs import ConfigError

DEFAULT_PORT = 1234
RANK_VARS = ("PALS_RANKID", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID", "RANK")
SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS", "WORLD_SIZE")
LOCAL_VARS = ("PALS_LOCAL_RANKID", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    coordinator: str
    num_processes: int
    process_id: int
    local_rank: int = 0
    source: str = "flags"


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, int] | None:
    for n in names:
        v = env.get(n, "")
        if v.strip().isdigit():
            return n, int(v)
    return None


def first_slurm_host(nodelist: str) -> str:
    """``nid[001-004,007],login1`` -> ``nid001`` (SLURM's compressed host list, first entry)."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ConfigError(f"cannot read SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def detect(env: Mapping[str, str] | None = None, coordinator: str | None = None, num_processes: int | None = None,
           process_id: int | None = None) -> DistInfo | None:
    """The multi-process layout from flags/environment; None for a single-process run."""
    env = os.environ if env is None else env
    rank = (("--process-id", process_id) if process_id is not None else _first(env, RANK_VARS))
    size = (("--num-processes", num_processes) if num_processes is not None else _first(env, SIZE_VARS))
    if size is None or size[1] <= 1:
        if num_processes is not None and num_processes > 1 and rank is None:
            raise ConfigError("--num-processes > 1 needs --process-id (or a launcher's rank variable)")
        return None
    if rank is None:
        if num_processes is None:  # e.g. an salloc shell (SLURM_NTASKS, no srun): a plain single-process run
            return None
        raise ConfigError(f"--num-processes {size[1]} but no rank: set --process-id or one of {RANK_VARS}")
    if not 0 <= rank[1] < size[1]:
        raise ConfigError(f"process id {rank[1]} ({rank[0]}) is not in [0, {size[1]})")
    local = _first(env, LOCAL_VARS)
    port = int(env.get("JAX_COORDINATOR_PORT") or env.get("MASTER_PORT") or DEFAULT_PORT)
    addr = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    if not addr and env.get("MASTER_ADDR"):
        addr = env["MASTER_ADDR"]
    if not addr and env.get("PBS_NODEFILE") and Path(env["PBS_NODEFILE"]).is_file():
        addr = Path(env["PBS_NODEFILE"]).read_text().split()[0]
    if not addr and env.get("SLURM_JOB_NODELIST"):
        addr = first_slurm_host(env["SLURM_JOB_NODELIST"])
    if not addr:
        raise ConfigError("multi-process run without a coordinator: pass --coordinator HOST:PORT or set "
                          "JAX_COORDINATOR_ADDRESS / MASTER_ADDR (PBS_NODEFILE and SLURM_JOB_NODELIST are read too)")
    if ":" not in addr:
        addr = f"{addr}:{port}"
    return DistInfo(addr, size[1], rank[1], local[1] if local else 0, f"{rank[0]}/{size[0]}")


def initialize(info: DistInfo, platform: str, timeout_s: int = 300) -> None:
    """``jax.distributed.initialize`` (before any backend starts); CPU processes talk through gloo."""
    import jax

    if platform == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=info.coordinator, num_processes=info.num_processes,
                               process_id=info.process_id, initialization_timeout=timeout_s)


def local_batch(source: Any, sharding: Any, consumed: int, mbs: int, gas: int, dp: int) -> Any:
    """The (gas, dp*mbs, seq+1) global batch as a jax.Array; this process reads only its shards' samples.

    Sample order is Megatron's (``aurora_data.global_batch``): microbatch g, row r is sample
    ``consumed + g * dp * mbs + r``.
    """
    import jax

    rows, width = dp * mbs, source.seq_len + 1
    shape = (gas, rows, width)

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        g0, g1, _ = index[0].indices(gas)
        r0, r1, _ = index[1].indices(rows)
        block = np.stack([source.samples(consumed + g * rows + r0, r1 - r0) for g in range(g0, g1)])
        return block[:, :, index[2]].astype(np.int32)

    return jax.make_array_from_callback(shape, sharding, shard)


def broadcast_str(value: str) -> str:
    """Process 0's string on every process (run directory names contain a timestamp and a pid)."""
    import jax

    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    raw = np.frombuffer(value.encode().ljust(1024, b"\0")[:1024], np.uint8)
    out = multihost_utils.broadcast_one_to_all(raw)
    return bytes(np.asarray(out, np.uint8)).rstrip(b"\0").decode()


def max_over_processes(value: int) -> int:
    """The largest of every process's ``value`` (< 2**31: JAX arrays are 32-bit here), e.g. peak RSS in KiB: a
    pipeline stage per process need not peak on process 0, which writes the metrics (DeepSpeed's ranks report
    their max too)."""
    import jax

    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.array([value], np.int32))))


def barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
