"""The generated DeepSpeed config vs what the study's launcher writes, and the layout planner.

Expected dicts are transcribed by hand from argonne-lcf/Megatron-DeepSpeed ALCF/helpers.sh
``generateDSconfig`` (commit 16e5551d4984bd69f2bfd7c166973de09b9fd3a0) for the given
ZERO_STAGE / MICRO_BATCH / GLOBAL_BATCH / GRAD_ACC_STEPS / PP / DTYPE, with OPT=adamw (no
``optimizer`` section). Our documented deviations (torch_ref/ds_config.py) are applied on top,
explicitly, so a change on either side shows up here.
"""

from __future__ import annotations

import copy

import pytest

from configs import load_config
from torch_ref.ds_config import ds_config, installed_ds_config
from torch_ref.layouts import FSDP2_MICS, deepspeed_has_mics, plan_layout

ALCF_COMMON = {
    "gradient_clipping": 1.0, "steps_per_print": 1, "zero_force_ds_cpu_optimizer": False,
    "zero_allow_untested_optimizer": True, "wall_clock_breakdown": False,
}
ALCF_BF16 = {
    "fp16": {"enabled": False, "loss_scale": 0, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
    "bfloat16": {"enabled": True, "loss_scale": 1.0},
}
ALCF_FP32 = {"communication_data_type": "fp32"}
ALCF_FLOPS = {"flops_profiler": {"enabled": True, "profile_step": 2, "module_depth": -1, "top_modules": 1,
                                 "detailed": True, "output_file": None}}
ALCF_ZERO3 = {
    "stage": 3, "reduce_scatter": False, "mics_hierarchical_params_gather": True,
    "stage3_max_live_parameters": 3e9, "stage3_max_reuse_distance": 3e9, "stage3_param_persistence_threshold": 1e5,
    "stage3_prefetch_bucket_size": 5e7, "contiguous_gradients": True, "overlap_comm": True,
    "reduce_bucket_size": 90000000, "sub_group_size": 1e9,
    "offload_optimizer": {"device": "none", "buffer_count": 4, "pipeline_read": False, "pipeline_write": False,
                          "pin_memory": True},
}
LOGGER_OFF = {"comms_logger": {"enabled": False, "verbose": False, "debug": False}}
LOGGER_PP = {"data_types": {"grad_accum_dtype": "fp32"},
             "comms_logger": {"enabled": True, "verbose": False, "prof_all": True, "debug": False}}
# deviations: fp32 grad accumulation for every bf16 run; no bf16 loss_scale (DeepSpeed 0.19.8 refuses the key)
OURS_BF16 = {"data_types": {"grad_accum_dtype": "fp32"}, "bfloat16": {"enabled": True}}


def batch(gb: int, mb: int, gas: int) -> dict:
    return {"train_batch_size": gb, "train_micro_batch_size_per_gpu": mb, "gradient_accumulation_steps": gas}


CASES = {
    # name: (overrides, ALCF's dict for the same settings, our deviations)
    "zero1-fp32-dp2": (
        {"parallel.mesh": "data=2", "parallel.zero": 1, "parallel.mbs": 2, "train.dtype": "fp32"},
        {**batch(4, 2, 1), **ALCF_COMMON, "zero_optimization": {"stage": 1}, **ALCF_FP32, **LOGGER_OFF, **ALCF_FLOPS},
        {}),
    "zero2-bf16-dp16-gas4": (
        {"parallel.mesh": "data=16", "parallel.zero": 2, "parallel.mbs": 1, "parallel.gas": 4, "train.dtype": "bf16"},
        {**batch(64, 1, 4), **ALCF_COMMON, "zero_optimization": {"stage": 2}, **ALCF_BF16, **LOGGER_OFF, **ALCF_FLOPS},
        OURS_BF16),
    "pp8+zero1-bf16-gas32": (  # the study's Pipeline + ZeRO-1 (TP=1 here), 8 nodes x 12 tiles
        {"parallel.mesh": "pipeline=8,data=12", "parallel.zero": 1, "parallel.mbs": 1, "parallel.gas": 32,
         "train.dtype": "bf16", "model.n_layers": 8},
        {**batch(384, 1, 32), **ALCF_COMMON, "zero_optimization": {"stage": 1}, **ALCF_BF16, **LOGGER_PP,
         **ALCF_FLOPS},
        OURS_BF16),
    "zero3-bf16-fsdp96": (
        {"parallel.mesh": "fsdp=96", "parallel.zero": 3, "parallel.mbs": 1, "train.dtype": "bf16"},
        {**batch(96, 1, 1), **ALCF_COMMON, "zero_optimization": ALCF_ZERO3, **ALCF_BF16, **ALCF_FLOPS},
        OURS_BF16),
    "zero3+hpz-bf16-8x12": (  # study: hpZ partition = 12 tiles per node
        {"parallel.mesh": "data=8,fsdp=12", "parallel.zero": 3, "parallel.hpz": True, "parallel.mbs": 1,
         "train.dtype": "bf16"},
        {**batch(96, 1, 1), **ALCF_COMMON, "zero_optimization": ALCF_ZERO3, **ALCF_BF16, **ALCF_FLOPS},
        {**OURS_BF16, "zero_optimization": {**ALCF_ZERO3, "zero_hpz_partition_size": 12}}),
    "zero3+mics-bf16-8x12": (
        {"parallel.mesh": "data=8,fsdp=12", "parallel.zero": 3, "parallel.mics": True, "parallel.mbs": 1,
         "train.dtype": "bf16"},
        {**batch(96, 1, 1), **ALCF_COMMON, "zero_optimization": ALCF_ZERO3, **ALCF_BF16, **ALCF_FLOPS},
        {**OURS_BF16, "zero_optimization": {**ALCF_ZERO3, "mics_shard_size": 12}}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_ds_config_matches_the_alcf_launcher(name):
    overrides, alcf, deviations = CASES[name]
    cfg = load_config("tiny", overrides)
    want = {**copy.deepcopy(alcf), **copy.deepcopy(deviations)}
    got = ds_config(cfg, mics_keys=True, flops_profiler=True)
    assert got == want
    assert list(got["zero_optimization"]) == list(want["zero_optimization"])  # same key order as ALCF's JSON


def test_default_config_differs_from_alcf_only_where_documented():
    cfg = load_config("tiny", {"parallel.mesh": "data=2,fsdp=2", "parallel.zero": 3, "parallel.hpz": True,
                               "optim.clip": 0.5})
    got = ds_config(cfg, mics_keys=False)
    assert got["flops_profiler"]["enabled"] is False
    assert got["gradient_clipping"] == 0.5
    assert "mics_hierarchical_params_gather" not in got["zero_optimization"]
    assert got["zero_optimization"]["zero_hpz_partition_size"] == 2
    assert got["train_batch_size"] == 2 * 4  # mbs 2 (tiny) x gas 1 x dp 4


def test_installed_config_has_mics_keys_only_where_deepspeed_has_mics():
    cfg = load_config("tiny", {"parallel.mesh": "data=2", "parallel.zero": 3})
    has = "mics_hierarchical_params_gather" in installed_ds_config(cfg)["zero_optimization"]
    assert has == deepspeed_has_mics()


def test_layout_planner_labels():
    assert plan_layout(load_config("tiny", {"parallel.mesh": "data=2", "parallel.zero": 1})).label == "zero1"
    lay = plan_layout(load_config("tiny", {"parallel.mesh": "pipeline=2", "parallel.zero": 1, "parallel.gas": 4}))
    assert (lay.label, lay.engine, lay.world_size) == ("pp2+zero1", "deepspeed-pipe", 2)
    lay = plan_layout(load_config("tiny", {"parallel.mesh": "data=1,fsdp=2", "parallel.zero": 3,
                                           "parallel.mics": True}))
    if not deepspeed_has_mics():
        assert (lay.engine, lay.description) == ("fsdp2-mics", FSDP2_MICS)
    lay = plan_layout(load_config("tiny", {"parallel.mesh": "data=2,fsdp=2,tensor=2", "parallel.zero": 1}))
    assert lay.label == "zero1+tp2" and lay.world_size == 8
    assert [lay.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert lay.coords(5) == {"tensor": 1, "fsdp": 0, "data": 1, "pipeline": 0}
