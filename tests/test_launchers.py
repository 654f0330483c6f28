"""scripts/aurora: the PBS/mpiexec commands generated for both trainers (never run on Aurora here)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from scripts.aurora import launch

ROOT = Path(__file__).resolve().parents[1]
JAX_70B = ["--trainer", "jax", "--nodes", "8", "--preset", "llama2-70b", "--mesh", "data=8,fsdp=12",
           "--parallel.hpz=true", "--ckpt-every", "100", "--print-only"]
TORCH_70B = ["--trainer", "torch", "--nodes", "8", "--preset", "llama2-70b", "--mesh", "data=8,fsdp=12", "--zero", "3",
             "--parallel.hpz=true", "--print-only"]


def test_jax_job_commands(capsys):
    job = launch.main(JAX_70B)
    assert capsys.readouterr().out == job.pbs
    m = job.mpiexec
    assert m[:8] == ["mpiexec", "-n", "$((NNODES * PPN))", "--ppn", "${PPN}", "--pmi=pmix", "--genvall", "--cpu-bind"]
    assert job.ppn == 12 and "scripts/aurora/tile_bind.sh" in m
    prog = m[m.index("python"):]
    assert prog[:3] == ["python", "-m", "jax_impl.train"]
    for flag, value in [("--platform", "sycl"), ("--coordinator", "${MASTER_ADDR}:1234"),
                        ("--num-processes", "$((NNODES * PPN))"), ("--resume", "auto"), ("--mesh", "data=8,fsdp=12"),
                        ("--ckpt-every", "100"), ("--name", "llama2-70b-jax-8n")]:
        assert prog[prog.index(flag) + 1] == value, flag
    assert "--parallel.hpz=true" in prog
    assert job.env["ZE_FLAT_DEVICE_HIERARCHY"] == "FLAT" and job.env["CCL_ATL_TRANSPORT"] == "mpi"
    assert job.env["JAX_PLATFORMS"] == "sycl" and job.env["FI_PROVIDER"] == "cxi"
    assert "#PBS -l select=8" in job.pbs and "NOT RUN" in job.pbs and "module load frameworks" in job.pbs


def test_torch_job_commands():
    job = launch.main(TORCH_70B)
    prog = job.mpiexec[job.mpiexec.index("python"):]
    assert prog[:3] == ["python", "-m", "torch_ref.train"] and prog[prog.index("--init") + 1] == "torch"
    assert prog[prog.index("--zero") + 1] == "3" and prog[-1] == "${RESUME}"
    assert job.env["DS_ACCELERATOR"] == "xpu" and "JAX_PLATFORMS" not in job.env
    assert 'RESUME="--resume runs/llama2-70b-torch-8n"' in job.pbs
    assert " ${RESUME}" in job.pbs and '"${RESUME}"' not in job.pbs  # empty -> no argument at all


def test_one_jax_process_per_node_sees_all_tiles():
    job = launch.main([*JAX_70B, "--jax-ppn", "1"])
    assert job.ppn == 1 and "scripts/aurora/tile_bind.sh" not in job.mpiexec and "PPN=1" in job.pbs


@pytest.mark.parametrize("argv,msg", [
    (["--trainer", "jax", "--nodes", "4", "--mesh", "data=8,fsdp=12"], "uses 96 tiles but 4 nodes have 48"),
    (["--trainer", "torch", "--nodes", "8", "--mesh", "data=8,fsdp=12", "--model.hiden=3"], "model.hidden"),
    (["--trainer", "jax", "--nodes", "8", "--mesh", "data=8,fsdp=12", "--zero", "2", "--parallel.hpz=true"],
     "needs ZeRO-3"),
])
def test_bad_layouts_refused_before_queueing(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        launch.main([*argv, "--print-only"])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def _fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mpiexec").write_text('#!/bin/bash\necho "MPIEXEC $*"\necho "ENV MASTER_ADDR=$MASTER_ADDR '
                                     'ZE=$ZE_FLAT_DEVICE_HIERARCHY CCL=$CCL_PROCESS_LAUNCHER"\nexit "${FAKE_RC:-0}"\n')
    (bin_dir / "module").write_text("#!/bin/bash\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return bin_dir


@pytest.mark.parametrize("trainer", ["jax", "torch"])
def test_generated_script_runs_under_a_fake_pbs(tmp_path, trainer):
    """The script's shell is valid and expands to the intended command (mpiexec/module faked)."""
    script = tmp_path / "job.pbs"
    base = JAX_70B if trainer == "jax" else TORCH_70B
    launch.main([a for a in base if a != "--print-only"] + ["--out", str(script)])
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    nodes = tmp_path / "nodefile"
    nodes.write_text("".join(f"x4102c{i}s0b0n0\n" for i in range(8)))
    env = {"PATH": f"{_fake_bin(tmp_path)}:{os.environ['PATH']}", "PBS_NODEFILE": str(nodes),
           "PBS_O_WORKDIR": str(tmp_path), "HOME": str(tmp_path)}
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "MPIEXEC -n 96 --ppn 12 --pmi=pmix" in r.stdout
    assert "ENV MASTER_ADDR=x4102c0s0b0n0 ZE=FLAT CCL=pmix" in r.stdout
    if trainer == "jax":
        assert "--coordinator x4102c0s0b0n0:1234 --num-processes 96 --resume auto" in r.stdout
        r75 = subprocess.run(["bash", str(script)], env={**env, "FAKE_RC": "75"}, capture_output=True, text=True)
        assert r75.returncode == 75 and "watchdog ended the run" in r75.stderr
    else:
        assert r.stdout.split("MPIEXEC ")[1].split("\n")[0].endswith("--parallel.hpz=true")  # no --resume yet
        ck = tmp_path / "runs" / "llama2-70b-torch-8n" / "checkpoints"
        ck.mkdir(parents=True)
        (ck / "latest").write_text("global_step100")
        r2 = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, cwd=tmp_path)
        assert "--resume runs/llama2-70b-torch-8n" in r2.stdout
    # the wrong node count is refused by the job itself
    nodes.write_text("a\nb\n")
    r3 = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert r3.returncode == 2 and "expected 8 nodes, PBS gave 2" in r3.stderr


def test_tile_bind_gives_each_local_rank_one_tile():
    tb = ROOT / "scripts" / "aurora" / "tile_bind.sh"
    r = subprocess.run([str(tb), "env"], env={"PATH": os.environ["PATH"], "PALS_LOCAL_RANKID": "7"},
                       capture_output=True, text=True)
    assert "ZE_AFFINITY_MASK=7" in r.stdout and "ZE_FLAT_DEVICE_HIERARCHY=FLAT" in r.stdout
    bad = subprocess.run([str(tb), "env"], env={"PATH": os.environ["PATH"]}, capture_output=True, text=True)
    assert bad.returncode != 0 and "PALS_LOCAL_RANKID" in bad.stderr
