"""Choosing a layout at the user's global batch (compare.plan.choose) and ``--mesh auto`` in both trainers."""

from __future__ import annotations

import pytest

from compare import plan
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
    ranked = plan._ranked(plan.plan(plan.register_config(cfg), 8, plan.load_cluster("aurora"),
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
