"""scripts/aurora: the PBS/mpiexec commands generated for both trainers (never run on Aurora here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _pbs import JAX_70B, TORCH_70B, fake_pbs, write_script

from runtime import procgroup
from runtime.procgroup import ProcessGroup
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


# ----------------------------------------------------------------------------- local launchers: signals and blame
ROOT = Path(__file__).resolve().parents[1]


def _child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


def test_group_blames_the_rank_killed_by_a_signal_not_the_peer_that_lost_it():
    # rank 1 is killed; rank 0 then fails as a gloo peer would ("connection closed"), rank 2 waits forever
    procs = [_child("import time; time.sleep(1.0); raise SystemExit(1)"),
             _child("import os, signal, time; time.sleep(0.5); os.kill(os.getpid(), signal.SIGKILL)"),
             _child("import time; time.sleep(600)")]
    group = ProcessGroup(procs, poll_s=0.05)
    group.wait(failure_grace_s=2.0, stop_grace_s=5.0)
    assert group.first_failure() == 1 and group.describe(1) == "killed by SIGKILL"
    assert group.stopped == {2} and all(p.poll() is not None for p in procs)


def test_group_blames_the_first_to_exit_non_zero_in_time_order():
    procs = [_child("import time; time.sleep(1.5); raise SystemExit(1)"),
             _child("import time; time.sleep(0.3); raise SystemExit(7)")]
    group = ProcessGroup(procs, poll_s=0.05)
    group.wait(failure_grace_s=3.0)
    assert group.exits == [(1, 7), (0, 1)] and group.first_failure() == 1


def test_group_forwards_sigterm_to_every_worker_and_waits_for_them(tmp_path):
    """The launcher's SIGTERM reaches each worker, which saves (here: writes a file after 1 s) and exits 143;
    the wait returns only after all of them have."""
    code = ("import signal, sys, time, pathlib\n"
            "def stop(s, f):\n"
            "    time.sleep(1.0)\n"
            f"    pathlib.Path({str(tmp_path)!r}, sys.argv[1]).write_text('saved')\n"
            "    raise SystemExit(128 + s)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            f"pathlib.Path({str(tmp_path)!r}, sys.argv[1] + '.up').touch()\n"
            "time.sleep(600)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, f"rank{r}"]) for r in range(3)]
    while not all((tmp_path / f"rank{r}.up").exists() for r in range(3)):
        time.sleep(0.05)
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
    group = ProcessGroup(procs, poll_s=0.05)
    group.wait(stop_grace_s=0.1)  # the grace is for stopping after a failure, not for a forwarded signal
    assert group.received == signal.SIGTERM and group.stopped_cleanly() and group.first_failure() is None
    assert [p.returncode for p in procs] == [143] * 3
    assert all((tmp_path / f"rank{r}").read_text() == "saved" for r in range(3))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_start_gives_each_process_its_environment_and_log_files(tmp_path):
    code = "import os, sys; print('out', os.environ['RANK']); print('err', os.environ.get('HOME'), file=sys.stderr)"
    logs = [(tmp_path / "0.out", tmp_path / "0.err"), tmp_path / "1.log"]
    group = procgroup.start([[sys.executable, "-c", code]] * 2, [{"RANK": str(r), "PATH": os.environ["PATH"]}
                                                                  for r in range(2)], cwd=tmp_path, logs=logs)
    group.wait(deadline=time.monotonic() + 60)
    assert group.codes == {0: 0, 1: 0}
    assert (tmp_path / "0.out").read_text() == "out 0\n" and (tmp_path / "0.err").read_text() == "err None\n"
    assert sorted((tmp_path / "1.log").read_text().splitlines()) == ["err None", "out 1"]  # exactly the env given
    with pytest.raises(ValueError, match="2 commands, 1 environments and no logs: give one of each per process"):
        procgroup.start([["true"]] * 2, [{}])


def test_start_stops_the_started_processes_when_one_cannot_start(tmp_path):
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    with pytest.raises(FileNotFoundError):
        procgroup.start([sleeper, [str(tmp_path / "no-such-program")]], [dict(os.environ)] * 2)
    assert not [p for p in _children() if "time.sleep(600)" in p]


def _children() -> list[str]:
    """Command lines of this process's living (not zombie) children."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if d.name.isdigit() and int(stat[1]) == os.getpid() and stat[0] != "Z":
                out.append((d / "cmdline").read_text().replace("\0", " "))
        except (OSError, IndexError, ValueError):
            continue
    return out


def _workers_of(pid: int) -> dict[int, int]:
    """rank -> pid of the torch_ref workers started by the launcher ``pid``."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and "TORCH_REF_RUN_DIR" in env:
            out[int(env["RANK"])] = int(d.name)
    return out


def _start_torch(tmp_path, name: str, steps: int = 400) -> subprocess.Popen:
    env = {**os.environ, "TORCH_REF_PG_TIMEOUT": "600"}
    return subprocess.Popen([sys.executable, "-m", "torch_ref.train", "--preset", "tiny", "--mesh", "data=2",
                             "--zero", "1", "--steps", str(steps), "--wandb", "disabled", "--quiet",
                             "--out-dir", str(tmp_path), "--name", name],
                            cwd=ROOT, env=env, stdout=(tmp_path / f"{name}.out").open("w"),
                            stderr=(tmp_path / f"{name}.err").open("w"))  # files: a full pipe would stall it


def _wait_for_steps(launcher: subprocess.Popen, run_dir: Path, n: int) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 400
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= n):
        assert launcher.poll() is None, (run_dir.parent / f"{run_dir.name}.err").read_text()[-3000:]
        assert time.monotonic() < deadline, "no training step within 400 s"
        time.sleep(0.2)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_torch_launcher_sigterm_reaches_every_rank_each_saves_and_it_waits(tmp_path):
    launcher = _start_torch(tmp_path, "term")
    _wait_for_steps(launcher, tmp_path / "term", 2)
    workers = _workers_of(launcher.pid)
    assert sorted(workers) == [0, 1]
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(timeout=300)
    err = (tmp_path / "term.err").read_text()
    assert launcher.returncode == 143, err[-3000:]
    assert all(_gone(pid) for pid in workers.values()), "a worker outlived its launcher"
    assert "all 2 ranks exited (rank 0: exit 143, rank 1: exit 143)" in err and "Traceback" not in err
    last = json.loads((tmp_path / "term" / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    ck = tmp_path / "term" / "checkpoints"
    assert (ck / "latest").read_text().strip() == f"global_step{last}"
    # each rank wrote its own ZeRO-1 partition of the optimizer state
    assert len(list((ck / f"global_step{last}").glob("*optim_states.pt"))) == 2
    assert f"stopped by SIGTERM after step {last}" in err


def test_torch_launcher_blames_the_rank_killed_not_the_survivor(tmp_path):
    launcher = _start_torch(tmp_path, "kill")
    _wait_for_steps(launcher, tmp_path / "kill", 2)
    workers = _workers_of(launcher.pid)
    os.kill(workers[1], signal.SIGKILL)
    launcher.wait(timeout=300)
    err = (tmp_path / "kill.err").read_text()
    assert launcher.returncode == 1, err[-3000:]
    assert "rank 1 of 2 failed first (killed by SIGKILL)" in err, err[-3000:]
    assert "rank 0 of 2 failed first" not in err
    assert _gone(workers[0])


@pytest.mark.slow
def test_torch_workers_save_and_stop_when_their_launcher_is_killed(tmp_path):
    """kill -9 on the launcher cannot be passed on; the workers get SIGTERM from the kernel instead
    (PR_SET_PDEATHSIG), save, and exit rather than train on re-parented to init."""
    launcher = _start_torch(tmp_path, "orphan")
    _wait_for_steps(launcher, tmp_path / "orphan", 2)
    workers = _workers_of(launcher.pid)
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 120
    while not all(_gone(pid) for pid in workers.values()):
        assert time.monotonic() < deadline, "workers outlived their killed launcher"
        time.sleep(0.2)
    last = json.loads((tmp_path / "orphan" / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert (tmp_path / "orphan" / "checkpoints" / "latest").read_text().strip() == f"global_step{last}"
