"""The Aurora job as ALCF runs them: queue choice, PBS directives, the oneCCL/libfabric table, venv and module
checks, the in-job retry loop, torch's --platform xpu refusal, in-app device binding, and --resume auto on a
run that has no checkpoint yet (both trainers, tiny preset, CPU). Nothing here ran on Aurora."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from _pbs import JAX_70B, TORCH_70B, fake_pbs, write_script

from configs import ConfigError
from runtime import procgroup
from runtime.rundir import read_metrics
from scripts.aurora import alcf, launch

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- queues and directives
@pytest.mark.parametrize("nodes,walltime,queue", [
    (1, "30:00", "debug"), (2, "01:00:00", "debug"), (8, "01:00:00", "debug-scaling"),
    (256, "00:30:00", "debug-scaling"),
    (8, "06:00:00", "capacity"), (16, "168:00:00", "capacity"), (1, "02:00:00", "capacity"),
    (256, "12:00:00", "prod"), (1025, "18:00:00", "prod"), (2000, "24:00:00", "prod"),
])
def test_queue_from_nodes_and_walltime(nodes, walltime, queue):
    assert alcf.choose_queue(nodes, alcf.parse_walltime(walltime)) == queue


@pytest.mark.parametrize("nodes,walltime,queue,msg", [
    (32, "06:00:00", "auto", "no Aurora queue takes 32 nodes for 06:00:00 (debug 1-2 nodes for <= 01:00:00; "
     "debug-scaling 2-256 nodes for <= 01:00:00; capacity 1-16 nodes for <= 168:00:00; prod 256-10624 nodes for <= "
     "24:00:00 (<= 12:00:00 up to 1024 nodes)): shorten --walltime to 01:00:00 (debug-scaling), or use <= 16 nodes "
     "(capacity) or >= 256 (prod)"),
    (8, "06:00:00", "prod", "--queue prod takes 256-10624 nodes, not 8"),
    (1, "02:00:00", "debug", "--queue debug allows at most 01:00:00 for 1 nodes, not --walltime 02:00:00"),
    (300, "13:00:00", "prod", "--queue prod allows at most 12:00:00 for 300 nodes, not --walltime 13:00:00"),
    (17, "170:00:00", "capacity", "--queue capacity takes 1-16 nodes, not 17"),
    (1, "00:04:00", "auto", "--walltime 00:04:00 is under every Aurora queue's minimum of 00:05:00"),
    (1, "01:00:00", "large", "--queue 'large' is not one of auto, debug, debug-scaling, capacity, prod"),
])
def test_impossible_queue_requests_name_the_limits(nodes, walltime, queue, msg):
    with pytest.raises(ConfigError) as e:
        alcf.choose_queue(nodes, alcf.parse_walltime(walltime), queue)
    assert msg in str(e.value)


def test_walltime_is_read_as_pbs_does():
    assert [alcf.parse_walltime(w) for w in ("06:00:00", "30:00", "90", "168:00:00")] == [21600, 1800, 90, 604800]
    with pytest.raises(ConfigError, match=r"--walltime '6h' is not PBS's \[\[HH:\]MM:\]SS"):
        alcf.parse_walltime("6h")


def test_cli_refuses_prod_for_eight_nodes(capsys):
    with pytest.raises(SystemExit) as e:
        launch.main([*TORCH_70B, "--queue", "prod"])
    assert e.value.code == 2 and "--queue prod takes 256-10624 nodes, not 8" in capsys.readouterr().err


def test_pbs_directives():
    job = launch.main([*JAX_70B, "--walltime", "01:00:00"])
    heads = [line for line in job.pbs.splitlines() if line.startswith("#PBS")]
    assert heads == ["#PBS -N llama2-70b-jax-", "#PBS -A MyProject", "#PBS -q debug-scaling", "#PBS -l select=8",
                     "#PBS -l place=scatter:group=tier0", "#PBS -l walltime=01:00:00",
                     "#PBS -l filesystems=flare:home", "#PBS -k doe", "#PBS -j oe"]
    big = launch.main(["--trainer", "jax", "--nodes", "256", "-A", "P", "--mesh", "data=256,fsdp=12", "--zero", "3",
                       "--walltime", "12:00:00", "--print-only"])
    assert "#PBS -q prod" in big.pbs and "#PBS -l place=scatter\n" in big.pbs  # more than a rack: no tier0 group


# ----------------------------------------------------------------------------- environment table
@pytest.mark.parametrize("argv", [JAX_70B, TORCH_70B], ids=["jax", "torch"])
def test_env_table_reaches_the_script_and_nothing_misspelt_remains(argv):
    pbs = launch.main(argv).pbs
    exported = dict(re.findall(r"^export ([A-Z_0-9]+)=(.*)$", pbs, re.M))
    for s in alcf.ENV:
        assert exported[s.name] == s.value, s.name
        assert s.source in alcf.SOURCES and s.why
    # every oneCCL / libfabric / Level Zero variable the job exports is one of the table's
    assert {k for k in exported if k.startswith(("CCL_", "FI_", "ZE_"))} == {s.name for s in alcf.ENV}
    for bad in (*alcf.MISSPELT, "ZE_AFFINITY_MASK", "PALS_PMI"):
        assert bad not in pbs
    assert exported["FI_CXI_DEFAULT_CQ_SIZE"] == "1048576" and exported["FI_CXI_CQ_FILL_PERCENT"] == "30"
    assert exported["FI_MR_CACHE_MONITOR"] == "userfaultfd" and exported["ZE_ENABLE_PCI_ID_DEVICE_ORDER"] == "1"


def test_docs_table_matches_the_env_table():
    doc = (ROOT / "docs" / "aurora.md").read_text()
    for s in alcf.ENV:
        assert re.search(rf"^\| `{s.name}` \| `{re.escape(s.value)}` \|", doc, re.M), s.name
    assert doc.splitlines()[:4] == ["# Aurora jobs", "", "## Environments", ""]


# ----------------------------------------------------------------------------- checkpoints sized to the walltime
def test_checkpoint_interval_from_the_walltime():
    assert [launch.default_ckpt_every_s(w) for w in (600, 3600, 7200, 21600, 86400)] == [600, 600, 1200, 3600, 3600]
    job = launch.main([*TORCH_70B, "--walltime", "02:00:00"])
    p = job.mpiexec
    assert p[p.index("--ckpt-every-s") + 1] == "1200" and job.ckpt_every_s == 1200
    off = launch.main([*TORCH_70B, "--ckpt-every-s", "0"])
    assert "--ckpt-every-s" not in off.mpiexec and "--resume" in off.mpiexec


# ----------------------------------------------------------------------------- the job script under a fake PBS
def run_job(tmp_path: Path, argv: list[str], rcs: list[int], **pbs) -> subprocess.CompletedProcess:
    script = write_script(tmp_path, argv)
    env = fake_pbs(tmp_path, **pbs)
    (tmp_path / "rcs").write_text("".join(f"{rc}\n" for rc in rcs))
    return subprocess.run(["bash", str(script)], env={**env, "FAKE_RCS": str(tmp_path / "rcs")},
                          capture_output=True, text=True, cwd=tmp_path)


@pytest.mark.parametrize("rcs,extra,calls,rc,words", [
    ([1, 0], [], 2, 0, ["exit 1", "retrying:"]),
    ([75, 0], [], 2, 0, ["exit 75: a training step hung and the watchdog ended the run", "retrying:"]),
    ([2], [], 1, 2, ["exit 2: a configuration error; not retrying"]),
    ([3], [], 1, 3, ["exit 3: a non-finite loss (a rerun from the same checkpoint repeats it); not retrying"]),
    ([1, 1, 1], [], 3, 1, ["no retries left (2)"]),
    ([1, 0], ["--retries", "0"], 1, 1, ["no retries left (0)"]),
    ([137, 0], ["--retry-min-s", "99999"], 1, 137, ["not retrying:", "under RETRY_MIN_S=99999"]),
], ids=["retry-then-done", "watchdog", "config-error", "non-finite", "retries-spent", "no-retries", "no-time"])
def test_retry_loop(tmp_path, rcs, extra, calls, rc, words):
    r = run_job(tmp_path, [*JAX_70B, *extra], rcs)
    assert r.returncode == rc, r.stderr
    assert r.stdout.count("MPIEXEC ") == calls and r.stdout.count("--resume auto") == calls
    for w in words:
        assert w in r.stderr, (w, r.stderr)


@pytest.mark.parametrize("argv,venv", [(JAX_70B, ".venv-aurora"), (TORCH_70B, ".venv-aurora-torch")],
                         ids=["jax", "torch"])
def test_missing_venv_stops_the_job(tmp_path, argv, venv):
    r = run_job(tmp_path, argv, [], venv=None)
    assert r.returncode == 2 and "MPIEXEC" not in r.stdout
    assert f"error: venv {tmp_path / venv} is missing; build it with " in r.stderr
    assert ("make aurora-env" in r.stderr) == (venv == ".venv-aurora")


def test_failed_module_load_stops_the_torch_job(tmp_path):
    r = run_job(tmp_path, [*TORCH_70B, "--frameworks-module", "frameworks/2099.1"], [], venv=".venv-aurora-torch",
                module_rc=1)
    assert r.returncode == 2 and "MPIEXEC" not in r.stdout
    assert "error: module load frameworks/2099.1 failed" in r.stderr


# ----------------------------------------------------------------------------- torch: platform and devices
def test_torch_platform_xpu_refused_on_this_machine(tmp_path, monkeypatch, capsys):
    from torch_ref import train as torch_train

    monkeypatch.delenv("PBS_JOBID", raising=False)
    monkeypatch.setenv("ZE_AFFINITY_MASK", "3")
    with pytest.raises(SystemExit) as e:
        torch_train.main(["--preset", "tiny", "--mesh", "data=1", "--platform", "xpu", "--out-dir", str(tmp_path)])
    import torch

    err = capsys.readouterr().err
    assert e.value.code == 2
    assert (f"error: --platform xpu: no Intel GPU: torch.xpu.is_available() is False (torch {torch.__version__}, "
            "not an XPU build: torch.version.xpu is None); ZE_AFFINITY_MASK='3' limits the visible devices (unset it: "
            f"each rank binds its tile); host {socket.gethostname()!r} looks like a login node (PBS_JOBID unset): "
            "Aurora's GPUs are on compute nodes. Run on an Aurora compute node with `module load "
            "frameworks/2025.3.1` and .venv-aurora-torch (docs/aurora.md), or pass --platform cpu") in err
    assert list(tmp_path.iterdir()) == []  # refused before anything was prepared


def test_xpu_reason_for_an_xpu_build_on_a_compute_node():
    from torch_ref.train import xpu_unavailable_reason

    fake = types.SimpleNamespace(__version__="2.10.0a0+git449b176", version=types.SimpleNamespace(xpu="20250101"),
                                 xpu=object())
    got = xpu_unavailable_reason(fake, {"PBS_JOBID": "123.aurora"}, host="x4102c0s0b0n0")
    assert got == ("torch.xpu.is_available() is False (torch 2.10.0a0+git449b176, an XPU build: "
                   "torch.version.xpu=20250101); ZE_AFFINITY_MASK is unset")


def test_select_platform(monkeypatch):
    from torch_ref.train import select_platform

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert select_platform("cpu") == ("cpu", "gloo") and os.environ["DS_ACCELERATOR"] == "cpu"
    assert select_platform("auto") == ("cpu", "gloo")  # no XPU, no CUDA here
    with pytest.raises(ConfigError, match=r"--platform gpu: torch.cuda.is_available\(\) is False"):
        select_platform("gpu")


def test_bind_device_refuses_a_rank_beyond_the_visible_tiles(monkeypatch):
    from torch_ref import train as torch_train

    calls = []
    fake_xpu = types.SimpleNamespace(device_count=lambda: 1, set_device=calls.append)
    monkeypatch.setattr("torch.xpu", fake_xpu, raising=False)
    monkeypatch.setenv("ZE_AFFINITY_MASK", "7")
    torch_train.bind_device("xpu", 0)
    assert calls == [0]
    with pytest.raises(RuntimeError, match=r"local rank 7 but torch sees 1 xpu devices \(ZE_AFFINITY_MASK='7'"):
        torch_train.bind_device("xpu", 7)
    torch_train.bind_device("cpu", 7)  # nothing to bind on CPU
    assert calls == [0]


def test_torch_ref_never_imports_ipex():
    for f in (ROOT / "torch_ref").glob("*.py"):
        src = f.read_text()
        assert not re.search(r"^\s*(import|from)\s+(intel_extension_for_pytorch|oneccl_bindings)", src, re.M), f


# ----------------------------------------------------------------------------- JAX: devices chosen in-app
def test_jax_process_claims_its_local_tiles(monkeypatch):
    import jax

    from jax_impl import distributed

    info = distributed.DistInfo("h:1234", 96, 17, local_rank=5, local_world_size=12)
    assert distributed.local_device_ids(info, 1) == [5]
    assert distributed.local_device_ids(distributed.DistInfo("h:1", 8, 3, 0), 12) == list(range(12))
    updates, inits = [], []
    monkeypatch.setattr(jax.config, "update", lambda k, v: updates.append((k, v)))
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: inits.append(kw))
    monkeypatch.setattr(distributed, "rendezvous", lambda info, timeout_s: None)  # no peers here
    distributed.initialize(info, "xpu", devices_per_process=1)
    assert updates == [("jax_oneapi_visible_devices", "5")]
    assert inits[0]["local_device_ids"] == [5] and inits[0]["process_id"] == 17 and inits[0]["num_processes"] == 96
    updates.clear()
    distributed.initialize(info, "cpu", devices_per_process=1)  # CPU: fake devices, gloo, no visible-device list
    assert updates == [("jax_cpu_collectives_implementation", "gloo")] and inits[1]["local_device_ids"] is None


def test_jax_detect_needs_a_world_size_under_pmix():
    from jax_impl import distributed

    with pytest.raises(ConfigError, match="PALS_RANKID=2 gives this process a rank but nothing gives the world size"):
        distributed.detect({"PMIX_RANK": "2", "PALS_RANKID": "2", "MASTER_ADDR": "h"})
    info = distributed.detect({"PMIX_RANK": "2", "PALS_RANKID": "2", "PALS_LOCAL_RANKID": "0", "WORLD_SIZE": "8",
                               "MASTER_ADDR": "h", "JAX_COORDINATOR_PORT": "1234"})
    assert (info.coordinator, info.num_processes, info.process_id, info.local_rank) == ("h:1234", 8, 2, 0)


# ----------------------------------------------------------------------------- --resume auto, no checkpoint yet
TINY = ["--preset", "tiny", "--wandb", "disabled", "--quiet", "--steps", "3"]


def stale_run(tmp_path: Path, name: str) -> Path:
    """What a failed first attempt leaves: a named run directory with metrics but no checkpoint."""
    run = tmp_path / name
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 99.0}) + "\n")
    return run


def test_jax_resume_auto_without_a_checkpoint_starts_fresh_in_place(tmp_path):
    from jax_impl.train import main

    run = stale_run(tmp_path, "r")
    common = [*TINY, "--mesh", "fsdp=8", "--out-dir", str(tmp_path), "--name", "r", "--resume", "auto"]
    first = main([*common, "--ckpt-every-s", "1e-9", "--ckpt-keep", "5"])  # every step is past the interval
    assert first["run_dir"] == run and first["start_step"] == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3] and 99.0 not in [r["loss"] for r in read_metrics(run)]
    from jax_impl import checkpoint

    assert checkpoint.steps_in(run / "checkpoints") == [1, 2, 3]  # wall-clock saves, agreed at every step
    again = main([*common, "--steps", "4"])  # a requeue: continues from the last checkpoint
    assert again["start_step"] == 3 and [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]


def test_torch_resume_auto_without_a_checkpoint_starts_fresh_in_place(tmp_path):
    from torch_ref import train as torch_train

    run = stale_run(tmp_path, "t")
    (run / "rank0.err").write_text("old traceback")
    common = [*TINY, "--mesh", "data=1", "--zero", "1", "--out-dir", str(tmp_path), "--name", "t", "--resume", "auto"]
    first = torch_train.main([*common, "--ckpt-every-s", "1e-9"])
    assert first["run_dir"] == run and [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert not (run / "rank0.err").exists()
    assert sorted(p.name for p in (run / "checkpoints").glob("global_step*")) == [
        "global_step1", "global_step2", "global_step3"]
    meta = json.loads((run / "meta.json").read_text())
    assert (meta["platform"], meta["backend"], meta["accelerator"]) == ("cpu", "gloo", "cpu")
    torch_train.main([*common, "--steps", "4"])  # a requeue: continues from the last checkpoint
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert json.loads((run / "launch.json").read_text())["resume"] == str(run)


def test_resume_auto_needs_a_name(tmp_path, capsys):
    from torch_ref import train as torch_train

    with pytest.raises(SystemExit) as e:
        torch_train.main([*TINY, "--mesh", "data=1", "--out-dir", str(tmp_path), "--resume", "auto"])
    assert e.value.code == 2 and "--resume auto needs --name" in capsys.readouterr().err


# ----------------------------------------------------------------------------- rank 0's failure reaches every rank
def _two_ranks(tmp_path: Path, argv: list[str], env_for) -> list[subprocess.CompletedProcess]:
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    (tmp_path / "logs").mkdir(exist_ok=True)
    logs = [(tmp_path / "logs" / f"rank{i}.out", tmp_path / "logs" / f"rank{i}.err") for i in range(2)]
    group = procgroup.start([[sys.executable, *argv]] * 2, [{**base, "OMP_NUM_THREADS": "1", **env_for(i)}
                                                             for i in range(2)], cwd=ROOT, logs=logs)
    # every rank must exit by itself (a rank left waiting for rank 0 would run into the deadline and be killed)
    group.wait(deadline=time.monotonic() + 300, stop_on_failure=False, kill_on_stop=True)
    return [subprocess.CompletedProcess(p.args, p.wait(), o.read_text(), e.read_text())
            for p, (o, e) in zip(group.procs, logs, strict=True)]


def test_torch_rank0_run_dir_error_stops_every_rank(tmp_path):
    stale_run(tmp_path, "taken")
    port = str(procgroup.free_port())
    res = _two_ranks(tmp_path, ["-m", "torch_ref.train", *TINY, "--mesh", "data=2", "--zero", "1", "--out-dir",
                                str(tmp_path), "--name", "taken"],
                     lambda i: {"PMIX_RANK": str(i), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "TORCH_REF_PG_TIMEOUT": "1800"})
    for r in res:
        assert r.returncode == 2, r.stderr[-3000:]
        assert "rank 0 could not prepare the run directory: FileExistsError: run directory" in r.stderr


def test_jax_process0_run_dir_error_stops_every_process(tmp_path):
    stale_run(tmp_path, "taken")
    addr = f"127.0.0.1:{procgroup.free_port()}"
    res = _two_ranks(tmp_path, ["-m", "jax_impl.train", *TINY, "--mesh", "data=2,fsdp=4", "--out-dir", str(tmp_path),
                                "--name", "taken"],
                     lambda i: {"PMI_RANK": str(i), "PMI_SIZE": "2", "JAX_COORDINATOR_ADDRESS": addr})
    for r in res:
        assert r.returncode == 2, r.stderr[-3000:]
        assert "already holds a run; pick another --name or remove it" in r.stderr


@pytest.mark.parametrize("trainer", ["jax", "torch"])
def test_a_locked_run_directory_stops_every_rank(tmp_path, trainer):
    """Under an external launcher, process/rank 0 finds the run directory locked by a live run: every rank exits 2
    naming the holder (none waits for a peer that is gone)."""
    from runtime.rundir import lock_run_dir

    lock = lock_run_dir(tmp_path / "held")  # this test process is the live holder
    try:
        if trainer == "jax":
            addr = f"127.0.0.1:{procgroup.free_port()}"
            res = _two_ranks(tmp_path, ["-m", "jax_impl.train", *TINY, "--mesh", "data=2,fsdp=4", "--out-dir",
                                        str(tmp_path), "--name", "held"],
                             lambda i: {"PMI_RANK": str(i), "PMI_SIZE": "2", "JAX_COORDINATOR_ADDRESS": addr})
        else:
            port = str(procgroup.free_port())
            res = _two_ranks(tmp_path, ["-m", "torch_ref.train", *TINY, "--mesh", "data=2", "--zero", "1",
                                        "--out-dir", str(tmp_path), "--name", "held"],
                             lambda i: {"PMIX_RANK": str(i), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                        "TORCH_REF_PG_TIMEOUT": "1800"})
    finally:
        lock.release()
    for r in res:
        assert r.returncode == 2, r.stderr[-3000:]
        assert f"is in use by another run (pid {os.getpid()}" in r.stderr, r.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "held").iterdir()) == ["run.lock"]
