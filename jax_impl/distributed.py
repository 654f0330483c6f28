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

Before that, ``rendezvous`` checks that every process is there, within ``--init-timeout-s`` (default 300 s):
process 0 listens on the coordinator's port, each other process connects and says its id. A process that
never starts is then named (by process 0: "process 1 of 2 did not join"; by the others: "process 0, which
runs the coordinator at HOST:PORT, did not answer") and every process exits 69 (EX_UNAVAILABLE), instead of
JAX's silent wait and C++ abort (``DEADLINE_EXCEEDED ... RegisterTask``). The port is free again before
``jax.distributed.initialize`` starts the coordination service on it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from configs import ConfigError
from runtime import launcher_env

DEFAULT_PORT = 1234
DEFAULT_INIT_TIMEOUT_S = 300  # jax.distributed's own default: hundreds of nodes take minutes to start
JOIN_EXIT = 69  # EX_UNAVAILABLE: a peer (or the coordinator) never came; a requeue on other nodes may help
_HELLO = b"aurora-join"


class JoinError(RuntimeError):
    """A process of a multi-process run did not join in time; the message names it and the coordinator."""


@dataclass(frozen=True)
class DistInfo:
    coordinator: str
    num_processes: int
    process_id: int
    local_rank: int = 0
    source: str = "flags"
    local_world_size: int | None = None
    coordinator_source: str = "--coordinator"  # where the address came from, for messages


def detect(env: Mapping[str, str] | None = None, coordinator: str | None = None, num_processes: int | None = None,
           process_id: int | None = None) -> DistInfo | None:
    """The multi-process layout from flags/environment; None for a single-process run."""
    env = os.environ if env is None else env
    launch = launcher_env.read(env, rank=process_id, world_size=num_processes)
    if launch is None or launch.world_size <= 1:
        return None
    port = int(env.get("JAX_COORDINATOR_PORT") or env.get("MASTER_PORT") or DEFAULT_PORT)
    addr = coordinator or env.get("JAX_COORDINATOR_ADDRESS") or launcher_env.coordinator_host(env)
    origin = ("--coordinator" if coordinator else "JAX_COORDINATOR_ADDRESS" if env.get("JAX_COORDINATOR_ADDRESS")
              else "MASTER_ADDR" if env.get("MASTER_ADDR") else "PBS_NODEFILE" if env.get("PBS_NODEFILE")
              else "SLURM_JOB_NODELIST")
    if not addr:
        raise ConfigError("multi-process run without a coordinator: pass --coordinator HOST:PORT or set "
                          "JAX_COORDINATOR_ADDRESS / MASTER_ADDR (PBS_NODEFILE and SLURM_JOB_NODELIST are read too)")
    if ":" not in addr:
        addr = f"{addr}:{port}"
    return DistInfo(addr, launch.world_size, launch.rank, launch.local_rank, launch.source, launch.local_world_size,
                    origin)


def local_device_ids(info: DistInfo, devices_per_process: int) -> list[int]:
    """This process's devices on its node: local rank i of d devices each gets [i*d, (i+1)*d)."""
    return list(range(info.local_rank * devices_per_process, (info.local_rank + 1) * devices_per_process))


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def rendezvous(info: DistInfo, timeout_s: float) -> None:
    """Every process present within ``timeout_s``, or a ``JoinError`` naming who is missing (module docstring)."""
    host, port = _split(info.coordinator)
    where = f"the coordinator at {info.coordinator} (from {info.coordinator_source})"
    deadline = time.monotonic() + timeout_s
    if info.process_id == 0:
        try:
            dual = socket.has_dualstack_ipv6()  # the coordinator's name may resolve to either family
            server = socket.create_server(("", port), family=socket.AF_INET6 if dual else socket.AF_INET,
                                          dualstack_ipv6=dual)
        except OSError as e:
            raise JoinError(f"process 0 cannot listen on port {port} for {where}: {e.strerror or e}; pick a free "
                            "port (JAX_COORDINATOR_PORT / MASTER_PORT)") from None
        joined: dict[int, socket.socket] = {}
        try:
            while len(joined) < info.num_processes - 1:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [i for i in range(1, info.num_processes) if i not in joined]
                    shown = ", ".join(map(str, missing[:16])) + (" ..." if len(missing) > 16 else "")
                    raise JoinError(
                        f"process{'es' if len(missing) > 1 else ''} {shown} of {info.num_processes} did not join "
                        f"{where} within {timeout_s:g}s (--init-timeout-s); "
                        f"{info.num_processes - 1 - len(missing)} other(s) did. Check that the launcher started "
                        f"every process and that they can reach {host}:{port}")
                server.settimeout(min(left, 1.0))
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                conn.settimeout(max(deadline - time.monotonic(), 1.0))
                try:
                    hello = conn.recv(64).decode(errors="replace").split()
                except OSError:
                    conn.close()
                    continue
                if len(hello) != 3 or hello[0] != _HELLO.decode() or not hello[1].isdigit():
                    conn.close()  # something else on the port: ignore it
                    continue
                pid, n = int(hello[1]), int(hello[2])
                if n != info.num_processes or not 0 < pid < n or pid in joined:
                    conn.close()
                    raise JoinError(f"a process joined {where} as process {pid} of {n}, but this run has "
                                    f"{info.num_processes} processes"
                                    + (f" and process {pid} already joined" if pid in joined else "")
                                    + "; check the launcher's rank and size variables")
                joined[pid] = conn
            for conn in joined.values():
                conn.sendall(b"go\n")
            for conn in joined.values():  # let the peers close first: the port must be free for JAX's service
                try:
                    conn.settimeout(5.0)
                    conn.recv(8)
                except OSError:
                    pass
        finally:
            for conn in joined.values():
                conn.close()
            server.close()
        return
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise JoinError(f"process {info.process_id} of {info.num_processes}: process 0, which runs {where}, "
                            f"did not answer within {timeout_s:g}s (--init-timeout-s): it did not start, or "
                            f"{host}:{port} is not its address")
        try:
            with socket.create_connection((host, port), timeout=min(left, 5.0)) as conn:
                conn.sendall(f"{_HELLO.decode()} {info.process_id} {info.num_processes}\n".encode())
                conn.settimeout(max(deadline - time.monotonic(), 0.1))
                if conn.recv(8).startswith(b"go"):
                    return
        except OSError:  # not listening yet, or it went away: try again until the deadline
            pass
        time.sleep(0.2)


def initialize(info: DistInfo, platform: str, timeout_s: float = DEFAULT_INIT_TIMEOUT_S,
               devices_per_process: int | None = None) -> None:
    """``rendezvous``, then ``jax.distributed.initialize`` (before any backend starts); CPU processes talk
    through gloo.

    On an accelerator with ``devices_per_process`` known, the process claims its node-local devices
    (``local_device_ids``) instead of a launcher wrapper masking them with ZE_AFFINITY_MASK.
    """
    rendezvous(info, timeout_s)
    import jax

    ids = None
    if platform == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    elif devices_per_process:
        ids = local_device_ids(info, devices_per_process)
        if platform == "xpu":  # jax.distributed sets only the CUDA/ROCm visible-device flags from local_device_ids
            jax.config.update("jax_oneapi_visible_devices", ",".join(map(str, ids)))
    jax.distributed.initialize(coordinator_address=info.coordinator, num_processes=info.num_processes,
                               process_id=info.process_id, local_device_ids=ids,
                               initialization_timeout=max(int(timeout_s), 1))


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
