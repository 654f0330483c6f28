"""torch_ref.train end to end: JAX parity, every layout vs the 1-rank run, bad input, worker crashes.

Each multi-rank case launches real worker processes with the real DeepSpeed engine (gloo, CPU);
~20-30 s each on 2 cores, so only the JAX comparison and the crash test are in the fast tier.
"""

from __future__ import annotations

import json
import time

import pytest
from fault_runner import worker_command

from configs import ConfigError, lr_at
from jax_impl import devices

try:  # the in-process JAX run below needs 2 host devices; tests/conftest.py may already have made 8
    devices.configure("cpu", 8)
except Exception:
    pass

from runtime import hostmem
from torch_ref import train as torch_train
from torch_ref.layouts import FSDP2_MICS, deepspeed_has_mics

RTOL = 1e-5
TINY = ["--preset", "tiny", "--steps", "5", "--wandb", "disabled", "--quiet"]


def run_torch(tmp_path, name: str, *args: str) -> dict:
    return torch_train.main([*TINY, "--out-dir", str(tmp_path), "--name", name, *args])


def assert_losses_close(got: list[float], want: list[float], rtol: float = RTOL) -> None:
    assert len(got) == len(want) == 5
    rel = [abs(g - w) / abs(w) for g, w in zip(got, want, strict=True)]
    assert max(rel) <= rtol, f"per-step relative differences {rel}\n got  {got}\n want {want}"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict:
    """1 rank, global batch 4 as one microbatch of 4 (the same rows as 2 ranks x mbs 2)."""
    return run_torch(tmp_path_factory.mktemp("base"), "base", "--mesh", "data=1", "--zero", "1", "--mbs", "4")


@pytest.fixture(scope="module")
def baseline_gas4(tmp_path_factory) -> dict:
    """1 rank, the same global batch 4 as GAS 4 microbatches of 1 (the pipeline's split)."""
    return run_torch(tmp_path_factory.mktemp("base4"), "base4", "--mesh", "data=1", "--zero", "1", "--mbs", "1",
                     "--gas", "4")


def test_torch_matches_jax_zero1_two_ranks(tmp_path):
    from jax_impl import train as jax_train

    common = [*TINY, "--mesh", "data=2", "--zero", "1", "--out-dir", str(tmp_path)]
    t = torch_train.main([*common, "--name", "torch"])
    j = jax_train.main([*common, "--name", "jax"])
    assert_losses_close(t["losses"], j["losses"])
    jax_rows = [json.loads(line) for line in (j["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    for step, (row, jrow) in enumerate(zip(t["metrics"], jax_rows, strict=True)):
        assert row["lr"] == pytest.approx(lr_at(torch_train.resolve_config(common)[0], step), rel=1e-12)
        assert row["grad_norm"] == pytest.approx(jrow["grad_norm"], rel=1e-4)
        assert row["consumed_samples"] == jrow["consumed_samples"] == 4 * (step + 1)
        assert row["tokens_per_s_per_device"] > 0 and row["peak_mem_bytes"] > 0
    meta = json.loads((t["run_dir"] / "meta.json").read_text())
    assert (meta["framework"], meta["world_size"], meta["layout"], meta["dtype"]) == ("torch", 2, "zero1", "fp32")
    assert meta["deepspeed"] and meta["torch"] and meta["engine_init_s"] > 0
    assert meta["host_allocator"] == hostmem.child_allocator()  # the launcher's
    assert json.loads((t["run_dir"] / "ds_config.json").read_text())["zero_optimization"] == {"stage": 1}
    assert (t["run_dir"] / "init_params.npz").exists()


@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    ("zero1", "--mesh", "data=2", "--zero", "1"),
    ("zero2", "--mesh", "data=2", "--zero", "2"),
    ("zero3", "--mesh", "data=2", "--zero", "3"),
    ("zero3+hpz", "--mesh", "data=1,fsdp=2", "--zero", "3", "--parallel.hpz=true"),
    ("zero1+tp2", "--mesh", "data=1,tensor=2", "--zero", "1", "--mbs", "4"),
    ("zero2+tp2", "--mesh", "data=1,tensor=2", "--zero", "2", "--mbs", "4"),
], ids=lambda a: a[0])
def test_two_ranks_match_one_rank(tmp_path, baseline, layout):
    label, *args = layout
    got = run_torch(tmp_path, label, "--mbs", "2", *args)
    assert_losses_close(got["losses"], baseline["losses"])
    assert [r["grad_norm"] for r in got["metrics"]] == pytest.approx([r["grad_norm"] for r in baseline["metrics"]],
                                                                        rel=1e-4)
    assert json.loads((got["run_dir"] / "meta.json").read_text())["layout"] == label


@pytest.mark.slow
def test_pipeline_two_stages_gas4_matches_no_pipeline(tmp_path, baseline_gas4):
    got = run_torch(tmp_path, "pp", "--mesh", "pipeline=2", "--zero", "1", "--mbs", "1", "--gas", "4")
    assert_losses_close(got["losses"], baseline_gas4["losses"])
    meta = json.loads((got["run_dir"] / "meta.json").read_text())
    assert (meta["layout"], meta["engine"]) == ("pp2+zero1", "deepspeed-pipe")


@pytest.mark.slow
def test_mics_hybrid_shard_four_ranks_matches_one_rank(tmp_path, baseline):
    got = run_torch(tmp_path, "mics", "--mesh", "data=2,fsdp=2", "--zero", "3", "--parallel.mics=true", "--mbs", "1")
    assert_losses_close(got["losses"], baseline["losses"])
    meta = json.loads((got["run_dir"] / "meta.json").read_text())
    assert meta["layout"] == "zero3+mics"
    if not deepspeed_has_mics():
        assert meta["layout_impl"] == FSDP2_MICS and not (got["run_dir"] / "ds_config.json").exists()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args, env, words", [
    (["--mesh", "pipeline=2", "--zero", "2"], {}, ["--zero 2", "pipeline=2", "use --zero 1"]),
    (["--mesh", "pipeline=2", "--zero", "3"], {}, ["--zero 3", "use --zero 1"]),
    (["--mesh", "data=2"], {"RANK": "0", "WORLD_SIZE": "3"}, ["world size 3", "needs 2 ranks", "change --mesh"]),
    (["--mesh", "data=1,tensor=3", "--zero", "1"], {}, ["model.n_heads=4", "tensor axis (3)", "divisors of 4"]),
    (["--mesh", "data=-1"], {}, ["-1", "give every axis a size"]),
    (["--mesh", "data=2", "--zero", "0", "--dtype", "bf16"], {}, ["--zero 0", "use --zero 1"]),
    (["--mesh", "data=2", "--zero", "3", "--parallel.hpz=true"], {}, ["hpz", "fsdp"]),
], ids=["pp+zero2", "pp+zero3", "world-size", "tp-heads", "mesh-wildcard", "bf16-zero0", "hpz-no-fsdp"])
def test_bad_input_exits_2_before_any_worker(tmp_path, monkeypatch, capsys, args, env, words):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        torch_train.main([*TINY, "--out-dir", str(tmp_path), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"
    assert list(tmp_path.iterdir()) == []  # nothing was prepared, so nothing was started


def test_many_local_ranks_are_refused_with_the_numbers_and_the_override(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch_train, "_cpu_count", lambda: 2)
    monkeypatch.setattr(torch_train, "_memory_bytes", lambda: 24 * 10**9)
    with pytest.raises(SystemExit) as e:
        torch_train.main([*TINY, "--out-dir", str(tmp_path), "--mesh", "fsdp=96", "--zero", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert ("--mesh fsdp=96 starts 96 local ranks: 48 ranks per core on 2 cores (limit 4) and at least 48.0 GiB "
            "(0.5 GiB per rank before any model state) on 22.4 GiB of memory") in err
    assert "--oversubscribe" in err and list(tmp_path.iterdir()) == []
    # the limits one at a time; the flag and a launcher-given rank (one process per rank) bypass them
    torch_train.check_local_ranks(8, "fsdp=8", cores=2, memory=64 * 2**30)
    with pytest.raises(ConfigError, match="9 ranks per core on 1 cores"):
        torch_train.check_local_ranks(9, "fsdp=9", cores=1, memory=64 * 2**30)
    with pytest.raises(ConfigError, match=r"at least 4\.0 GiB .* on 2\.0 GiB of memory"):
        torch_train.check_local_ranks(8, "fsdp=8", cores=64, memory=2 * 2**30)
    plan = torch_train.main([*TINY, "--out-dir", str(tmp_path), "--mesh", "fsdp=96", "--zero", "3", "--dry-run"])
    assert plan["layout"].world_size == 96  # a dry run starts nothing: not refused


def test_reused_name_and_unusable_out_dir_are_exit_2_before_any_worker(tmp_path, capsys):
    (tmp_path / "same").mkdir()
    (tmp_path / "same" / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit) as e:
        run_torch(tmp_path, "same", "--mesh", "data=2", "--zero", "1")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"run directory {tmp_path / 'same'} already holds a run" in err and "Traceback" not in err
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SystemExit) as e:
        torch_train.main([*TINY, "--out-dir", str(afile), "--name", "n", "--mesh", "data=2", "--zero", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--out-dir {afile}: cannot make the run directory there" in err and "Traceback" not in err


def test_worker_crash_ends_the_run_with_its_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(torch_train, "WORKER_COMMAND", worker_command("raise=1@2"))  # the workers run the fault
    monkeypatch.setenv("TORCH_REF_PG_TIMEOUT", "600")  # the siblings must be stopped by the launcher, not a timeout
    t = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        run_torch(tmp_path, "crash", "--mesh", "data=2", "--zero", "1")
    msg = str(e.value.code)
    assert "rank 1 of 2 failed first" in msg and "injected fault" in msg and "Traceback" in msg
    assert time.perf_counter() - t < 240  # rank 0 waits in a collective: only the launcher can end it


def test_parser_accepts_every_jax_flag():
    from jax_impl.train import build_parser as jax_parser

    ours = {s for a in torch_train.build_parser()._actions for s in a.option_strings}
    theirs = {s for a in jax_parser()._actions for s in a.option_strings}
    assert theirs <= ours, theirs - ours
