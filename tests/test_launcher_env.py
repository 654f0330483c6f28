"""runtime.launcher_env: one reader of every launcher's rank variables, with one precedence, for both trainers."""

from __future__ import annotations

import pytest

from runtime import launcher_env
from runtime.launcher_env import LaunchEnv, LauncherEnvError, read


@pytest.mark.parametrize("env,want", [
    # Aurora: PALS's mpiexec --pmi=pmix sets ranks only; the generated job exports WORLD_SIZE / LOCAL_WORLD_SIZE
    ({"PALS_RANKID": "17", "PMIX_RANK": "17", "PALS_LOCAL_RANKID": "5", "PALS_LOCAL_SIZE": "12", "WORLD_SIZE": "96",
      "LOCAL_WORLD_SIZE": "12"}, LaunchEnv(17, 96, 5, 12, "PALS_RANKID/WORLD_SIZE")),
    ({"PMIX_RANK": "3", "WORLD_SIZE": "8"}, LaunchEnv(3, 8, 0, None, "PMIX_RANK/WORLD_SIZE")),
    # PALS / MPICH with PMI: PMI_SIZE and the node-local PMI variables
    ({"PMI_RANK": "13", "PMI_SIZE": "24", "PMI_LOCAL_RANK": "1", "PMI_LOCAL_SIZE": "12"},
     LaunchEnv(13, 24, 1, 12, "PMI_RANK/PMI_SIZE")),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, LaunchEnv(1, 2, 1, 2, "OMPI_COMM_WORLD_RANK/OMPI_COMM_WORLD_SIZE")),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}, LaunchEnv(5, 8, 1, None,
                                                                              "SLURM_PROCID/SLURM_NTASKS")),
    # torchrun's names win over the MPI launcher's (srun + torchrun: SLURM_PROCID is the node's index)
    ({"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4", "SLURM_PROCID": "1",
      "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}, LaunchEnv(6, 8, 2, 4, "RANK/WORLD_SIZE")),
    # no local rank variable: derived from the local world size
    ({"PMIX_RANK": "14", "WORLD_SIZE": "24", "LOCAL_WORLD_SIZE": "12"}, LaunchEnv(14, 24, 2, 12,
                                                                               "PMIX_RANK/WORLD_SIZE")),
    ({"PMI_RANK": "0", "PMI_SIZE": "1"}, LaunchEnv(0, 1, 0, None, "PMI_RANK/PMI_SIZE")),
    ({"SLURM_NTASKS": "4"}, None),  # an salloc shell outside srun: a world size but no rank is no launch
    ({"WORLD_SIZE": "96", "RANK": ""}, None),  # an empty variable is unset
    ({}, None),
], ids=["pals-pmix", "pmix-only", "pmi", "openmpi", "slurm", "torchrun-first", "derived-local", "one", "salloc",
        "empty", "none"])
def test_read_each_launcher(env, want):
    assert read(env) == want


def test_flags_win_over_the_environment():
    got = read({"PMI_RANK": "1", "PMI_SIZE": "4", "PMI_LOCAL_RANK": "1"}, rank=0, world_size=2)
    assert got == LaunchEnv(0, 2, 1, None, "--process-id/--num-processes")
    assert read({}, rank=None, world_size=1) is None


@pytest.mark.parametrize("env,kw,msg", [
    ({"PMIX_RANK": "5"}, {}, "PMIX_RANK=5 gives this process a rank but nothing gives the world size: export "
                             "WORLD_SIZE (= nodes x ranks per node) before mpiexec, as the generated Aurora job "
                             "does; read from WORLD_SIZE, PMI_SIZE, OMPI_COMM_WORLD_SIZE, SLURM_NTASKS (PALS's "
                             "mpiexec with --pmi=pmix sets none of them)"),
    ({"PALS_RANKID": "0"}, {}, "PALS_RANKID=0 gives this process a rank but nothing gives the world size"),
    ({"PMI_RANK": "4", "PMI_SIZE": "4"}, {}, "process id 4 (PMI_RANK) is not in [0, 4) (world size from PMI_SIZE)"),
    ({"RANK": "x1"}, {}, "RANK='x1' is not a non-negative integer; unset it or fix the launcher"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "12", "LOCAL_WORLD_SIZE": "12"}, {},
     "local rank 12 (LOCAL_RANK) is not in [0, 12) (LOCAL_WORLD_SIZE)"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, {}, "world size 0 (WORLD_SIZE) must be >= 1"),
    ({}, {"world_size": 2}, "--num-processes 2 but no rank: pass --process-id or start the processes with a "
                            "launcher that sets one of RANK, PALS_RANKID, PMIX_RANK, PMI_RANK"),
])
def test_errors_name_the_variables(env, kw, msg):
    with pytest.raises(LauncherEnvError) as e:
        read(env, **kw)
    assert msg in str(e.value)


def test_torch_env_round_trip():
    got = read({"PALS_RANKID": "17", "PALS_LOCAL_RANKID": "5", "PALS_LOCAL_SIZE": "12", "WORLD_SIZE": "96"})
    exported = got.torch_env()
    assert exported == {"RANK": "17", "WORLD_SIZE": "96", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "12"}
    assert read(exported) == LaunchEnv(17, 96, 5, 12, "RANK/WORLD_SIZE")


def test_coordinator_host(tmp_path):
    nodes = tmp_path / "nodefile"
    nodes.write_text("x4000c0s1b0n0.hostmgmt\nx4000c0s2b0n0.hostmgmt\n")
    assert launcher_env.coordinator_host({"PBS_NODEFILE": str(nodes)}) == "x4000c0s1b0n0.hostmgmt"
    assert launcher_env.coordinator_host({"PBS_NODEFILE": str(nodes), "MASTER_ADDR": "h0"}) == "h0"
    assert launcher_env.coordinator_host({"SLURM_JOB_NODELIST": "nid[003-006,9]"}) == "nid003"
    assert launcher_env.coordinator_host({"SLURM_JOB_NODELIST": "login1"}) == "login1"
    assert launcher_env.coordinator_host({"PBS_NODEFILE": str(tmp_path / "missing")}) is None
