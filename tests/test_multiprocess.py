"""Multi-controller JAX: environment detection, per-process batch shards, 2 processes x 4 CPU devices."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from aurora_data import global_batch
from aurora_data.source import SyntheticSource
from configs import ConfigError
from jax_impl import checkpoint, distributed
from jax_impl.sharding import batch_sharding, make_mesh
from jax_impl.train import main
from runtime import procgroup
from runtime.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--wandb", "disabled", "--quiet"]


@pytest.mark.parametrize("env,want", [
    ({"PALS_RANKID": "3", "PALS_LOCAL_RANKID": "1", "PMI_SIZE": "24", "MASTER_ADDR": "x1001c0s0b0n0"},
     ("x1001c0s0b0n0:1234", 24, 3, 1)),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "JAX_COORDINATOR_ADDRESS": "10.0.0.1:5555"}, ("10.0.0.1:5555", 2, 1, 1)),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "nid[003-006,9]"},
     ("nid003:1234", 8, 5, 1)),
    ({"PMI_RANK": "0", "PMI_SIZE": "1"}, None),
    ({"SLURM_NTASKS": "4"}, None),  # an salloc shell outside srun: one process
    ({}, None),
])
def test_detect_from_launcher_environment(env, want):
    info = distributed.detect(env)
    assert (None if info is None else (info.coordinator, info.num_processes, info.process_id, info.local_rank)) == want


def test_detect_pbs_nodefile_and_flags(tmp_path):
    nodes = tmp_path / "nodefile"
    nodes.write_text("x4000c0s1b0n0.hostmgmt\nx4000c0s2b0n0.hostmgmt\n")
    info = distributed.detect({"PALS_RANKID": "13", "PMI_SIZE": "24", "PBS_NODEFILE": str(nodes),
                               "JAX_COORDINATOR_PORT": "4321"})
    assert info.coordinator == "x4000c0s1b0n0.hostmgmt:4321" and info.process_id == 13
    # flags win over the environment
    info = distributed.detect({"PMI_RANK": "1", "PMI_SIZE": "4"}, coordinator="h:1", num_processes=2, process_id=0)
    assert (info.coordinator, info.num_processes, info.process_id) == ("h:1", 2, 0)


@pytest.mark.parametrize("env,msg", [
    ({"PMI_RANK": "4", "PMI_SIZE": "4"}, "not in [0, 4)"),
    ({"PMI_RANK": "1", "PMI_SIZE": "4"}, "without a coordinator"),
])
def test_detect_errors_name_the_fix(env, msg):
    with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace(")", r"\)")):
        distributed.detect(env)
    with pytest.raises(ConfigError, match="no rank"):
        distributed.detect({}, num_processes=2)


@pytest.mark.parametrize("mesh,gas", [("fsdp=8", 1), ("data=2,fsdp=2,tensor=2", 3)])
def test_local_batch_equals_the_global_batch(mesh, gas):
    from configs.schema import parse_mesh

    m = make_mesh(parse_mesh(mesh, 8))
    dp = m.shape["data"] * m.shape["fsdp"]
    src = SyntheticSource(256, 16, 7)
    arr = distributed.local_batch(src, batch_sharding(m), 40, 2, gas, dp)
    assert arr.sharding == batch_sharding(m) and arr.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(arr), global_batch(src, 40, 2, gas, dp))


def run_two_processes(tmp_path, name: str, *args: str, timeout: int = 500,
                      command: list[str] | None = None) -> list[subprocess.CompletedProcess]:
    """2 processes x 4 CPU devices through jax.distributed (gloo), as mpiexec would start them: ``jax_impl.train``
    on the tiny preset with ``args``, or ``command``.

    Waits for both to exit; only a failed process (or the timeout) makes it kill the other, so that a peer
    is never left waiting for a dead one, and a process still tearing down after its peer is not killed.
    """
    port = procgroup.free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env["OMP_NUM_THREADS"] = "1"
    logs = [(tmp_path / f"{name}.{i}.out", tmp_path / f"{name}.{i}.err") for i in range(2)]
    argv = command or [sys.executable, "-m", "jax_impl.train", *TINY, "--out-dir", str(tmp_path), "--name", name,
                       *args]
    group = procgroup.start([argv] * 2, [{**env, "PMI_RANK": str(i), "PMI_SIZE": "2",
                                          "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}"} for i in range(2)],
                            cwd=ROOT, logs=logs, poll_s=0.2)
    # the launchers' own waiting (runtime.procgroup): a failure or the deadline kills the peer at once
    group.wait(deadline=time.monotonic() + timeout, failure_grace_s=0.0, kill_on_stop=True)
    out = [subprocess.CompletedProcess(p.args, p.wait(), o.read_text(), e.read_text())
           for p, (o, e) in zip(group.procs, logs, strict=True)]
    for r in out:
        assert r.returncode == 0, r.stderr[-4000:]
    return out


def test_max_over_processes_gives_every_process_the_largest(tmp_path):
    """The metrics' peak RSS is the largest process's, not process 0's (a pipeline stage per process)."""
    code = ("from jax_impl import distributed\n"
            "distributed.initialize(distributed.detect(), 'cpu')\n"
            "import jax\n"
            "print('MAX', distributed.max_over_processes(2_000_000_000 + 7 * jax.process_index()))\n")
    for r in run_two_processes(tmp_path, "max", command=[sys.executable, "-c", code], timeout=120):
        assert "MAX 2000000007" in r.stdout, r.stdout
    assert distributed.max_over_processes(123) == 123  # one process: the value itself


def assert_same_losses(got: list[float], want: list[float]) -> None:
    # gloo's cross-process reductions may sum in another order than the in-process CPU collectives:
    # equal to ~1 fp32 ulp (measured: bit-identical, or 1 ulp at some steps)
    assert len(got) == len(want)
    rel = [abs(g - w) / abs(w) for g, w in zip(got, want, strict=True)]
    assert max(rel) <= 1e-6, (rel, got, want)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    args = ["--mesh", "data=2,fsdp=4", "--steps", "4"]
    one = main([*TINY, *args, "--out-dir", str(tmp_path), "--name", "one"])
    two = run_two_processes(tmp_path, "two", *args)
    rows = read_metrics(tmp_path / "two")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert_same_losses([r["loss"] for r in rows], one["losses"])
    assert "process 0/2" in two[0].stdout and "process 1/2" in two[1].stdout
    assert "step     1 | loss" in two[0].stdout and "step     1 | loss" not in two[1].stdout  # process 0 logs
    import json

    assert json.loads((tmp_path / "two" / "meta.json").read_text())["processes"] == 2
    assert not list(tmp_path.glob("tiny-jax-*")), "process 1 must not make a run directory of its own"


@pytest.mark.slow
def test_a_pipeline_over_two_processes_matches_one_process(tmp_path):
    """A stage per process, the head split over both (the default): its log-partition and gold logit are combined
    over gloo, and losses and gradient norms are one process's (tests/test_pipeline.py: one process's are the
    single device's)."""
    args = ["--mesh", "pipeline=2,data=4", "--zero", "1", "--gas", "2", "--steps", "3", "--jax.pipeline_head=split"]
    one = main([*TINY, *args, "--out-dir", str(tmp_path), "--name", "one"])
    run_two_processes(tmp_path, "two", *args)
    rows = read_metrics(tmp_path / "two")
    assert_same_losses([r["loss"] for r in rows], one["losses"])
    assert_same_losses([r["grad_norm"] for r in rows], [r["grad_norm"] for r in read_metrics(tmp_path / "one")])


@pytest.mark.slow
def test_two_processes_resume_a_one_process_checkpoint(tmp_path):
    one = main([*TINY, "--mesh", "fsdp=8", "--steps", "6", "--ckpt-every", "3", "--out-dir", str(tmp_path),
                "--name", "one"])
    run_two_processes(tmp_path, "two", "--mesh", "data=2,fsdp=4", "--steps", "6", "--ckpt-every", "3",
                      "--resume", str(tmp_path / "one" / "checkpoints" / "3"))
    rows = read_metrics(tmp_path / "two")
    assert [r["step"] for r in rows] == [4, 5, 6]
    assert_same_losses([r["loss"] for r in rows], one["losses"][3:])
    # the 2-process run's checkpoint (written by both processes) restores in one process
    assert checkpoint.steps_in(tmp_path / "two" / "checkpoints") == [6]
    params, meta = checkpoint.restore_numpy(tmp_path / "two" / "checkpoints")
    assert meta["step"] == 6 and meta["mesh"]["data"] == 2
    ref = jax.tree.map(np.asarray, one["params"])
    rel = max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in
              zip(jax.tree.leaves(params), jax.tree.leaves(ref), strict=True))
    assert rel < 1e-5, rel


def _alone(tmp_path, rank: int, port: int, timeout_s: str = "3") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env.update({"PMI_RANK": str(rank), "PMI_SIZE": "2", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}"})
    return subprocess.run([sys.executable, "-m", "jax_impl.train", *TINY, "--mesh", "data=2", "--steps", "1",
                           "--out-dir", str(tmp_path), "--init-timeout-s", timeout_s], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_peer_that_never_starts_is_named_after_the_init_timeout(tmp_path, rank):
    """2 processes, one never started: the other names it (or the coordinator it expected) and exits 69."""
    port = procgroup.free_port()
    r = _alone(tmp_path, rank, port)
    assert r.returncode == distributed.JOIN_EXIT == 69, r.stderr[-3000:]
    if rank == 0:
        want = (f"error: process 1 of 2 did not join the coordinator at 127.0.0.1:{port} (from "
                "JAX_COORDINATOR_ADDRESS) within 3s (--init-timeout-s)")
    else:
        want = (f"error: process 1 of 2: process 0, which runs the coordinator at 127.0.0.1:{port} (from "
                "JAX_COORDINATOR_ADDRESS), did not answer within 3s (--init-timeout-s)")
    assert want in r.stderr, r.stderr[-3000:]
    assert "Check failure" not in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.iterdir())


def test_rendezvous_names_exactly_the_processes_missing():
    import threading

    port = procgroup.free_port()
    info = [distributed.DistInfo(f"127.0.0.1:{port}", 4, i, coordinator_source="test") for i in range(4)]
    errors: dict[int, Exception] = {}

    def join(i: int) -> None:
        try:
            distributed.rendezvous(info[i], 3.0)
        except distributed.JoinError as e:
            errors[i] = e

    peers = [threading.Thread(target=join, args=(i,)) for i in (2,)]
    for t in peers:
        t.start()
    with pytest.raises(distributed.JoinError, match=r"processes 1, 3 of 4 did not join the coordinator at "
                                                    rf"127\.0\.0\.1:{port} \(from test\) within 3s"):
        distributed.rendezvous(info[0], 3.0)
    for t in peers:
        t.join()
    assert "process 0, which runs the coordinator" in str(errors[2])
    # all present: everyone goes on, and the port is free again for jax.distributed's service
    port = procgroup.free_port()
    info = [distributed.DistInfo(f"127.0.0.1:{port}", 3, i) for i in range(3)]
    peers = [threading.Thread(target=distributed.rendezvous, args=(info[i], 30.0)) for i in (1, 2)]
    for t in peers:
        t.start()
    distributed.rendezvous(info[0], 30.0)
    for t in peers:
        t.join()
    with socket.create_server(("", port)):
        pass
