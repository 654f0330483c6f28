"""Checkpoints: exact resume (in-process and after kill -9), another mesh, corrupt/incompatible refusals, export."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from fault_runner import faults

from configs import load_config
from jax_impl import checkpoint
from jax_impl.sharding import make_mesh
from jax_impl.train import main
from jax_impl.trainer import Trainer
from runtime.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--wandb", "disabled", "--quiet"]


def run(tmp_path, name: str, *args: str) -> dict:
    return main([*TINY, "--out-dir", str(tmp_path), "--name", name, *args])


def trainer(mesh: str, **over) -> Trainer:
    cfg = load_config("tiny", {"parallel.mesh": mesh, **over})
    return Trainer.build(cfg, make_mesh(cfg.mesh_shape(8)))


def leaves_equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """4 steps on fsdp=8 with checkpoints at steps 2 and 4 (every test below reads it, none writes it)."""
    return run(tmp_path_factory.mktemp("base"), "base", "--mesh", "fsdp=8", "--steps", "4", "--ckpt-every", "2")


def copy_ckpt(base: dict, tmp_path: Path) -> Path:
    shutil.copytree(base["ckpt_dir"], tmp_path / "checkpoints")
    return tmp_path / "checkpoints"


def test_resume_continues_bit_identically_on_another_mesh(base, tmp_path):
    assert checkpoint.steps_in(base["ckpt_dir"]) == [2, 4]
    meta = checkpoint.read_meta(base["ckpt_dir"], 2)
    assert meta["step"] == 2 and meta["consumed_samples"] == 2 * 16 and meta["mesh"]["fsdp"] == 8
    # fsdp=8 -> data=2,fsdp=4: same global batch, other shardings; the schedule count and data position travel
    res = run(tmp_path, "res", "--mesh", "data=2,fsdp=4", "--steps", "4", "--resume", str(base["ckpt_dir"] / "2"))
    assert res["start_step"] == 2
    assert res["losses"] == base["losses"][2:]  # bit for bit
    assert leaves_equal(res["params"], base["params"]) and leaves_equal(res["opt_state"], base["opt_state"])
    rows = read_metrics(res["run_dir"])
    assert [r["step"] for r in rows] == [3, 4] and rows[-1]["consumed_samples"] == 4 * 16


def test_restore_repads_between_meshes(tmp_path):
    """fsdp=6 stores vocab 256 padded to 258 and hidden 64 to 66; data=2,fsdp=4 stores them unpadded:
    logical values must match."""
    src = trainer("fsdp=6")
    params, opt = src.init_state()
    assert params["embed"].shape == (258, 64) and params["layers"]["wq"].shape[1] == 66
    ck = checkpoint.Checkpointer(tmp_path / "ck")
    ck.save(1, params, opt, checkpoint.checkpoint_meta(src.cfg, src, 1, 16))
    ck.close()
    dst = trainer("data=2,fsdp=4")
    r = checkpoint.restore(tmp_path / "ck", dst)
    assert r.params["embed"].shape == (256, 64)
    assert r.params["embed"].sharding == dst.param_sh["embed"]
    assert leaves_equal(dst.logical_params(r.params), src.logical_params(params))
    # and back onto the padded mesh: the padding comes back as zeros
    r2 = checkpoint.restore(tmp_path / "ck", src)
    assert leaves_equal(r2.params, params) and leaves_equal(r2.opt_state, opt)


def test_truncated_checkpoint_refused_and_previous_still_loads(base, tmp_path):
    ck = copy_ckpt(base, tmp_path)
    data_files = sorted(f for f in (ck / "4" / "params").rglob("*") if f.is_file() and "/d/" in str(f))
    assert data_files, list((ck / "4").rglob("*"))
    for f in data_files:  # a save cut short: the array data stops half way
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    tr = trainer("fsdp=8", **{"train.steps": 4})
    with pytest.raises(checkpoint.CheckpointError, match=r"step 4 .* unreadable") as e:
        checkpoint.restore(ck, tr)
    assert "previous checkpoint, step 2" in str(e.value) and f"--resume {ck / '2'}" in str(e.value)
    r = checkpoint.restore(ck / "2", tr)
    assert r.step == 2 and r.meta["consumed_samples"] == 32
    # the trainer says the same and exits 2
    with pytest.raises(SystemExit) as se:
        run(tmp_path, "again", "--mesh", "fsdp=8", "--steps", "4", "--resume", str(ck))
    assert se.value.code == 2


def test_half_written_save_is_not_a_checkpoint(base, tmp_path):
    """A crash during a save leaves orbax's tmp directory; it is never listed or restored."""
    ck = copy_ckpt(base, tmp_path)
    tmp = ck / "6.orbax-checkpoint-tmp-1234567"
    (tmp / "params").mkdir(parents=True)
    (tmp / "params" / "garbage").write_bytes(b"\0" * 10)
    assert checkpoint.steps_in(ck) == [2, 4]
    assert checkpoint.restore(ck, trainer("fsdp=8", **{"train.steps": 4})).step == 4


def test_incompatible_model_names_parameter_and_shapes(base):
    wider = trainer("fsdp=8", **{"model.ffn_hidden": 256})
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.restore(base["ckpt_dir"], wider)
    msg = str(e.value)
    assert "does not fit this model" in msg
    assert "layers.w_down: checkpoint [2, 128, 64] vs model [2, 256, 64]" in msg
    assert "'ffn_hidden': (128, 256)" in msg


def test_export_to_torch_and_back_is_exact(base, tmp_path):
    import torch

    from torch_ref.model import Llama

    pt, back = tmp_path / "model.pt", tmp_path / "back"
    assert checkpoint._cli(["export", "--to", "torch", str(base["ckpt_dir"]), str(pt)]) == 0
    model = Llama(load_config("tiny").model)
    model.load_state_dict(torch.load(pt, weights_only=True), strict=True)
    assert checkpoint._cli(["import", "--from", "torch", str(pt), str(back), "--preset", "tiny"]) == 0
    params, meta = checkpoint.restore_numpy(back)
    assert meta["params_only"] and leaves_equal(params, base["params"])
    r = checkpoint.restore(back, trainer("fsdp=8"))  # a params-only checkpoint: weights, no optimizer state
    assert r.opt_state is None and leaves_equal(r.params, base["params"])
    bad = tmp_path / "bad.pt"
    sd = torch.load(pt, weights_only=True)
    sd["layers.0.wq.weight"] = sd["layers.0.wq.weight"][:, :32]
    torch.save(sd, bad)
    assert checkpoint._cli(["import", str(bad), str(tmp_path / "x"), "--preset", "tiny"]) == 2


@pytest.mark.slow
def test_params_only_checkpoint_starts_a_run(base, tmp_path):
    back = tmp_path / "back"
    params, _ = checkpoint.restore_numpy(base["ckpt_dir"])
    checkpoint.save_params_only(back, params, load_config("tiny"))
    res = run(tmp_path, "ft", "--mesh", "fsdp=8", "--steps", "1", "--resume", str(back))
    assert res["start_step"] == 0 and len(res["losses"]) == 1


@pytest.mark.slow
def test_sigterm_saves_then_exits_and_resume_finishes(tmp_path):
    with faults("sigterm@2"), pytest.raises(SystemExit) as e:
        run(tmp_path, "pre", "--mesh", "fsdp=8", "--steps", "4")
    assert e.value.code == 128 + signal.SIGTERM
    ck = tmp_path / "pre" / "checkpoints"
    assert checkpoint.steps_in(ck) == [2]
    res = run(tmp_path, "pre", "--mesh", "fsdp=8", "--steps", "4", "--resume", "auto")
    assert res["start_step"] == 2 and len(res["losses"]) == 2
    assert [r["step"] for r in read_metrics(tmp_path / "pre")] == [1, 2, 3, 4]


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.Popen([sys.executable, "-m", "jax_impl.train", *TINY, *args], cwd=ROOT, env={**e, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_kill9_at_a_random_step_then_resume_is_bit_identical(tmp_path):
    steps, every = 10, 2
    common = ["--mesh", "fsdp=8", "--steps", str(steps), "--ckpt-every", str(every), "--out-dir", str(tmp_path)]
    kill_at = random.Random(os.environ.get("PYTEST_SEED", "0") + str(time.time_ns())).randint(3, steps - 2)
    p = _cli(*common, "--name", "killed")
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    ckpts = tmp_path / "killed" / "checkpoints"
    while time.monotonic() < deadline and p.poll() is None:
        # kill at the random step, but not before an (asynchronously written) checkpoint is complete:
        # tiny steps take milliseconds, so the first save may still be in flight at step kill_at
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_at and checkpoint.steps_in(ckpts):
            break
        time.sleep(0.01)
    assert p.poll() is None, f"run ended before step {kill_at}: {p.communicate()[1][-2000:]}"
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = len(metrics.read_text().splitlines())
    saved = checkpoint.steps_in(tmp_path / "killed" / "checkpoints")
    assert saved and max(saved) <= done, (saved, done)
    r = _cli(*common, "--resume", str(tmp_path / "killed"))
    out, err = r.communicate(timeout=600)
    assert r.returncode == 0, err[-3000:]
    assert f"step {max(saved)}" in out
    full = main([*TINY, *common, "--name", "full"])
    rows = read_metrics(tmp_path / "killed")
    assert [row["step"] for row in rows] == list(range(1, steps + 1))  # the killed run's extra rows were dropped
    assert [row["loss"] for row in rows] == full["losses"], (kill_at, max(saved))
    assert [row["grad_norm"] for row in rows] == [row["grad_norm"] for row in read_metrics(tmp_path / "full")]
    meta = json.loads((tmp_path / "killed" / "meta.json").read_text())
    assert meta["resumed_from"]["step"] == max(saved)


@pytest.mark.slow
def test_deepspeed_kill9_then_resume_is_bit_identical(tmp_path):
    """torch_ref (DeepSpeed ZeRO-1, 2 ranks): SIGKILL the launcher and its workers, resume, same losses."""
    from torch_ref import train as torch_train

    steps = 8
    common = ["--preset", "tiny", "--wandb", "disabled", "--quiet", "--mesh", "data=2", "--zero", "1",
              "--steps", str(steps), "--ckpt-every", "2", "--out-dir", str(tmp_path)]
    kill_at = random.Random(time.time_ns()).randint(3, steps - 2)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.Popen([sys.executable, "-m", "torch_ref.train", *common, "--name", "killed"], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 400
    ckpts = tmp_path / "killed" / "checkpoints"
    while time.monotonic() < deadline and p.poll() is None:
        # kill at the random step once DeepSpeed has a complete checkpoint (it writes `latest` last)
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_at and (ckpts / "latest").exists():
            break
        time.sleep(0.01)
    assert p.poll() is None, f"run ended before step {kill_at}: {p.communicate()[1][-2000:]}"
    os.killpg(p.pid, signal.SIGKILL)  # the launcher's own session: it and its worker processes
    p.wait()
    latest = (tmp_path / "killed" / "checkpoints" / "latest").read_text().strip()
    res = torch_train.main([*common, "--resume", str(tmp_path / "killed")])
    full = torch_train.main([*common, "--name", "full"])
    assert len(res["losses"]) == steps
    assert res["losses"] == full["losses"], (kill_at, latest)
    assert [r["grad_norm"] for r in res["metrics"]] == [r["grad_norm"] for r in full["metrics"]]


# ----------------------------------------------------------------------------- branches, fallbacks, refusals
def copy_run(base: dict, tmp_path: Path, name: str) -> Path:
    shutil.copytree(base["run_dir"], tmp_path / name)
    return tmp_path / name


def corrupt(step_dir: Path) -> None:
    """A save cut short: every array file of the step stops half way."""
    files = [f for f in step_dir.rglob("*") if f.is_file() and "/d/" in str(f)]
    assert files, list(step_dir.rglob("*"))
    for f in files:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_resume_from_an_older_step_starts_a_new_branch(base, tmp_path, capsys):
    """The recovery the trainer prints (--resume <run>/checkpoints/<older step>, no --name) continues in place:
    the later checkpoints and rows of the old branch are moved aside, not deleted, and the new branch saves."""
    run_dir = copy_run(base, tmp_path, "br")
    ck = run_dir / "checkpoints"
    res = main([*TINY, "--mesh", "fsdp=8", "--steps", "4", "--ckpt-every", "2", "--resume", str(ck / "2")])
    assert res["run_dir"] == run_dir and res["start_step"] == 2
    assert res["losses"] == base["losses"][2:]  # the new branch repeats the old one bit for bit
    assert checkpoint.steps_in(ck) == [2, 4]
    aside = [p for p in ck.iterdir() if p.name.startswith("abandoned-")]
    assert len(aside) == 1 and checkpoint.steps_in(aside[0]) == [4]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    assert [r["loss"] for r in read_metrics(run_dir)] == base["losses"]
    rows_aside = list(run_dir.glob("metrics.abandoned-*.jsonl"))
    assert len(rows_aside) == 1 and [json.loads(x)["step"] for x in rows_aside[0].read_text().splitlines()] == [3, 4]
    assert "previous branch's later checkpoints are in" in capsys.readouterr().out


def test_resume_auto_falls_back_to_the_newest_readable_checkpoint(base, tmp_path, capsys):
    run_dir = copy_run(base, tmp_path, "fb")
    corrupt(run_dir / "checkpoints" / "4")
    res = run(tmp_path, "fb", "--mesh", "fsdp=8", "--steps", "4", "--ckpt-every", "2", "--resume", "auto")
    assert res["start_step"] == 2 and res["losses"] == base["losses"][2:]
    err = capsys.readouterr().err
    assert "checkpoint step 4" in err and "unreadable" in err and "resumed from step 2, the newest readable" in err
    # the unreadable step is kept aside (for a post-mortem), the new branch saved a good step 4
    aside = next(p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("abandoned-"))
    assert checkpoint.steps_in(aside) == [4]
    assert checkpoint.restore(run_dir / "checkpoints", trainer("fsdp=8", **{"train.steps": 4})).step == 4
    assert [r["loss"] for r in read_metrics(run_dir)] == base["losses"]


def test_resume_with_fewer_steps_than_done_is_refused_and_config_untouched(base, tmp_path, capsys):
    run_dir = copy_run(base, tmp_path, "few")
    before = (run_dir / "config.json").read_bytes()
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "few", "--mesh", "fsdp=8", "--steps", "3", "--resume", "auto")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--steps 3" in err and "already at step 4" in err and "give --steps >= 4" in err
    assert (run_dir / "config.json").read_bytes() == before
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]


def test_torn_metrics_line_is_dropped_and_the_run_resumes(base, tmp_path):
    run_dir = copy_run(base, tmp_path, "torn")
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 5.6')  # what a crash in the middle of a write leaves
    with pytest.warns(UserWarning, match="torn last line"):
        res = run(tmp_path, "torn", "--mesh", "fsdp=8", "--steps", "5", "--resume", "auto")
    assert res["start_step"] == 4 and len(res["losses"]) == 1
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]


def test_requeue_before_the_first_checkpoint_starts_fresh_keeping_the_rows(tmp_path, capsys):
    """A first attempt killed before (or during) its first save: --resume auto starts that run again from
    step 0 in its directory; the attempt's rows are kept aside, its half-written save is never restored."""
    run_dir = tmp_path / "rq"
    (run_dir / "checkpoints" / "2.orbax-checkpoint-tmp-99").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 99.0}\n{"step": 2, "loss": 98.0}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match="torn"):
        res = run(tmp_path, "rq", "--mesh", "fsdp=8", "--steps", "2", "--ckpt-every", "2", "--resume", "auto")
    assert res["run_dir"] == run_dir and res["start_step"] == 0
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2] and 99.0 not in [r["loss"] for r in rows]
    aside = list(run_dir.glob("metrics.abandoned-*.jsonl"))
    assert len(aside) == 1 and [json.loads(x)["loss"] for x in aside[0].read_text().splitlines()] == [99.0, 98.0]
    assert checkpoint.steps_in(run_dir / "checkpoints") == [2]


@pytest.mark.parametrize("flag, value, hint", [("--ckpt-every", "-1", "must be >= 0"),
                                               ("--ckpt-keep", "0", "must be >= 1"),
                                               ("--ckpt-every-s", "-5", "must be a finite number >= 0")])
def test_bad_checkpoint_flags_are_refused(tmp_path, capsys, flag, value, hint):
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "bad", "--steps", "2", flag, value)
    assert e.value.code == 2
    assert f"{flag} {float(value) if flag.endswith('-s') else value}: {hint}" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- torch_ref: the same semantics
def fake_ds_run(tmp_path: Path, steps: list[int], latest: int) -> Path:
    """A run directory with DeepSpeed-shaped tags whose .pt files are real torch.save archives."""
    import torch

    run_dir = tmp_path / "t"
    for s in steps:
        tag = run_dir / "checkpoints" / f"global_step{s}"
        tag.mkdir(parents=True)
        torch.save({"module": torch.ones(64) * s}, tag / "mp_rank_00_model_states.pt")
        torch.save({"optimizer": torch.ones(64)}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (run_dir / "checkpoints" / "latest").write_text(f"global_step{latest}")
    (run_dir / "config.json").write_text('{"sentinel": true}\n')
    return run_dir


def test_torch_resume_auto_skips_an_unreadable_tag(tmp_path, capsys):
    from torch_ref.train import resolve_resume

    run_dir = fake_ds_run(tmp_path, [2, 4, 6], latest=4)  # 6: cut short before DeepSpeed wrote `latest`
    f = run_dir / "checkpoints" / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[:100])
    cfg = load_config("tiny", {"train.name": "t", "train.out_dir": str(tmp_path)})
    assert resolve_resume(cfg, "auto") == (str(run_dir), False, "global_step2")
    err = capsys.readouterr().err
    assert "global_step4 is unreadable (zero_pp_rank_0" in err and "resuming from global_step2" in err
    assert resolve_resume(cfg, str(run_dir / "checkpoints" / "global_step6")) == (str(run_dir), False,
                                                                                   "global_step6")


def test_torch_resume_with_fewer_steps_is_refused_before_any_worker(tmp_path, capsys):
    from torch_ref import train as torch_train

    run_dir = fake_ds_run(tmp_path, [8], latest=8)
    with pytest.raises(SystemExit) as e:
        torch_train.main(["--preset", "tiny", "--wandb", "disabled", "--mesh", "data=1", "--steps", "4",
                          "--resume", str(run_dir)])
    assert e.value.code == 2
    assert "already at step 8: give --steps >= 8" in capsys.readouterr().err
    assert (run_dir / "config.json").read_text() == '{"sentinel": true}\n'


@pytest.mark.parametrize("flag", ["--ckpt-every=-1", "--ckpt-every-s=-1"])
def test_torch_negative_checkpoint_interval_is_refused(tmp_path, capsys, flag):
    from torch_ref import train as torch_train

    with pytest.raises(SystemExit) as e:
        torch_train.main(["--preset", "tiny", "--mesh", "data=1", "--out-dir", str(tmp_path), flag])
    assert e.value.code == 2 and "must be" in capsys.readouterr().err and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_torch_resume_from_an_older_tag_starts_a_new_branch(tmp_path, capsys):
    """DeepSpeed: --resume <run>/checkpoints/global_step2 continues in place, after a torn metrics line; the later
    tags and rows of the old branch are moved aside, `latest` is rewritten, and the new branch repeats the old."""
    from torch_ref import train as torch_train

    common = ["--preset", "tiny", "--wandb", "disabled", "--quiet", "--mesh", "data=1", "--zero", "1",
              "--steps", "4", "--ckpt-every", "2", "--out-dir", str(tmp_path)]
    first = torch_train.main([*common, "--name", "t"])
    run_dir, ck = tmp_path / "t", tmp_path / "t" / "checkpoints"
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # torn
    with pytest.warns(UserWarning, match="torn"):
        res = torch_train.main([*common, "--resume", str(ck / "global_step2")])
    assert res["run_dir"] == run_dir and res["losses"] == first["losses"]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    aside = [p for p in ck.iterdir() if p.name.startswith("abandoned-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["global_step4"]
    assert (ck / "latest").read_text().strip() == "global_step4" and (ck / "global_step4").is_dir()  # new branch
    rows_aside = list(run_dir.glob("metrics.abandoned-*.jsonl"))
    assert len(rows_aside) == 1 and [json.loads(x)["step"] for x in rows_aside[0].read_text().splitlines()] == [3, 4]


@pytest.mark.slow
def test_torch_resume_at_the_last_step_finishes_at_once(tmp_path, capfd):
    from torch_ref import train as torch_train

    common = ["--preset", "tiny", "--wandb", "disabled", "--quiet", "--mesh", "data=1", "--zero", "1",
              "--steps", "2", "--ckpt-every", "2", "--out-dir", str(tmp_path), "--name", "done"]
    first = torch_train.main(common)
    again = torch_train.main([*common, "--resume", "auto"])
    assert again["losses"] == first["losses"] and "nothing to train" in capfd.readouterr().out


# (CLI flags, the switch of its copy, overrides, the master's ZeRO-dim spec with -> without the copy)
COPY_CASES = {
    "hpz": (["--mesh", "data=2,fsdp=4", "--zero", "3", "--parallel.hpz=true", "--dtype", "bf16"],
            "HPZ_COMPUTE_COPY", {"parallel.zero": 3, "parallel.hpz": True}, (("fsdp", "data"), "fsdp")),
    "zero2": (["--mesh", "data=2,fsdp=4", "--zero", "2", "--dtype", "bf16"],
              "ZERO_COMPUTE_COPY", {"parallel.zero": 2}, (("data", "fsdp"), None)),
}


@pytest.mark.parametrize("case", list(COPY_CASES))
def test_bf16_compute_copy_resume_continues_bit_identically(tmp_path, monkeypatch, case):
    """hpZ / ZeRO-2 in bf16 checkpoint the fp32 master and the optimizer state only (the compute copy is derived
    in each step): a resume continues bit for bit. A checkpoint from the layout without the copy (fp32 params
    over fsdp / replicated) restores into the master's sharding with the same values."""
    from jax_impl import sharding

    flags, switch, over, (spec, spec_without) = COPY_CASES[case]
    full = run(tmp_path, "full", *flags, "--steps", "4", "--ckpt-every", "2")
    assert full["params"]["layers"]["wq"].sharding.spec[1] == spec
    res = run(tmp_path, "res", *flags, "--steps", "4", "--resume", str(full["ckpt_dir"] / "2"))
    assert res["start_step"] == 2 and res["losses"] == full["losses"][2:]
    assert leaves_equal(res["params"], full["params"]) and leaves_equal(res["opt_state"], full["opt_state"])

    monkeypatch.setattr(sharding, switch, False)
    old = run(tmp_path, "old", *flags, "--steps", "2", "--ckpt-every", "2")
    assert old["params"]["layers"]["wq"].sharding.spec[1] == spec_without
    monkeypatch.setattr(sharding, switch, True)
    tr = trainer("data=2,fsdp=4", **over, **{"train.dtype": "bf16"})
    r = checkpoint.restore(old["ckpt_dir"], tr)
    assert r.params["layers"]["wq"].sharding.spec[1] == spec
    assert leaves_equal(r.params, old["params"]) and leaves_equal(r.opt_state, old["opt_state"])
