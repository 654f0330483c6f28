"""The DeepSpeed config, generated from our Config by one pure function (never hand-written JSON).

It follows the study's launcher, argonne-lcf/Megatron-DeepSpeed ``ALCF/helpers.sh``
``generateDSconfig`` (read at commit 16e5551d4984bd69f2bfd7c166973de09b9fd3a0): the same
``common`` block, the same ZeRO-3 block, the same bf16/fp32 blocks, no ``optimizer`` section
(OPT=adamw: the client optimizer is used), and for ZeRO-1/2 the same ``comms_logger`` /
``data_types`` extras. Where we differ, on purpose:

* ``gradient_clipping`` comes from ``optim.clip`` (ALCF hard-codes 1.0, which is our default).
* ``bfloat16`` has no ``loss_scale: 1.0``: DeepSpeed 0.19.8's bf16 config model forbids extra keys
  and refuses it (bf16 needs no loss scaling, so the value was a no-op in ALCF's runs).
* ``flops_profiler.enabled`` is false unless asked for: profiling a step distorts its timing.
* bf16 always sets ``data_types.grad_accum_dtype = "fp32"`` (ALCF does so only with PP > 1 and
  passes ``--accumulate-allreduce-grads-in-fp32`` to Megatron otherwise); with ZeRO-1 this
  selects DeepSpeed's BF16_Optimizer: fp32 master weights and fp32 gradient accumulation.
* ``zero_hpz_partition_size`` (hpZ) and ``mics_shard_size`` (MiCS) are the study's additions
  (its README: hpZ partition 12 = tiles per node; MiCS shard groups); ALCF's script leaves
  ``mics_shard_size`` commented out. Both are set from the mesh's ``fsdp`` axis.
* The MiCS keys (ALCF's ``mics_hierarchical_params_gather`` included) are emitted only with
  ``mics_keys=True``: DeepSpeed 0.19.7+ removed MiCS and *rejects* any config naming them, so
  the trainer passes ``mics_keys=deepspeed_has_mics()`` (see ``installed_ds_config``).
"""

from __future__ import annotations

from typing import Any

from configs import Config


def ds_config(cfg: Config, *, mics_keys: bool = True, flops_profiler: bool = False) -> dict[str, Any]:
    """DeepSpeed config dict for ``cfg`` (mesh, ZeRO stage, hpZ/MiCS, mbs/gas, dtype, clip); a pure function."""
    p, lay = cfg.parallel, cfg.layout()
    conf: dict[str, Any] = {
        "train_batch_size": p.mbs * p.gas * lay.dp,
        "train_micro_batch_size_per_gpu": p.mbs,
        "gradient_clipping": cfg.optim.clip,
        "steps_per_print": 1,
        "gradient_accumulation_steps": p.gas,
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }
    if p.zero == 3:
        zero: dict[str, Any] = {
            "stage": 3,
            "reduce_scatter": False,
            "stage3_max_live_parameters": 3e9,
            "stage3_max_reuse_distance": 3e9,
            "stage3_param_persistence_threshold": 1e5,
            "stage3_prefetch_bucket_size": 5e7,
            "contiguous_gradients": True,
            "overlap_comm": True,
            "reduce_bucket_size": 90000000,
            "sub_group_size": 1e9,
            "offload_optimizer": {"device": "none", "buffer_count": 4, "pipeline_read": False,
                                  "pipeline_write": False, "pin_memory": True},
        }
        if mics_keys:  # ALCF's key order: right after reduce_scatter
            zero = {"stage": 3, "reduce_scatter": False, "mics_hierarchical_params_gather": True,
                    **{k: v for k, v in zero.items() if k not in ("stage", "reduce_scatter")}}
        if p.hpz:
            zero["zero_hpz_partition_size"] = lay.fsdp
        if p.mics and mics_keys:
            zero["mics_shard_size"] = lay.fsdp
    else:
        zero = {"stage": p.zero}
    conf["zero_optimization"] = zero
    if cfg.train.dtype == "bf16":
        conf["fp16"] = {"enabled": False, "loss_scale": 0, "loss_scale_window": 1000, "hysteresis": 2,
                        "min_loss_scale": 1}
        conf["bfloat16"] = {"enabled": True}
        conf["data_types"] = {"grad_accum_dtype": "fp32"}
    else:
        conf["communication_data_type"] = "fp32"
    if p.zero in (1, 2):
        if lay.pipeline > 1:
            conf["data_types"] = {"grad_accum_dtype": "fp32"}
            conf["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}
        else:
            conf["comms_logger"] = {"enabled": False, "verbose": False, "debug": False}
    conf["flops_profiler"] = {"enabled": flops_profiler, "profile_step": 2, "module_depth": -1, "top_modules": 1,
                              "detailed": True, "output_file": None}
    return conf


def installed_ds_config(cfg: Config) -> dict[str, Any]:
    """``ds_config`` for the DeepSpeed installed here (MiCS keys only where it still has MiCS)."""
    from torch_ref.layouts import deepspeed_has_mics

    return ds_config(cfg, mics_keys=deepspeed_has_mics())
