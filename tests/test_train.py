"""`python -m jax_impl.train` end to end: run directory, logs, dry-run plans, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import load_config
from jax_impl.train import main
from runtime.rundir import METRIC_KEYS, read_metrics

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_run_writes_config_meta_and_metrics(tmp_path, capsys):
    out = main(["--preset", "tiny", "--mesh", "data=2,fsdp=2", "--steps", "4", "--out-dir", str(tmp_path),
                "--name", "r1", "--wandb", "disabled", "--quiet", "--optim.lr=3e-3"])
    run_dir = tmp_path / "r1"
    assert out["run_dir"] == run_dir
    doc = json.loads((run_dir / "config.json").read_text())
    expected = load_config("tiny", {"parallel.mesh": "data=2,fsdp=2", "train.steps": 4, "train.out_dir": str(tmp_path),
                                    "train.name": "r1", "train.wandb": "disabled", "optim.lr": 3e-3})
    assert doc["hash"] == expected.hash() and doc["config"] == expected.to_dict()
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["framework"] == "jax" and meta["devices"] == 4 and meta["layout"] == "zero3"
    assert f", {os.cpu_count()} CPUs" in meta["cpu"]  # the host, for reading its timings later
    assert meta["data"] == {"source": "synthetic", "seed": 1234}  # the tiny preset's stream
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(set(r) == set(METRIC_KEYS) for r in rows)
    assert [r["loss"] for r in rows] == out["losses"]
    assert rows[-1]["consumed_samples"] == 4 * 2 * 4  # steps x mbs x dp
    assert all(r["tflops_per_device"] > 0 and r["tokens_per_s_per_device"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "step     4 | loss" in printed and "TFLOPS/dev" in printed
    assert not (run_dir / "checkpoints").exists()  # no --ckpt-every, no save: no checkpoint manager was made


def test_run_that_never_saves_never_loads_orbax(tmp_path):
    """orbax and tensorstore (~24 MiB of host memory per process) are imported at the first save only."""
    argv = ["--preset", "tiny", "--mesh", "data=1", "--steps", "1", "--out-dir", str(tmp_path), "--wandb",
            "disabled", "--quiet"]
    code = (f"import sys; from jax_impl.train import main; main({argv!r}); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'orbax', 'tensorstore'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-2000:]


def test_step_is_compiled_before_state_exists(tmp_path, monkeypatch):
    """The compiler's working memory is freed before params and Adam state are allocated, so the peak RSS is
    the larger of the two rather than their sum (docs/performance.md, "Peak host memory")."""
    from jax_impl import trainer as trainer_mod

    order = []
    compile_step, init_state = trainer_mod.Trainer.compile_step, trainer_mod.Trainer.init_state

    def compiling(self, *a, **k):
        order.append("compile")
        return compile_step(self, *a, **k)

    def initing(self):
        order.append("init")
        return init_state(self)

    monkeypatch.setattr(trainer_mod.Trainer, "compile_step", compiling)
    monkeypatch.setattr(trainer_mod.Trainer, "init_state", initing)
    main(["--preset", "tiny", "--mesh", "data=1", "--steps", "1", "--out-dir", str(tmp_path), "--wandb", "disabled",
          "--quiet"])
    assert order == ["compile", "init"]


def test_eval_step_is_compiled_with_the_train_step(tmp_path, monkeypatch):
    """A run that evaluates compiles its evaluation step ahead of time too, before the state exists: compiled at
    the first evaluation, its compiler memory landed on top of params and Adam state (docs/performance.md)."""
    from jax_impl import trainer as trainer_mod

    order = []
    compile_eval, init_state = trainer_mod.Trainer.compile_eval, trainer_mod.Trainer.init_state
    monkeypatch.setattr(trainer_mod.Trainer, "compile_eval", lambda self: order.append("compile eval") or
                        compile_eval(self))
    monkeypatch.setattr(trainer_mod.Trainer, "init_state", lambda self: order.append("init") or init_state(self))
    out = main(["--preset", "tiny", "--mesh", "data=1", "--steps", "2", "--out-dir", str(tmp_path), "--wandb",
                "disabled", "--quiet", "--train.eval_interval=1", "--train.eval_iters=1"])
    assert order == ["compile eval", "init"]
    rows = [json.loads(line) for line in (out["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] is not None for r in rows] == [True, True]
    order.clear()
    main(["--preset", "tiny", "--mesh", "data=1", "--steps", "2", "--out-dir", str(tmp_path), "--name", "noeval",
          "--wandb", "disabled", "--quiet", "--train.eval_interval=0"])
    assert order == ["init"]  # a run that never evaluates compiles no evaluation step


def test_refuses_to_overwrite_a_run(tmp_path, capsys):
    args = ["--preset", "tiny", "--steps", "1", "--out-dir", str(tmp_path), "--name", "same", "--wandb", "disabled",
            "--quiet", "--mesh", "data=1"]
    main(args)
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert f"run directory {tmp_path / 'same'} already holds a run; pick another --name" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["out-dir", "ckpt-dir"])
def test_unusable_out_dir_or_ckpt_dir_is_refused_before_compiling(tmp_path, capsys, where):
    afile = tmp_path / "afile"
    afile.write_text("x")
    args = ["--preset", "tiny", "--steps", "2", "--mesh", "data=1", "--name", "u", "--wandb", "disabled", "--quiet",
            "--ckpt-every", "1"]
    if where == "out-dir":
        args += ["--out-dir", str(afile)]
        msg = f"--out-dir {afile}: cannot make the run directory there"
    else:
        args += ["--out-dir", str(tmp_path / "runs"), "--ckpt-dir", str(afile / "ck")]
        msg = f"--ckpt-dir {afile / 'ck'}: {afile} is not a directory"
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert msg in err and "Traceback" not in err
    assert "init + compile" not in out  # refused before compiling, not at the first save


@pytest.mark.slow
def test_small_preset_loss_falls_over_30_steps(tmp_path):
    out = main(["--preset", "small", "--mesh", "fsdp=8", "--steps", "30", "--out-dir", str(tmp_path),
                "--wandb", "disabled", "--quiet"])
    losses = out["losses"]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses


def test_dry_run_in_process_allocates_nothing_and_reports(capsys):
    plan = main(["--preset", "tiny", "--mesh", "fsdp=8", "--dry-run"])
    printed = capsys.readouterr().out
    assert f"{load_config('tiny').model.n_params():,} parameters" in printed
    assert plan["memory"]["argument"] > 0 and plan["memory"]["temp"] > 0
    # Adam's two moments per parameter, plus the replicated int32 step counters
    assert 0 <= plan["state_bytes"]["opt_state"] - 2 * plan["state_bytes"]["params"] <= 16


@pytest.mark.parametrize("argv,msg", [
    (["--mesh", "fsdb=8"], "unknown mesh axis 'fsdb'"),
    (["--preset", "tiny", "--mesh", "fsdp=16"], "JAX already started with 8 devices but the mesh needs 16"),
    (["--preset", "tiny", "--model.n_layerz=3"], "did you mean 'model.n_layers'"),
    (["--preset", "tiny", "--zero", "2", "--parallel.hpz=true", "--mesh", "data=2,fsdp=2"], "needs ZeRO-3"),
])
def test_bad_input_exits_2_with_message(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--dry-run"])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    return subprocess.run([sys.executable, "-m", "jax_impl.train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_70b_dry_run_on_96_fake_devices():
    r = _cli("--preset", "llama2-70b", "--mesh", "fsdp=96", "--dry-run")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "68,976,648,192 parameters" in r.stdout
    assert "96 devices" in r.stdout and "padded to a multiple of 96" in r.stdout
    params_line = next(line for line in r.stdout.splitlines() if line.strip().startswith("params"))
    gib = float(params_line.split()[1])
    assert 68_976_648_192 * 4 / 96 / 2**30 <= gib <= 1.01 * 68_976_648_192 * 4 / 96 / 2**30
    assert "AOT-compiled train step" in r.stdout and "temp" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ("--mesh", "data=8,fsdp=12", "--parallel.hpz=true"),
    ("--mesh", "data=8,fsdp=12", "--parallel.mics=true"),
    ("--mesh", "fsdp=192"),
])
def test_70b_dry_run_other_layouts(args):
    r = _cli("--preset", "llama2-70b", *args, "--dry-run")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "68,976,648,192 parameters" in r.stdout and "AOT-compiled train step" in r.stdout


@pytest.mark.slow
def test_70b_hpz_8_nodes_fits_a_tile():
    """The study's ZeRO-3 + hpZ layout on 8 nodes: the AOT-compiled step's peak per device is within the
    57.8 GiB (64 GB x 0.97) of a PVC tile (XLA:CPU's buffer assignment is deterministic; docs/memory.md)."""
    r = _cli("--preset", "llama2-70b", "--mesh", "data=8,fsdp=12", "--zero", "3", "--parallel.hpz=true",
             "--dry-run")
    assert r.returncode == 0, r.stderr[-3000:]
    peak = float(next(ln for ln in r.stdout.splitlines() if ln.strip().startswith("peak")).split()[1])
    assert peak <= 64e9 * 0.97 / 2**30, r.stdout


@pytest.mark.slow
def test_42b_tp6_dry_run():
    r = _cli("--preset", "auroragpt-42b-tp6", "--dry-run")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "41,404,500,960 parameters" in r.stdout and "'tensor': 6" in r.stdout


@pytest.mark.slow
def test_gpu_8b_plan_fits_one_h200():
    """The gpu-8b preset (Llama-3-8B shape, fp32 master and AdamW moments) on one device: by XLA:CPU's plan the
    step's peak is within an H200's 139 GiB, because the update holds one gradient-sized buffer (149.6 GiB when
    the gradient norm and clipping each held a second one; docs/memory.md)."""
    r = _cli("--preset", "gpu-8b", "--platform", "cpu", "--jax.attn_impl=xla", "--dry-run")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "8,030,261,248 parameters" in r.stdout
    peak = float(next(ln for ln in r.stdout.splitlines() if ln.strip().startswith("peak")).split()[1])
    assert peak <= 139, r.stdout


def test_wandb_offline_run_never_breaks_and_logs_locally(tmp_path):
    out = main(["--preset", "tiny", "--mesh", "data=1", "--steps", "2", "--out-dir", str(tmp_path), "--name", "w",
                "--wandb", "offline", "--quiet"])
    assert len(out["losses"]) == 2
    assert list((tmp_path / "w").glob("wandb/offline-run-*")), "wandb offline files expected in the run directory"
