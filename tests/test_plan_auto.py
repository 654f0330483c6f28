"""Choosing a layout at the user's global batch (compare.plan.choose) and ``--mesh auto`` in both trainers."""

from __future__ import annotations

import pytest

from compare import plan
from compare.cluster import load_cluster
from compare.plan import choice
from configs import ConfigError, load_config


def _cfg(preset: str, **over):
    return load_config(preset, over, validate=False)  # --mesh auto: the preset's own mesh/gbs do not constrain


def test_choose_is_deterministic_and_records_why():
    cfg = _cfg("llama2-70b", **{"parallel.gbs": 96})
    d = plan.choose(cfg, nodes=8, framework="torch")
    again = plan.choose(cfg, nodes=8, framework="torch")
    assert d.to_dict() == again.to_dict()
    assert d.pick.gbs == 96 and d.config.parallel.gbs == 96 and d.config.parallel.mesh == d.pick.mesh
    rec = d.to_dict()
    assert rec["inputs"]["gbs"] == 96 and rec["inputs"]["seq"] == 4096 and rec["inputs"]["nodes"] == 8
    assert rec["inputs"]["cluster"]["name"] == "aurora" and "fitted to the study" in rec["cluster_source"]
    assert rec["pick"]["layout"] == d.pick.label and rec["runner_up"] and rec["candidates"] and rec["why"]
    assert all(c["gbs"] == 96 for c in rec["candidates"])
    assert rec["runner_up"]["layout"] != rec["pick"]["layout"]
    text = "\n".join(d.lines())
    assert "pick" in text and "runner-up" in text and "samples/s" in text and "memory margin" in text


def test_uncertain_is_not_picked_over_a_clear_fit():
    """At GBS 96 on 8 nodes the fastest PP+TP layouts are within the DeepSpeed model's error (JAX may run them;
    torch_ref may not): a clear fit wins."""
    cfg = _cfg("llama2-70b", **{"parallel.gbs": 96})
    d = plan.choose(cfg, nodes=8, framework="torch")
    assert d.pick_info["ds_verdict"] == "fits"
    ranked = choice._ranked(plan.plan(plan.register_config(cfg), 8, load_cluster("aurora"),
                                    plan.Assumptions(**d.inputs["assumptions"]), gbs=96))
    unsure = [p for p in ranked if p.uncertain]
    assert unsure and max(p.step.sps for p in unsure) > d.pick_info["sps"]  # a faster, uncertain one existed
    assert ranked.index(unsure[0]) > max(i for i, p in enumerate(ranked) if not p.uncertain)


def test_choose_torch_only_layouts_torch_ref_runs():
    d = plan.choose(_cfg("llama2-70b", **{"parallel.gbs": 96}), nodes=8, framework="torch")
    for c in d.to_dict()["candidates"]:
        assert not ("pipeline=" in c["layout"] and "tensor=" in c["layout"])  # torch_ref: TP or PP, not both


def test_nothing_fits_names_the_smallest_node_count():
    with pytest.raises(plan.NothingFits, match=r"no layout fits llama2-70b at GBS 96, seq 4096 on 1 x aurora "
                                               r"nodes.*smallest node count that fits at this GBS and seq is 4"):
        plan.choose(_cfg("llama2-70b", **{"parallel.gbs": 96}), nodes=1, framework="torch")


def test_choose_needs_a_global_batch():
    with pytest.raises(ConfigError, match=r"--mesh auto needs the global batch: parallel.gbs=0; set --parallel.gbs"):
        plan.choose(_cfg("small"), devices=8, framework="torch")
    with pytest.raises(ConfigError, match=r"parallel.gbs 7: no data-parallel width .* nearest global batches"):
        plan.choose(_cfg("small", **{"parallel.gbs": 7, "model.n_heads": 8}), devices=6, framework="torch")


def test_host_description_is_named():
    d = plan.choose(_cfg("small", **{"parallel.gbs": 16}), devices=8, framework="torch")
    assert d.inputs["nodes"] is None and d.inputs["devices"] == 8
    assert "a description of this host" in d.cluster_source and "assumed figures" in d.cluster_source
    assert d.pick.ngpu == 8 and d.pick.gbs == 16


def _fake_jax(peak, calls: list | None = None):
    """A stand-in for ``jax_memory``: ``peak(layout)`` bytes, no compile."""
    def fake(model, lay, seq, cache=None, **_):
        if calls is not None:
            calls.append(lay)
        b = float(peak(lay))
        return {"ok": True, "peak_bytes": b, "memory": {"argument": b / 2, "temp": b / 2}, "cached": False}
    return fake


def _all_oom(model, lay, cluster, a, seq=4096):
    return plan.MemoryEstimate(stage=lay.zero, terms=[plan.Term("everything", 1e15)], usable=cluster.usable_bytes)


def test_choose_jax_probes_layouts_deepspeed_does_not_run(monkeypatch):
    """The DeepSpeed model prunes only the layouts DeepSpeed runs: with it calling everything OOM, the JAX-only
    ones (ZeRO-3 x tensor) still reach the probe, fastest first, and JAX's peak picks one."""
    from compare.plan import rank

    calls: list = []
    monkeypatch.setattr(rank, "ds_memory", _all_oom)
    monkeypatch.setattr(choice, "jax_memory", _fake_jax(lambda lay: 20e9, calls))
    d = plan.choose(_cfg("llama2-70b", **{"parallel.gbs": 48}), nodes=8, framework="jax")
    assert calls and all(lay.zero == 3 and lay.tp > 1 for lay in calls)  # nothing DeepSpeed runs: pruned
    assert d.pick.zero == 3 and d.pick.tp > 1 and d.pick in calls
    info = d.to_dict()["pick"]
    assert info["ds_mem_gb"] is None and info["ds_verdict"].startswith("not run by DeepSpeed: tensor=")
    assert info["runs_on"] == ["jax"] and info["jax_verdict"] == "fits" and info["memory"] == "JAX fits"
    assert "DeepSpeed does not run" in d.why
    assert d.pick.label in "\n".join(d.lines())


def test_choose_torch_and_jax_without_jax_only_layouts(monkeypatch):
    """torch: never a layout torch_ref refuses; jax: a layout DeepSpeed runs keeps its DeepSpeed figure beside
    JAX's."""
    monkeypatch.setattr(choice, "jax_memory", _fake_jax(lambda lay: 20e9))
    d = plan.choose(_cfg("llama2-70b", **{"parallel.gbs": 96}), nodes=8, framework="jax")
    assert d.pick_info["ds_mem_gb"] and "deepspeed" in d.pick_info["runs_on"]
    t = plan.choose(_cfg("llama2-70b", **{"parallel.gbs": 48}), nodes=8, framework="torch")
    assert all("torch_ref" in c["runs_on"] for c in t.candidates)


def test_nothing_fits_hints_cite_no_deepspeed_figure_for_jax_only_layouts(monkeypatch):
    """Nothing fits (the DeepSpeed model and JAX both say OOM): the hint is the DeepSpeed model's, so it counts
    only layouts DeepSpeed runs; a JAX-only layout, with no DeepSpeed figure, is never the GBS it names."""
    from compare.plan import rank

    monkeypatch.setattr(rank, "ds_memory", _all_oom)
    calls: list = []
    monkeypatch.setattr(choice, "jax_memory", _fake_jax(lambda lay: 1e15, calls))
    with pytest.raises(plan.NothingFits) as e:
        plan.choose(_cfg("small", **{"parallel.gbs": 16}), devices=8, framework="jax")
    assert calls and all(lay.tp > 1 and lay.zero == 3 for lay in calls)
    assert "JAX OOM" in str(e.value) and "no global batch fits there" in str(e.value)


# ----------------------------------------------------------------------------- --mesh auto in the trainers
SMALL = ["--preset", "small", "--mesh", "auto", "--parallel.gbs=8", "--model.n_layers=2", "--data.seq_len=32",
         "--wandb", "disabled", "--quiet"]


def _meta(run_dir):
    import json

    return json.loads((run_dir / "meta.json").read_text()), json.loads((run_dir / "config.json").read_text())


def test_jax_mesh_auto_trains_records_and_resumes_without_replanning(tmp_path, monkeypatch, capsys):
    from jax_impl import train as jax_train

    monkeypatch.setenv("AURORAGPT_PLAN_CACHE", str(tmp_path / "cache"))
    jax_train.main([*SMALL, "--steps", "2", "--ckpt-every", "2", "--out-dir", str(tmp_path), "--name", "r"])
    out = capsys.readouterr().out
    assert "--mesh auto: 8 fake CPU devices" in out and "a description of this host" in out
    assert "  pick " in out and "  runner-up " in out and "samples/s predicted, memory margin" in out
    meta, conf = _meta(tmp_path / "r")
    dec = meta["layout_decision"]
    assert dec["inputs"]["gbs"] == 8 and dec["inputs"]["devices"] == 8 and dec["why"] and dec["candidates"]
    assert dec["pick"]["jax_verdict"] in ("fits", "uncertain") and "JAX AOT" in dec["memory_source"]
    par = conf["config"]["parallel"]
    assert par["mesh"] == dec["parallel"]["mesh"] and par["gbs"] == 8
    assert par["mbs"] * par["gas"] * meta["mesh"]["data"] * meta["mesh"]["fsdp"] == 8

    def no_replan(*a, **k):
        raise AssertionError("a resumed --mesh auto run re-planned")

    monkeypatch.setattr(choice, "choose", no_replan)  # where auto_layout looks it up
    jax_train.main([*SMALL, "--steps", "4", "--out-dir", str(tmp_path), "--resume", str(tmp_path / "r")])
    assert "resuming with the run's recorded layout" in capsys.readouterr().out
    meta2, conf2 = _meta(tmp_path / "r")
    assert conf2["config"]["parallel"] == par and meta2["mesh"] == meta["mesh"]
    assert meta2["layout_decision"]["reused_on_resume"] and meta2["layout_decision"]["pick"] == dec["pick"]


def test_jax_mesh_auto_nothing_fits_exits_before_allocating(capsys, monkeypatch):
    from jax_impl import train as jax_train

    # the layouts DeepSpeed does not run (ZeRO-3 x tensor) reach the JAX probe: a 70B on one node is far over
    # (about 70 to 270 GB per tile when compiled), so a fake OOM result spares nine compiles
    monkeypatch.setattr(choice, "jax_memory", _fake_jax(lambda lay: 500e9))
    with pytest.raises(SystemExit) as e:
        jax_train.main(["--preset", "llama2-70b", "--nodes", "1", "--mesh", "auto", "--parallel.gbs=96",
                        "--dry-run"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no layout fits llama2-70b at GBS 96, seq 4096 on 1 x aurora nodes" in err
    assert "smallest node count that fits at this GBS and seq is 4" in err and "Traceback" not in err


@pytest.mark.parametrize(("argv", "match"), [
    (["--preset", "small", "--mesh", "auto"], "--mesh auto needs the global batch"),
    (["--preset", "small", "--mesh", "auto", "--parallel.gbs=8", "--zero", "3"], "drop --zero"),
    (["--preset", "small", "--mesh", "fsdp=8", "--nodes", "2"], "add --mesh auto"),
])
def test_mesh_auto_bad_input(argv, match, capsys):
    from jax_impl import train as jax_train

    with pytest.raises(SystemExit) as e:
        jax_train.main([*argv, "--dry-run"])
    assert e.value.code == 2 and match in capsys.readouterr().err


@pytest.mark.slow
def test_torch_mesh_auto_trains_records_and_resumes_without_replanning(tmp_path, monkeypatch, capsys):
    """8 CPU ranks under DeepSpeed (about a minute a run): the DeepSpeed model's pick among torch_ref's layouts."""
    from torch_ref import train as torch_train

    torch_train.main([*SMALL, "--steps", "2", "--ckpt-every", "2", "--out-dir", str(tmp_path), "--name", "t"])
    out = capsys.readouterr().out
    assert "--mesh auto: 8 ranks" in out and "  pick " in out and "DeepSpeed memory model" in out
    meta, conf = _meta(tmp_path / "t")
    dec = meta["layout_decision"]
    assert dec["inputs"]["framework"] == "torch" and dec["pick"]["ds_verdict"] == "fits"
    assert conf["config"]["parallel"]["mesh"] == dec["parallel"]["mesh"] and meta["gbs"] == 8

    def no_replan(*a, **k):
        raise AssertionError("a resumed --mesh auto run re-planned")

    monkeypatch.setattr(choice, "choose", no_replan)  # where auto_layout looks it up
    torch_train.main([*SMALL, "--steps", "4", "--out-dir", str(tmp_path), "--resume", str(tmp_path / "t")])
    assert "resuming with the run's recorded layout" in capsys.readouterr().out
    meta2, conf2 = _meta(tmp_path / "t")
    assert conf2["config"]["parallel"] == conf["config"]["parallel"] and meta2["mesh"] == meta["mesh"]
    assert meta2["layout_decision"]["reused_on_resume"]


def test_torch_mesh_auto_dry_run_and_nothing_fits(capsys):
    from torch_ref import train as torch_train

    res = torch_train.main(["--preset", "llama2-70b", "--nodes", "8", "--mesh", "auto", "--parallel.gbs=96",
                            "--dry-run"])
    out = capsys.readouterr().out
    assert res["layout"].world_size == 96 and "  pick " in out and "  runner-up " in out
    assert not (res["layout"].mesh["pipeline"] > 1 and res["layout"].mesh["tensor"] > 1)  # torch_ref: not both
    with pytest.raises(SystemExit) as e:
        torch_train.main(["--preset", "llama2-70b", "--nodes", "1", "--mesh", "auto", "--parallel.gbs=96",
                          "--dry-run"])
    assert e.value.code == 2 and "smallest node count that fits at this GBS and seq is 4" in capsys.readouterr().err


def test_recorded_layout_is_reused_and_its_batch_kept():
    cfg = _cfg("small", **{"parallel.gbs": 8})
    rec = {"parallel": {"mesh": "data=2,fsdp=4", "zero": 3, "mbs": 2, "gas": 2, "gbs": 8}, "decision": {"why": "w"}}
    out, d, lines = plan.auto_layout(cfg, framework="jax", recorded=rec)
    assert out.parallel.mesh == "data=2,fsdp=4" and out.parallel.gas == 2 and d["reused_on_resume"] and d["why"] == "w"
    assert "not re-planned" in lines[0]
    with pytest.raises(ConfigError, match="planned at GBS 8; a resume keeps its layout and batch"):
        plan.auto_layout(_cfg("small", **{"parallel.gbs": 16}), framework="jax", recorded=rec)


def test_plan_single_mesh_at_a_gbs_derives_gas(tmp_path, capsys):
    import json

    assert plan.main(["--nodes", "8", "--mesh", "pipeline=8,data=6,tensor=2", "--zero", "1", "--gbs", "96",
                      "--no-fit", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "plan_llama2-70b_8n_aurora_gbs96.json").read_text())
    assert [r["variant"] for r in out["ranked"] + out["uncertain"]] == ["mbs 1 gas 16"]
    assert plan.main(["--nodes", "8", "--mesh", "pipeline=8,data=6,tensor=2", "--zero", "1", "--gbs", "99",
                      "--no-fit", "--out", str(tmp_path)]) == 2
    assert "--gbs 99 is not a multiple of mbs x dp = 1 x 6 = 6" in capsys.readouterr().err


def test_visible_devices_that_are_not_whole_nodes_plan_as_one_node():
    """One GPU under the h100-node description: the cluster's per-device figures, one node of one device."""
    d = plan.choose(_cfg("small", **{"parallel.gbs": 8}), devices=1, cluster=load_cluster("h100-node"),
                    framework="torch")
    assert d.pick.ngpu == 1 and d.pick.gbs == 8 and d.inputs["cluster"]["tiles_per_node"] == 1
    assert d.inputs["cluster"]["mem_gb"] == 80.0 and "for the 1 visible devices" in d.cluster_source


def test_trainers_import_the_planner_only_for_mesh_auto():
    """Importing a trainer loads no compare module (``auto_layout`` is imported inside the function that needs it);
    importing the planner loads neither framework (the JAX probe and DeepSpeed's buckets import them lazily)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, {mods}; print(sorted({{m.split('.')[0] for m in sys.modules if m.split('.')[0] in "
            "{{'compare', 'jax', 'jax_impl', 'torch', 'torch_ref', 'deepspeed'}}}}))")
    root = Path(__file__).resolve().parents[1]

    def loaded(mods: str) -> str:
        r = subprocess.run([sys.executable, "-c", code.format(mods=mods)], capture_output=True, text=True, cwd=root,
                           check=True)
        return r.stdout.strip()

    assert loaded("jax_impl.train, torch_ref.train") == "['jax_impl', 'torch_ref']"
    assert loaded("compare.plan") == "['compare']"
