"""Multi-controller JAX: one process per host (or per tile), started by mpiexec/PALS, SLURM or by hand.

``detect`` takes rank, world size and local rank from ``runtime.launcher_env`` (flags first, then the
launcher's variables, one documented precedence for both trainers) and the coordinator from
``--coordinator`` | JAX_COORDINATOR_ADDRESS | MASTER_ADDR | the first host of $PBS_NODEFILE (Aurora/PBS) |
of $SLURM_JOB_NODELIST, port JAX_COORDINATOR_PORT | MASTER_PORT (default 1234).

``initialize`` calls ``jax.distributed.initialize`` with it (gloo collectives on CPU). On an accelerator,
each process picks its own devices in-app: with d devices per process, local rank i gets devices
[i*d, (i+1)*d) of its node (``local_device_ids``, and the oneapi plugin's visible-devices option, which
jax 0.10's ``local_device_ids`` does not set), so a job leaves every tile visible to every process. Each
process then holds ``jax.local_devices()``; ``jax.devices()`` is the global list the mesh is built from.
``local_batch`` builds the global batch array from the samples of the local shards only, so no process
reads (or holds) the whole global batch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from configs import ConfigError
from runtime import launcher_env

DEFAULT_PORT = 1234


@dataclass(frozen=True)
class DistInfo:
    coordinator: str
    num_processes: int
    process_id: int
    local_rank: int = 0
    source: str = "flags"
    local_world_size: int | None = None


def detect(env: Mapping[str, str] | None = None, coordinator: str | None = None, num_processes: int | None = None,
           process_id: int | None = None) -> DistInfo | None:
    """The multi-process layout from flags/environment; None for a single-process run."""
    env = os.environ if env is None else env
    launch = launcher_env.read(env, rank=process_id, world_size=num_processes)
    if launch is None or launch.world_size <= 1:
        return None
    port = int(env.get("JAX_COORDINATOR_PORT") or env.get("MASTER_PORT") or DEFAULT_PORT)
    addr = coordinator or env.get("JAX_COORDINATOR_ADDRESS") or launcher_env.coordinator_host(env)
    if not addr:
        raise ConfigError("multi-process run without a coordinator: pass --coordinator HOST:PORT or set "
                          "JAX_COORDINATOR_ADDRESS / MASTER_ADDR (PBS_NODEFILE and SLURM_JOB_NODELIST are read too)")
    if ":" not in addr:
        addr = f"{addr}:{port}"
    return DistInfo(addr, launch.world_size, launch.rank, launch.local_rank, launch.source, launch.local_world_size)


def local_device_ids(info: DistInfo, devices_per_process: int) -> list[int]:
    """This process's devices on its node: local rank i of d devices each gets [i*d, (i+1)*d)."""
    return list(range(info.local_rank * devices_per_process, (info.local_rank + 1) * devices_per_process))


def initialize(info: DistInfo, platform: str, timeout_s: int = 300, devices_per_process: int | None = None) -> None:
    """``jax.distributed.initialize`` (before any backend starts); CPU processes talk through gloo.

    On an accelerator with ``devices_per_process`` known, the process claims its node-local devices
    (``local_device_ids``) instead of a launcher wrapper masking them with ZE_AFFINITY_MASK.
    """
    import jax

    ids = None
    if platform == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    elif devices_per_process:
        ids = local_device_ids(info, devices_per_process)
        if platform == "xpu":  # jax.distributed sets only the CUDA/ROCm visible-device flags from local_device_ids
            jax.config.update("jax_oneapi_visible_devices", ",".join(map(str, ids)))
    jax.distributed.initialize(coordinator_address=info.coordinator, num_processes=info.num_processes,
                               process_id=info.process_id, local_device_ids=ids, initialization_timeout=timeout_s)


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
    return bytes(np.asarray(out, np.uint8)).rstrip(b"\0").decode(errors="replace")  # a cut multi-byte character


def max_over_processes(value: int | Sequence[int]) -> Any:
    """The largest of every process's ``value`` (each < 2**31: JAX arrays are 32-bit here), e.g. peak RSS in KiB:
    a pipeline stage per process need not peak on process 0, which writes the metrics (DeepSpeed's ranks report
    their max too). A sequence is reduced element-wise in the same one collective and comes back as a list."""
    import jax

    many = not isinstance(value, int | np.integer)
    values = [int(v) for v in value] if many else [int(value)]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        got = multihost_utils.process_allgather(np.array(values, np.int32))
        values = [int(v) for v in np.max(np.asarray(got).reshape(-1, len(values)), axis=0)]
    return values if many else values[0]


def barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
