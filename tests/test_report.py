"""compare.report: parity verdicts on real JAX + DeepSpeed runs, fixture run directories, bad input."""

import json
import math
import shutil

import pytest

from compare import report
from jax_impl.train import main as jax_main
from runtime import hostmem
from runtime.rundir import METRIC_KEYS, host_cpu, write_config, write_meta


def make_run(runs_dir, layout: str, dtype: str, fw: str, losses, steps=None, repeat=1, step_s=None, **cfg_over):
    """A fixture run directory as a trainer would leave it."""
    cfg = report.run_config("tiny", report.LAYOUTS[layout], dtype, steps or len(losses), runs_dir, fw, repeat)
    for k, v in cfg_over.items():
        section, key = k.split(".")
        setattr(getattr(cfg, section), key, v)
    run_dir = runs_dir / cfg.train.name
    run_dir.mkdir(parents=True)
    write_config(run_dir, cfg)
    write_meta(run_dir, {"framework": fw, "devices": 2, "gbs": 4, "layout": layout,
                         **({"compile_s": 3.0} if fw == "jax" else {"init_s": 9.0})})
    with (run_dir / "metrics.jsonl").open("w") as f:
        for i, loss in enumerate(losses, 1):
            row = dict.fromkeys(METRIC_KEYS)
            row.update(step=i, loss=loss, grad_norm=1.0 + 0.01 * i, step_time_s=step_s or (0.1 if fw == "jax" else 0.2),
                       peak_mem_bytes=2**28)
            f.write(json.dumps(row) + "\n")
    return run_dir


def losses(n=12, scale=1.0):
    return [5.0 * scale * math.exp(-0.05 * i) for i in range(n)]


def test_fixture_runs_render_tables_plots_and_flag_a_corrupt_run(tmp_path, capsys):
    runs = tmp_path / "runs"
    make_run(runs, "zero1", "fp32", "jax", losses())
    make_run(runs, "zero1", "fp32", "torch", [x * (1 + 2e-7) for x in losses()])
    make_run(runs, "zero3", "fp32", "jax", losses())
    make_run(runs, "zero3", "fp32", "torch", [x * (1 + 3e-3) for x in losses()])  # too far apart for fp32
    make_run(runs, "zero2", "fp32", "jax", losses())
    bad = make_run(runs, "zero2", "fp32", "torch", losses())
    (bad / "metrics.jsonl").write_text((bad / "metrics.jsonl").read_text()[:-40])  # truncated mid-line
    out = tmp_path / "out"
    code = report.main(["--layouts", "zero1,zero2,zero3", "--dtype", "fp32", "--steps", "12", "--runs", str(runs),
                        "--out", str(out), "--no-run", "--assert"])
    assert code == 1  # zero3 fails parity, zero2 cannot be compared
    md = (out / "report.md").read_text()
    assert "| zero1 | fp32 | 12 | 2.0e-07 | 2.0e-07 |" in md and "PASS" in md
    assert "| zero3 | fp32 | 12 | 3.0e-03 | 3.0e-03 |" in md and "FAIL (first, every)" in md
    assert "**zero2/fp32**" in md and "metrics.jsonl line 12 is not valid JSON" in md
    assert f"Host: {host_cpu()}; host allocator {hostmem.child_allocator()}" in md
    data = json.loads((out / "report.json").read_text())
    assert data["layouts"]["zero1/fp32"]["speed_ratio"] == pytest.approx(2.0)  # 0.1 s vs 0.2 s per step
    assert data["layouts"]["zero1/fp32"]["parity"]["pass"] is True
    for name in ("loss_fp32.png", "loss_diff_fp32.png", "throughput_fp32.png"):
        assert (out / name).stat().st_size > 1000
    assert "parity failed or not compared: zero2/fp32, zero3/fp32" in capsys.readouterr().err


def test_bf16_verdict_uses_the_bf16_thresholds(tmp_path):
    runs = tmp_path / "runs"
    a = report.load_run(make_run(runs, "zero1", "bf16", "jax", losses()))
    b = report.load_run(make_run(runs, "zero1", "bf16", "torch", [x * (1 + 3e-4) for x in losses()]))
    p = report.parity(a, b, "bf16")
    assert p["pass"] and p["last10_mean_rel"] == pytest.approx(3e-4 / (1 + 3e-4), rel=1e-3)
    c = report.load_run(make_run(runs, "zero3", "bf16", "torch", [x * (1 + 8e-4) for x in losses()]))
    checks = report.parity(a, c, "bf16")["checks"]
    assert checks["every"] and not checks["last10_mean"]


def test_refuses_to_pair_different_configs_and_step_counts(tmp_path):
    runs = tmp_path / "runs"
    a = report.load_run(make_run(runs, "zero1", "fp32", "jax", losses()))
    b = report.load_run(make_run(runs, "zero1", "fp32", "torch", losses(), **{"optim.lr": 5e-3}))
    with pytest.raises(report.ReportError, match=r"differ in model/data/optimizer config: optim.lr: 0.001 vs 0.005"):
        report.pair_check(a, b)
    c = report.load_run(make_run(runs, "zero2", "fp32", "torch", losses(8)))
    with pytest.raises(report.ReportError, match="step counts differ"):
        report.pair_check(a, c)


@pytest.mark.parametrize("argv,msg", [
    (["--layouts", "zero9"], "unknown layout(s) zero9"),
    (["--dtype", "fp16"], "unknown dtype(s) fp16"),
    (["--preset", "nope"], "unknown preset 'nope'"),
])
def test_bad_arguments(argv, msg, capsys, tmp_path):
    assert report.main([*argv, "--runs", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert msg in capsys.readouterr().err


def test_default_layouts_are_the_studys_and_the_circular_pipeline_runs_by_name():
    default = report.build_parser().parse_args([]).layouts.split(",")
    assert default == ["zero1", "zero2", "zero3", "zero3-hpz", "mics", "tp2", "tp2-zero2", "pp2-zero1"]
    circ = report.LAYOUTS["pp2v2-zero1"].overrides()
    assert circ["jax.pipeline_repeats"] == 2 and circ["parallel.mesh"] == report.LAYOUTS["pp2-zero1"].mesh
    cfg = report.run_config("bench", report.LAYOUTS["pp2v2-zero1"], "fp32", 3, "runs", "torch")  # 4 layers
    assert cfg.jax.pipeline_repeats == 2  # both sides load it; only the JAX trainer has the schedule


def test_no_run_on_a_missing_runs_directory_is_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert report.main(["--no-run", "--runs", str(missing), "--out", str(tmp_path / "out")]) == 2
    assert f"--no-run --runs {missing}: no such directory" in capsys.readouterr().err
    assert not missing.exists()


def test_missing_run_is_named(tmp_path):
    with pytest.raises(report.ReportError, match="no such run directory"):
        report.load_run(tmp_path / "nope")


def test_real_jax_and_deepspeed_runs_pass_fp32_parity_and_a_changed_lr_fails(tmp_path):
    """Both real trainers on tiny, ZeRO-1 and ZeRO-3, 5 steps each; then JAX with twice the lr."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    code = report.main(["--layouts", "zero1,zero3", "--dtype", "fp32", "--steps", "5", "--runs", str(runs),
                        "--out", str(out), "--assert", "--eval-interval", "2", "--eval-iters", "2"])
    data = json.loads((out / "report.json").read_text())
    assert code == 0, {k: v.get("error") or v["parity"]["rel"] for k, v in data["layouts"].items()}
    for key in ("zero1/fp32", "zero3/fp32"):
        par = data["layouts"][key]["parity"]
        assert par["max_rel"] <= 1e-4
        # validation loss at steps 2 and 4 in both trainers, held to the every-step threshold
        assert par["val_steps"] == [2, 4] and par["checks"]["val_every"] and par["val_max_rel"] <= 1e-6
    assert "max rel Δval-loss" in (out / "report.md").read_text()
    # the same JAX run with a doubled learning rate: parity must fail, and pairing must refuse it
    other = tmp_path / "other"
    jax_main(["--preset", "tiny", "--mesh", "data=2", "--zero", "1", "--steps", "5", "--wandb", "disabled",
              "--quiet", "--out-dir", str(other), "--name", "lr2", "--optim.lr=2e-3"])
    changed = report.load_run(other / "lr2")
    torch_run = report.load_run(runs / "zero1-fp32-torch")
    assert not report.parity(changed, torch_run, "fp32")["pass"]
    with pytest.raises(report.ReportError, match=r"optim\.lr"):
        report.pair_check(changed, torch_run)
    shutil.rmtree(other)


def test_repeats_alternate_pairs_and_report_the_median_pair_ratio(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "out"
    for rep, torch_s in enumerate((0.2, 0.1, 0.3), 1):  # JAX/DS ratios 2, 1, 3 (JAX at 0.1 s each time)
        make_run(runs, "zero1", "fp32", "jax", losses(), repeat=rep)
        make_run(runs, "zero1", "fp32", "torch", [x * (1 + 2e-7) for x in losses()], repeat=rep, step_s=torch_s)
    assert (runs / "zero1-fp32-torch-r3").is_dir()
    args = ["--layouts", "zero1", "--dtype", "fp32", "--steps", "12", "--runs", str(runs), "--out", str(out),
            "--no-run", "--assert"]
    assert report.main([*args, "--repeats", "3"]) == 0
    r = json.loads((out / "report.json").read_text())["layouts"]["zero1/fp32"]
    assert r["speed_ratios"] == pytest.approx([2.0, 1.0, 3.0]) and r["speed_ratio"] == pytest.approx(2.0)
    assert r["throughput"]["torch"]["step_time_s"] == pytest.approx(0.2)  # the median repeat's own figures
    assert "2.00× (1.00–3.00, 3 pairs)" in (out / "report.md").read_text()
    assert report.main([*args, "--repeats", "4"]) == 1  # a 4th pair was never run: not compared
    assert "zero1-fp32-jax-r4" in (out / "report.md").read_text()
    assert report.main([*args, "--repeats", "0"]) == 2
    assert "--repeats 0 must be >= 1" in capsys.readouterr().err


def test_trainer_argv_carries_every_parallel_setting_of_the_layout():
    cfg = report.run_config("bench", report.LAYOUTS["pp2v2-zero1"], "fp32", 3, "runs", "jax")
    argv = report.trainer_argv("jax", cfg)
    assert "--jax.pipeline_repeats=2" in argv and "--jax.pipeline_head=last" in argv
    assert argv[argv.index("--mesh") + 1] == "pipeline=2,data=1" and argv[argv.index("--gas") + 1] == "4"
    hpz = report.run_config("tiny", report.LAYOUTS["zero3-hpz"], "fp32", 3, "runs", "torch")
    assert "--parallel.hpz=true" in report.trainer_argv("torch", hpz)
    plain = report.trainer_argv("jax", report.run_config("tiny", report.LAYOUTS["zero1"], "fp32", 3, "runs", "jax"))
    assert not [a for a in plain if a.startswith("--parallel.")]  # nothing that the preset already says


def test_a_run_that_ignored_a_layout_setting_is_refused(tmp_path, monkeypatch):
    # a trainer that dropped a setting of the layout (an earlier report dropped pipeline_repeats: its
    # "circular" pp2v2 runs were v = 1)
    def fake_execute(fw, cfg, log, timeout_s, processes=1):
        make_run(tmp_path, "pp2-zero1", "fp32", fw, losses(3), **{"jax.pipeline_head": "split"})

    monkeypatch.setattr(report, "execute", fake_execute)
    with pytest.raises(report.ReportError, match=r"ran another config than the layout's: jax\.pipeline_head"):
        report.compare_layout("tiny", report.LAYOUTS["pp2-zero1"], "fp32", 3, tmp_path, True, 60, print)


@pytest.mark.slow
def test_pipeline_pair_runs_jax_as_two_processes(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    code = report.main(["--layouts", "pp2-zero1", "--dtype", "fp32", "--steps", "3", "--runs", str(runs),
                        "--out", str(out), "--assert", "--eval-interval", "1", "--eval-iters", "1"])
    data = json.loads((out / "report.json").read_text())["layouts"]["pp2-zero1/fp32"]
    assert code == 0, data.get("error") or data["parity"]["rel"]
    assert data["parity"]["val_steps"] == [1, 2, 3]  # DeepSpeed's eval_batch vs the JAX pipeline's loss
    meta = json.loads((runs / "pp2-zero1-fp32-jax" / "meta.json").read_text())
    assert meta["processes"] == 2 and meta["devices"] == 2
    assert meta["host_allocator"] == hostmem.child_allocator()  # report.execute
    assert (runs / "pp2-zero1-fp32-jax.1.log").is_file()  # process 1's own log
    assert report.reusable(runs / "pp2-zero1-fp32-jax", report.run_config(
        "tiny", report.LAYOUTS["pp2-zero1"], "fp32", 3, runs, "jax", evals=(1, 1)), processes=2)
    assert not report.reusable(runs / "pp2-zero1-fp32-jax", report.run_config(
        "tiny", report.LAYOUTS["pp2-zero1"], "fp32", 3, runs, "jax", evals=(1, 1)), processes=1)  # made by 2 processes


def test_execute_starts_ranks_as_a_launcher_would_and_drops_the_callers_launcher(tmp_path, monkeypatch):
    started = []

    class Done:
        def __init__(self, argv, env, **kw):
            started.append(env)

        def poll(self):
            return 0

        def wait(self):
            return 0

    monkeypatch.setattr(report.subprocess, "Popen", Done)
    monkeypatch.setenv("PMI_RANK", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    lib.write_bytes(b"")
    monkeypatch.setenv("AURORA_HOST_MALLOC", "tcmalloc")
    monkeypatch.setenv("AURORA_TCMALLOC", str(lib))
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    cfg = report.run_config("tiny", report.LAYOUTS["pp2-zero1"], "fp32", 3, tmp_path, "jax")
    report.execute("jax", cfg, tmp_path / "one.log", 10)
    assert "PMI_RANK" not in started[0] and "SLURM_NTASKS" not in started[0]
    assert started[0]["LD_PRELOAD"] == str(lib)  # the trainers start on the host allocator (runtime/hostmem.py)
    started.clear()
    report.execute("jax", cfg, tmp_path / "two.log", 10, processes=2)
    assert [(e["PMI_RANK"], e["PMI_SIZE"]) for e in started] == [("0", "2"), ("1", "2")]
    assert started[0]["JAX_COORDINATOR_ADDRESS"] == started[1]["JAX_COORDINATOR_ADDRESS"]
    assert "SLURM_NTASKS" not in started[1] and (tmp_path / "two.1.log").is_file()


def test_execute_names_the_process_that_failed_not_the_one_it_stopped(tmp_path, monkeypatch):
    class Rank:
        def __init__(self, argv, env, stdout, **kw):
            self.rank, self.code = int(env["PMI_RANK"]), None
            stdout.write(f"rank {self.rank} log\n")
            stdout.flush()

        def poll(self):
            return 3 if self.rank == 1 else self.code  # rank 1 fails; rank 0 would wait for it forever

        def kill(self):
            self.code = -9

        def wait(self):
            return self.poll()

    monkeypatch.setattr(report.subprocess, "Popen", Rank)
    cfg = report.run_config("tiny", report.LAYOUTS["pp2-zero1"], "fp32", 3, tmp_path, "jax")
    with pytest.raises(report.ReportError, match=r"failed \(exit 3\); log .*run\.1\.log:\nrank 1 log"):
        report.execute("jax", cfg, tmp_path / "run.log", 10, processes=2)


def test_execute_passes_sigterm_on_to_every_trainer_and_waits_for_them(tmp_path, monkeypatch):
    """A SIGTERM to the report reaches each trainer process (they save); the report exits 143 after them."""
    import os
    import signal
    import threading

    got: list[int] = []

    class Rank:
        def __init__(self, argv, env, stdout, **kw):
            self.code = None

        def poll(self):
            return self.code

        def send_signal(self, sig):
            got.append(sig)
            self.code = 128 + sig  # saved and stopped

        def kill(self):
            self.code = -9

        def wait(self):
            return self.code

    monkeypatch.setattr(report.subprocess, "Popen", Rank)
    cfg = report.run_config("tiny", report.LAYOUTS["pp2-zero1"], "fp32", 3, tmp_path, "jax")
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    with pytest.raises(SystemExit) as e:
        report.execute("jax", cfg, tmp_path / "run.log", 60, processes=2)
    assert e.value.code == 143 and got == [signal.SIGTERM, signal.SIGTERM]
