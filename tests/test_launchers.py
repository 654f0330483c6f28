"""scripts/aurora: the PBS/mpiexec commands generated for both trainers (never run on Aurora here)."""

from __future__ import annotations

import subprocess

import pytest
from _pbs import JAX_70B, TORCH_70B, fake_pbs, write_script

from scripts.aurora import alcf, launch


def prog(job: launch.Job) -> list[str]:
    return job.mpiexec[job.mpiexec.index("python"):]


def test_jax_job_commands(capsys):
    job = launch.main(JAX_70B)
    assert capsys.readouterr().out == job.pbs
    m = job.mpiexec
    assert m[:9] == ["mpiexec", "-n", "$((NNODES * PPN))", "--ppn", "${PPN}", "--pmi=pmix", "--envall", "--cpu-bind",
                     alcf.CPU_BIND_1]
    assert job.ppn == 1 and "PPN=1" in job.pbs  # one process per node drives its 12 tiles (the default)
    p = prog(job)
    assert p[:3] == ["python", "-m", "jax_impl.train"]
    for flag, value in [("--platform", "xpu"), ("--resume", "auto"), ("--mesh", "data=8,fsdp=12"),
                        ("--ckpt-every", "100"), ("--ckpt-every-s", "3600"), ("--name", "llama2-70b-jax-8n")]:
        assert p[p.index(flag) + 1] == value, flag
    assert "--parallel.hpz=true" in p and "--coordinator" not in p and "--num-processes" not in p
    assert job.env["ZE_FLAT_DEVICE_HIERARCHY"] == "FLAT" and job.env["CCL_ATL_TRANSPORT"] == "mpi"
    assert job.env["WORLD_SIZE"] == "$((NNODES * PPN))" and job.env["JAX_COORDINATOR_PORT"] == "1234"
    assert "ZE_AFFINITY_MASK" not in job.pbs and "tile_bind" not in job.pbs
    assert "#PBS -l select=8" in job.pbs and "NOT RUN" in job.pbs and "#PBS -A MyProject" in job.pbs
    assert "module load" not in job.pbs  # the JAX job runs the plugin's own oneAPI runtime
    assert "what is unknown until this runs" in job.pbs


def test_torch_job_commands():
    job = launch.main(TORCH_70B)
    p = prog(job)
    assert p[:3] == ["python", "-m", "torch_ref.train"] and p[p.index("--init") + 1] == "torch"
    for flag, value in [("--zero", "3"), ("--platform", "xpu"), ("--resume", "auto"), ("--ckpt-every-s", "3600")]:
        assert p[p.index(flag) + 1] == value, flag
    assert job.ppn == 12 and job.mpiexec[job.mpiexec.index("--cpu-bind") + 1] == alcf.CPU_BIND_12
    assert "DS_ACCELERATOR" not in job.env and "JAX_PLATFORMS" not in job.env  # --platform xpu sets it in-app
    assert "module load frameworks/2025.3.1 ||" in job.pbs and "/.venv-aurora-torch" in job.pbs
    assert "what is unknown" not in job.pbs


def test_twelve_jax_processes_per_node():
    job = launch.main([*JAX_70B, "--jax-ppn", "12"])
    assert job.ppn == 12 and "PPN=12" in job.pbs and job.env["OMP_NUM_THREADS"] == "4"
    assert job.mpiexec[job.mpiexec.index("--cpu-bind") + 1] == alcf.CPU_BIND_12
    assert "ZE_AFFINITY_MASK" not in job.pbs  # each process claims its tile in-app (local_device_ids)


@pytest.mark.parametrize("argv,msg", [
    (["--trainer", "jax", "--nodes", "4", "--mesh", "data=8,fsdp=12"], "uses 96 tiles but 4 nodes have 48"),
    (["--trainer", "torch", "--nodes", "8", "--mesh", "data=8,fsdp=12", "--model.hiden=3"], "model.hidden"),
    (["--trainer", "jax", "--nodes", "8", "--mesh", "data=8,fsdp=12", "--zero", "2", "--parallel.hpz=true"],
     "needs ZeRO-3"),
])
def test_bad_layouts_refused_before_queueing(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        launch.main([*argv, "-A", "P", "--print-only"])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_account_is_required(capsys):
    with pytest.raises(SystemExit) as e:
        launch.main(["--trainer", "jax", "--nodes", "1", "--mesh", "fsdp=12", "--print-only"])
    assert e.value.code == 2 and "-A/--account" in capsys.readouterr().err


@pytest.mark.parametrize("trainer", ["jax", "torch"])
def test_generated_script_runs_under_a_fake_pbs(tmp_path, trainer):
    """The script's shell is valid and expands to the intended command (mpiexec/module faked)."""
    script = write_script(tmp_path, JAX_70B if trainer == "jax" else TORCH_70B)
    venv = ".venv-aurora" if trainer == "jax" else ".venv-aurora-torch"
    env = fake_pbs(tmp_path, venv=venv)
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ppn = 1 if trainer == "jax" else 12
    assert f"MPIEXEC -n {8 * ppn} --ppn {ppn} --pmi=pmix --envall --cpu-bind" in r.stdout
    assert (f"ENV MASTER_ADDR=x4102c0s0b0n0 WORLD_SIZE={8 * ppn} LOCAL_WORLD_SIZE={ppn} ZE=FLAT CCL=pmix "
            f"VENV={tmp_path / venv}") in r.stdout
    assert ("MODULE load frameworks/2025.3.1" in r.stdout) == (trainer == "torch")
    assert "--platform xpu --resume auto" in r.stdout and r.stdout.count("MPIEXEC") == 1
    # the wrong node count is refused by the job itself
    (tmp_path / "nodefile").write_text("a\nb\n")
    r3 = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert r3.returncode == 2 and "expected 8 nodes, PBS gave 2" in r3.stderr
