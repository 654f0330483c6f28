"""The planner's modelling constants (``Assumptions``, overridden with ``--assume.NAME=VALUE``) and units."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from configs import ConfigError

GB = 1e9


SEQ = 4096  # the study's real sequence length (see compare/data/aurora_reference_runs.csv)


@dataclass
class Assumptions:
    """Every modelling constant, named and printed; override with ``--assume.NAME=VALUE``.

    Those in ``FITTED`` are fitted to the reference runs unless ``--no-fit``; the rest are set by hand.
    """

    eta: float = 0.35  # fitted: achieved fraction of peak bf16 FLOPS in compute
    comm_eff: float = 0.3  # fitted: achieved fraction of the nominal network (inter-node) bandwidth
    link_eff: float = 0.3  # fitted: achieved fraction of the nominal intra-node link bandwidths
    overlap: float = 0.8  # fitted: fraction of overlappable collectives (ZeRO-3 prefetch/bucketing) hidden
    step_eff: float = 0.05  # fitted: achieved fraction of the bandwidth at ZeRO-3's step boundary (per-rank share)
    cold_first_microbatch: bool = True  # ZeRO-3 prefetch trace is rebuilt each step: 1st forward all-gather exposed
    flash_attention: bool = True  # no s x s score matrix kept (the study's runs fit only with it)
    bwd_ws_factor: float = 2.0  # backward of one layer holds its activations and their gradients
    logits_bytes: float = 10.0  # per logit element: bf16 logits + fp32 softmax copy + fp32 grad
    runtime_gb: float = 2.0  # framework context: Level Zero/CUDA, oneCCL/NCCL, kernels
    frag_frac: float = 0.05  # caching-allocator fragmentation on top of the dynamic terms
    opt_bytes_per_param: float = 34.0  # memory traffic of one fused AdamW update per fp32 param (+ bf16 copy)
    max_gbs: int = 1024  # ranking: largest global batch considered (Llama-2: ~4M tokens at seq 4096)
    # memory model error, per kind of term: the largest error of the modelled change in memory against real
    # DeepSpeed runs on CPU (benchmarks/ds_memory_check.py, docs/planner.md): model states and buckets (ZeRO-1/2/3
    # cases), activations (the pipeline GAS case). A verdict whose margin is within the error is uncertain.
    mem_err_states: float = 0.15
    mem_err_act: float = 0.33
    # JAX: XLA's compiled peak against the measured peak RSS of the same step on CPU (tests/test_plan.py, slow tier)
    mem_err_jax: float = 0.10

    FITTED = ("eta", "comm_eff", "link_eff", "overlap", "step_eff")


def apply_assumptions(a: Assumptions, overrides: dict[str, str]) -> Assumptions:
    hints = {f.name: f.type for f in dataclasses.fields(a)}
    for k, v in overrides.items():
        if k not in hints:
            raise ConfigError(f"unknown assumption {k!r}; known: {', '.join(hints)}")
        typ = {"float": float, "int": int, "bool": bool}[str(hints[k])]
        if typ is bool:
            val: Any = str(v).lower() in ("1", "true", "yes", "on")
        else:
            try:
                val = typ(v)
            except ValueError:
                raise ConfigError(f"--assume.{k}={v!r} is not a valid {typ.__name__}") from None
        setattr(a, k, val)
    return a
