"""Layout planner: which parallel layouts fit in memory, and which is fastest, before a job is queued.

    python -m compare.plan --model llama2-70b --nodes 8 [--jax] [--cluster h100-node] [--cluster.mem_gb=80]
    python -m compare.plan --model llama2-70b --nodes 8 --mesh pipeline=8,data=6,tensor=2 --zero 1 --gas 32
    python -m compare.plan --model llama2-70b --nodes 16 --gbs 768 [--seq 4096]   # only layouts running GBS 768
    python -m compare.plan --validate          # every reference row: predicted vs measured; ranking check

``choose(cfg, nodes=, cluster=, framework=, devices=)`` is the same ranking as an API: the layout a trainer's
``--mesh auto`` runs (the pick, the runner-up, what was weighed and why).

Two memory figures per tile:

* DeepSpeed (modelled): the reference's bf16 params/grads, fp32 master weights + Adam moments split
  per ZeRO stage, hpZ/MiCS copies, pipeline activations in flight by schedule (DeepSpeed's 1F1B), the
  recompute working set, logits, communication buckets from ``torch_ref.ds_config``, plus runtime/allocator
  overhead; every term printed, every verdict with the model's error (docs/planner.md).
* JAX (``--jax``): XLA's ``memory_analysis()`` of the AOT-compiled train step on fake CPU devices, one
  subprocess per layout, cached as JSON by config hash. It is the *CPU* compiler's buffer assignment,
  not the Intel GPU compiler's; JAX keeps fp32 params (bf16 compute), unlike DeepSpeed's bf16 params.

Step time = compute (FLOPs incl. recompute / (peak x eta)) + collectives (sized per layout, costed on
the link they cross) not hidden by overlap, with the pipeline's (m + p - 1) schedule, + per-step collectives
(ZeRO-3's partition exchange falls as 1/DP). ``Assumptions.FITTED`` are fitted to the reference CSV (least
squares on log samples/s).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compare.cluster import Cluster, load_cluster
from compare.reference import DEFAULT_REFERENCE, Row, load_reference
from configs import Config, ConfigError, ModelConfig, ParallelConfig, load_config, validate_config

DEFAULT_OUT = Path("reports") / "plan"
GB = 1e9
SEQ = 4096  # the study's real sequence length (see compare/data/aurora_reference_runs.csv)
GAS_CHOICES = (1, 2, 4, 8, 16, 32)
MBS_CHOICES = (1, 2)
# DeepSpeed's documented defaults, used where the generated config leaves a key out (ZeRO-1/2).
DS_DEFAULT_REDUCE_BUCKET = 5e8
DS_DEFAULT_ALLGATHER_BUCKET = 5e8
JAX_WORKER_VERSION = 3  # bump to invalidate cached compile results (and whenever the step's memory changes)


# =============================================================================== assumptions
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


# =============================================================================== layouts
@dataclass(frozen=True)
class Layout:
    """One parallel layout on the mesh (pipeline, data, fsdp, tensor), tensor innermost."""

    family: str
    pp: int = 1
    data: int = 1
    fsdp: int = 1
    tp: int = 1
    zero: int = 1
    hpz: bool = False
    mics: bool = False
    mbs: int = 1
    gas: int = 1
    remat: bool = True
    schedule: str = "1f1b"  # pipeline schedule: 1f1b (DeepSpeed's TrainSchedule) | gpipe (JAX's other choice)
    jax_remat_policy: str = ""  # JAX only: this remat policy instead of the one jax_config derives from remat

    @property
    def dp(self) -> int:
        return self.data * self.fsdp

    @property
    def ngpu(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def gbs(self) -> int:
        return self.mbs * self.gas * self.dp

    @property
    def mesh(self) -> str:
        parts = [f"{k}={v}" for k, v in (("pipeline", self.pp), ("data", self.data), ("fsdp", self.fsdp),
                                          ("tensor", self.tp)) if v > 1]
        return ",".join(parts) or "data=1"

    @property
    def label(self) -> str:
        z = f"ZeRO-{self.zero}" + ("+hpZ" if self.hpz else "") + (" MiCS" if self.mics else "")
        return f"{self.mesh} {z}"

    @property
    def variant(self) -> str:
        return (f"mbs {self.mbs} gas {self.gas}" + ("" if self.remat else " no-ckpt")
                + (f" {self.schedule}" if self.pp > 1 and self.schedule != "1f1b" else "")
                + (f" (JAX {self.jax_remat_policy})" if self.jax_remat_policy else ""))

    def config(self, model: str, seq: int = SEQ) -> Config:
        """The project Config of this layout (validated by the caller)."""
        base = _preset(model)  # load_config is slow (type-hint checks); the planner builds thousands of these
        par = dataclasses.replace(base.parallel, mesh=self.mesh, zero=self.zero, hpz=self.hpz, mics=self.mics,
                                  mbs=self.mbs, gas=self.gas, gbs=0, remat=self.remat)
        # a preset is planned as the study ran it (bf16); a registered run config keeps its own dtype
        dtype = base.train.dtype if model in _CONFIGS else "bf16"
        return dataclasses.replace(base, parallel=par, data=dataclasses.replace(base.data, seq_len=seq),
                                   train=dataclasses.replace(base.train, dtype=dtype))

    def apply(self, cfg: Config, framework: str = "jax") -> Config:
        """``cfg`` with this layout's parallel settings, as ``framework`` runs them (JAX: ``jax_parallel``)."""
        par = dataclasses.replace(cfg.parallel, mesh=self.mesh, zero=self.zero, hpz=self.hpz, mics=self.mics,
                                  mbs=self.mbs, gas=self.gas, gbs=self.gbs, remat=self.remat)
        return dataclasses.replace(cfg, parallel=self.jax_parallel(par) if framework == "jax" else par)

    def jax_parallel(self, par: ParallelConfig) -> ParallelConfig:
        """``par`` as JAX runs this layout to match DeepSpeed: pipelines as 1F1B (DeepSpeed's PipelineEngine
        schedule) where GAS >= stages, else GPipe (JAX's 1F1B needs a microbatch per stage); no activation
        checkpointing as the ``save_matmuls`` policy (no matmul recomputed; JAX's attention is chunked, so its
        scores are recomputed either way; docs/memory.md), or ``jax_remat_policy`` where set."""
        one_f = self.pp > 1 and self.gas >= self.pp and self.schedule == "1f1b"
        par = dataclasses.replace(par, pipeline_schedule="1f1b" if one_f else "gpipe")
        if not self.remat or self.jax_remat_policy:
            par = dataclasses.replace(par, remat=True, remat_policy=self.jax_remat_policy or "save_matmuls")
        return par

    def jax_config(self, model: str, seq: int = SEQ) -> Config:
        """The JAX run of this layout that matches what DeepSpeed runs (``jax_parallel``): what the AOT probe
        compiles, and what ``apply`` hands a ``--mesh auto`` trainer."""
        cfg = self.config(model, seq)
        return dataclasses.replace(cfg, parallel=self.jax_parallel(cfg.parallel))


_CONFIGS: dict[str, Config] = {}  # run configs planned under a name (a preset with the user's overrides)


def register_config(cfg: Config) -> str:
    """A planner model name for ``cfg`` (every planner function takes a preset name): ``<model>@<config hash>``."""
    name = f"{cfg.model.name}@{cfg.hash()}"
    _CONFIGS[name] = cfg
    return name


@functools.cache
def _preset(model: str) -> Config:
    return _CONFIGS[model] if model in _CONFIGS else load_config(model, validate=False)


def layout_from_row(row: Row, tiles_per_node: int = 12, mics_shard: int | None = None) -> Layout:
    """The layout a reference row ran: hpZ/MiCS groups become a data x fsdp mesh (fsdp = the group).

    A MiCS row whose shard size is unrecorded gets ``mics_shard`` (default: one node); ``mics_fits`` says
    which sizes would fit."""
    group = 1
    if row.zero == 3 and row.mics_shard is None:  # MiCS on, size unrecorded
        group, mics, hpz = mics_shard or tiles_per_node, True, False
    elif row.zero == 3 and (row.mics_shard or 0) > 0:
        group, mics, hpz = row.mics_shard or 1, True, False
    elif row.zero == 3 and (row.hpz or 1) > 1:
        group, mics, hpz = row.hpz or 1, False, True
    else:
        mics = hpz = False
    if row.zero == 3 and group == 1:
        data, fsdp = 1, row.dp
    elif group > 1:
        data, fsdp = row.dp // group, group
    else:
        data, fsdp = row.dp, 1
    fam = ("PP+ZeRO-1" if row.pp > 1 else "ZeRO-3+hpZ" if hpz else "ZeRO-3 MiCS" if mics
           else f"TP+ZeRO-{row.zero}" if row.tp > 1 else f"ZeRO-{row.zero}")
    return Layout(fam, pp=row.pp, data=data, fsdp=fsdp, tp=row.tp, zero=row.zero, hpz=hpz, mics=mics,
                  mbs=row.mbs, gas=row.gas, remat=row.ackpt)


# =============================================================================== groups and links
@dataclass(frozen=True)
class Group:
    """A communicator: ``n`` ranks over ``k`` nodes, ``g`` per node; ``link`` of the intra-node part."""

    axes: tuple[str, ...]
    n: int
    k: int
    g: int
    link: str  # package | node (which intra-node link the g local members use)

    @property
    def where(self) -> str:
        if self.n == 1:
            return "-"
        return f"{self.link}" if self.k == 1 else f"{self.k} nodes x {self.g} ({self.link})"


def group_of(layout: Layout, axes: tuple[str, ...], cluster: Cluster) -> Group:
    """The group of rank 0 along ``axes`` (ranks laid out pipeline, data, fsdp, tensor; tensor innermost)."""
    sizes = {"pipeline": layout.pp, "data": layout.data, "fsdp": layout.fsdp, "tensor": layout.tp}
    order = ("pipeline", "data", "fsdp", "tensor")
    strides, s = {}, 1
    for a in reversed(order):
        strides[a] = s
        s *= sizes[a]
    ranks = [0]
    for a in axes:
        ranks = [r + i * strides[a] for r in ranks for i in range(sizes[a])]
    nodes = {r // cluster.tiles_per_node for r in ranks}
    pkgs = {r // cluster.tiles_per_gpu for r in ranks}
    k = len(nodes)
    g = len(ranks) // k
    return Group(axes, len(ranks), k, g, "package" if len(pkgs) == k else "node")


# =============================================================================== memory model
@dataclass
class Term:
    name: str
    value: float  # bytes or seconds
    note: str = ""


@dataclass
class MemoryEstimate:
    stage: int
    terms: list[Term]
    usable: float
    err_bytes: float = 0.0  # the model's error (Assumptions.mem_err_states / mem_err_act applied to the terms)

    @property
    def total(self) -> float:
        return sum(t.value for t in self.terms)

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    @property
    def margin(self) -> float:
        """usable - total: positive = room left, negative = over."""
        return self.usable - self.total

    @property
    def err(self) -> float:
        return self.err_bytes

    @property
    def uncertain(self) -> bool:
        """The verdict could flip within the model's error."""
        return abs(self.margin) <= self.err

    def verdict(self) -> str:
        e = f"model error ±{self.err / GB:.1f} GB"
        if self.uncertain:
            return f"uncertain: {self.margin / GB:+.1f} GB margin is within the {e}"
        if self.fits:
            return f"fits with {self.margin / GB:.1f} GB margin; {e}"
        return f"OOM by {-self.margin / GB:.1f} GB; {e}"


def _layer_params(m: ModelConfig) -> tuple[float, float]:
    """(matmul params, norm params) of one transformer layer."""
    h, hd = m.hidden, m.dim_head
    mat = 2 * h * m.n_heads * hd + 2 * h * m.n_kv_heads * hd + 3 * h * m.ffn_hidden
    return float(mat), float(2 * h)


def largest_module_params(m: ModelConfig, tp: int = 1) -> float:
    """Parameters of the largest module (the unit DeepSpeed ZeRO-3 gathers): the embedding/head or one projection.

    The quantity DeepSpeed's ``model_to_params`` calls ``largest_layer_params`` (tests check it on the meta model).
    """
    h, hd = m.hidden, m.dim_head
    return float(max(m.padded_vocab * h, h * m.ffn_hidden, h * m.n_heads * hd)) / tp


def stage_params(m: ModelConfig, layout: Layout, stage: int) -> float:
    """Parameters one tile holds before ZeRO partitioning: its stage's layers / TP (+ embedding / head)."""
    mat, norms = _layer_params(m)
    layers = m.n_layers // layout.pp
    n = layers * (mat / layout.tp + norms)
    vh = m.padded_vocab * m.hidden / layout.tp
    if stage == 0:
        n += vh  # input embedding on the first stage
    if stage == layout.pp - 1:
        n += vh + m.hidden  # head + final norm on the last stage
    return n


def layer_activation_bytes(m: ModelConfig, layout: Layout, seq: int, a: Assumptions) -> tuple[float, str]:
    """Bytes of one layer's saved activations for one microbatch (bf16), Megatron TP without sequence parallel."""
    b, s, h, t = layout.mbs, seq, m.hidden, layout.tp
    kvd = m.n_kv_heads * m.dim_head
    qd = m.n_heads * m.dim_head
    replicated = 4 * h  # 2 norm inputs + 2 residual adds, full on every TP rank
    split = (qd + 2 * kvd) * 2 + qd + 4 * m.ffn_hidden  # q,k,v (+ rotated q,k,v), attn out, gate/up/silu/product
    per_token = 2 * (replicated + split / t)
    note = "2 B x mbs x s x (4h + (2(q+2kv) + q + 4 ffn)/TP)"
    if not a.flash_attention:
        per_token += 2 * 2 * m.n_heads * s / t  # scores + softmax (bf16)
        note += " + 4 n_heads s/TP"
    return b * s * per_token, note


@functools.cache
def model_config(model: str) -> ModelConfig:
    """The preset's model section (cached: the planner evaluates thousands of layouts)."""
    return _preset(model).model


@functools.cache
def _ds_buckets(layout: Layout, model: str) -> dict[str, float]:
    """Bucket sizes (elements) from the generated DeepSpeed config; DeepSpeed defaults where it omits them."""
    from torch_ref.ds_config import ds_config

    z = ds_config(layout.config(model), mics_keys=True)["zero_optimization"]
    return {
        "reduce": float(z.get("reduce_bucket_size", DS_DEFAULT_REDUCE_BUCKET)),
        "allgather": float(z.get("allgather_bucket_size", DS_DEFAULT_ALLGATHER_BUCKET)),
        "prefetch": float(z.get("stage3_prefetch_bucket_size", 0)),
        "max_live": float(z.get("stage3_max_live_parameters", 0)),
    }


ACTIVATION_TERMS = ("checkpointed layer inputs", "recompute working set", "saved activations", "pipeline p2p buffers",
                    "logits + loss")
UNCHECKED_TERMS = ("allocator fragmentation", "runtime context")  # set by hand; cancel in the CPU check's differences


def inflight_microbatches(layout: Layout, stage: int) -> int:
    """Microbatches whose activations a pipeline stage holds at once.

    1F1B (DeepSpeed's ``TrainSchedule``; ``num_pipe_buffers`` = min(stages - stage_id, micro_batches)): stage s
    runs pp - s forwards before its first backward, so GAS beyond pp adds nothing. GPipe: every forward runs
    before any backward, so all GAS microbatches are held."""
    if layout.pp <= 1:
        return 1
    return layout.gas if layout.schedule == "gpipe" else min(layout.pp - stage, layout.gas)


def ds_memory(model: str, layout: Layout, cluster: Cluster, a: Assumptions, seq: int = SEQ,
              stage: int | None = None) -> MemoryEstimate:
    """Modelled DeepSpeed memory per tile of the most loaded pipeline stage (or of ``stage``)."""
    if stage is None:
        ests = [ds_memory(model, layout, cluster, a, seq, s) for s in range(layout.pp)]
        return max(ests, key=lambda e: e.total)
    m = model_config(model)
    n = stage_params(m, layout, stage)
    dp = layout.dp
    shard = layout.fsdp if layout.mics else dp  # MiCS: every model state only inside its group
    z = layout.zero
    T: list[Term] = []
    T.append(Term("bf16 params", 2 * n / (shard if z >= 3 else 1), f"2 B x {n / 1e9:.2f}B params"
                  + (f" / {shard}" if z >= 3 else "")))
    if layout.hpz:
        T.append(Term("hpZ secondary bf16 params", 2 * n / layout.fsdp, f"2 B x params / hpz {layout.fsdp}"))
    opt_div = shard if z >= 1 else 1
    T.append(Term("fp32 master + Adam m, v", 12 * n / opt_div, f"12 B x params / {opt_div}"))
    buckets = _ds_buckets(layout, model)
    big = largest_module_params(m, layout.tp)
    if z <= 1:
        # BF16_Optimizer (ZeRO-0/1): full bf16 .grad plus the full fp32 accumulation buffer
        T.append(Term("bf16 grads", 2 * n, "2 B x params (ZeRO-0/1: not partitioned)"))
        T.append(Term("fp32 grad accumulation", 4 * n, "4 B x params (grad_accum_dtype fp32)"))
    else:
        T.append(Term("fp32 grad partition", 4 * n / shard, f"4 B x params / {shard}"))
        if z == 2:
            T.append(Term("bf16 grads in flight", 2 * min(n, 2 * buckets["reduce"]), "2 B x 2 reduce buckets"))
        else:
            T.append(Term("bf16 grads of one module", 2 * big, "2 B x largest module (reduced as produced)"))
    # a bucket or a gathered set never holds more than the rank's parameters (it matters for small models)
    if z >= 3:
        live = min(big + buckets["prefetch"], buckets["max_live"] or math.inf, n)
        T.append(Term("ZeRO-3 gathered params", 2 * live, "2 B x min(largest module + prefetch bucket, max live, "
                      "params)"))
    # communication buckets (DeepSpeed config; defaults 5e8 for ZeRO-1/2)
    reduce, gather = min(buckets["reduce"], n), min(buckets["allgather"], n)
    if z in (1, 2):
        T.append(Term("comm buckets", 4 * reduce + 2 * gather,
                      f"fp32 reduce {reduce:.0e} + bf16 allgather {gather:.0e} elements"))
    elif z >= 3:
        T.append(Term("comm buckets", 2 * 4 * reduce, f"2 x fp32 reduce bucket {reduce:.0e}"))
    # activations
    act, act_note = layer_activation_bytes(m, layout, seq, a)
    layers = m.n_layers // layout.pp
    inflight = inflight_microbatches(layout, stage)
    ckpt_in = 2 * layout.mbs * seq * m.hidden
    if layout.remat:
        T.append(Term("checkpointed layer inputs", layers * inflight * ckpt_in,
                      f"{layers} layers x {inflight} microbatches x 2 B x mbs x s x h"))
        T.append(Term("recompute working set", a.bwd_ws_factor * act, f"{a.bwd_ws_factor:g} x one layer: {act_note}"))
    else:
        T.append(Term("saved activations", layers * inflight * act + (a.bwd_ws_factor - 1) * act,
                      f"{layers} layers x {inflight} microbatches x ({act_note}) + backward working set"))
    if layout.pp > 1:
        # each in-flight microbatch's stage output stays referenced for its backward (outputs[buffer_id]),
        # plus the activation-gradient send/recv buffers
        T.append(Term("pipeline p2p buffers", (inflight + 2) * ckpt_in,
                      f"({inflight} stage outputs in flight + 2 gradient buffers) x 2 B x mbs x s x h"))
    if stage == layout.pp - 1:
        T.append(Term("logits + loss", a.logits_bytes * layout.mbs * seq * m.padded_vocab / layout.tp,
                      f"{a.logits_bytes:g} B x mbs x s x V / TP"))
    dynamic = sum(t.value for t in T if t.name in ("checkpointed layer inputs", "recompute working set",
                                                    "saved activations", "logits + loss", "comm buckets",
                                                    "ZeRO-3 gathered params", "bf16 grads in flight"))
    T.append(Term("allocator fragmentation", a.frag_frac * dynamic, f"{a.frag_frac:g} x dynamic terms"))
    T.append(Term("runtime context", a.runtime_gb * GB, "framework/driver/collectives"))
    act_terms = sum(t.value for t in T if t.name in ACTIVATION_TERMS)
    state_terms = sum(t.value for t in T if t.name not in (*ACTIVATION_TERMS, *UNCHECKED_TERMS))
    return MemoryEstimate(stage, T, cluster.usable_bytes, a.mem_err_states * state_terms + a.mem_err_act * act_terms)


def deepspeed_estimate(model: str, layout: Layout, cluster: Cluster, a: Assumptions, seq: int = SEQ
                       ) -> list[tuple[str, float, float, str]]:
    """This model's model-state terms beside DeepSpeed's own estimator, for the most loaded stage.

    DeepSpeed's ``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs`` (what its
    ``*_all_live`` helpers print, without offload) on this rank's parameters (its stage, / TP), with the
    partitioning group as ``total_gpus``. Returns (part, this model, DeepSpeed's, why they differ) in bytes.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    mem = ds_memory(model, layout, cluster, a, seq)
    t = {x.name: x.value for x in mem.terms}
    m = model_config(model)
    n = stage_params(m, layout, mem.stage)
    shard = layout.fsdp if layout.mics else layout.dp
    out: list[tuple[str, float, float, str]] = []
    if layout.zero >= 3:
        big = largest_module_params(m, layout.tp)
        _, ds_total, _ = estimate_zero3_model_states_mem_needs(n, big, num_gpus_per_node=shard, num_nodes=1,
                                                            cpu_offload=False)
        ds_live = 4 * big
        ours_part = t["bf16 params"] + t["fp32 master + Adam m, v"] + t["fp32 grad partition"]
        out.append(("partitioned states (18 B/param / group)", ours_part, ds_total - ds_live,
                    "same bytes per parameter" + (" (MiCS: the group is the shard)" if layout.mics else "")))
        ours_live = t["ZeRO-3 gathered params"] + t["bf16 grads of one module"]
        out.append(("live gathered params + grads", ours_live, ds_live,
                    "DeepSpeed: 4 B x largest module; here also the prefetch bucket"))
        if layout.hpz:
            out.append(("hpZ secondary params", t["hpZ secondary bf16 params"], 0.0, "not in DeepSpeed's estimator"))
        ours_total = ours_part + ours_live + t.get("hpZ secondary bf16 params", 0.0)
    else:
        _, ds_total = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=shard, num_nodes=1,
                                                            cpu_offload=False)
        out.append(("bf16 params", t["bf16 params"], 2 * n, "same"))
        ours_grads = sum(t.get(k, 0.0) for k in ("bf16 grads", "fp32 grad accumulation", "fp32 grad partition",
                                                 "bf16 grads in flight"))
        ds_grads = (2 + 4) * n / shard
        why = ("ZeRO-1 with bf16 runs BF16_Optimizer: full bf16 grads + full fp32 accumulation, not partitioned"
               if layout.zero <= 1 else "DeepSpeed counts partitioned bf16 grads; here 2 reduce buckets in flight")
        out.append(("gradients", ours_grads, ds_grads, why))
        out.append(("fp32 master + Adam m, v", t["fp32 master + Adam m, v"], 12 * n / shard, "same"))
        ours_total = t["bf16 params"] + ours_grads + t["fp32 master + Adam m, v"]
    out.append(("model states total", ours_total, float(ds_total), ""))
    return out


# =============================================================================== step-time model
@dataclass
class Comm:
    name: str
    kind: str  # all-gather | reduce-scatter | all-reduce | p2p
    nbytes: float  # payload (the gathered / reduced size)
    group: Group
    count: float  # per microbatch (or per step)
    overlappable: bool
    seconds: float  # of all `count` calls


def collective_seconds(kind: str, nbytes: float, grp: Group, cluster: Cluster, a: Assumptions) -> float:
    """Bandwidth-optimal hierarchical ring: inter-node phase on the node's NICs, then the intra-node ring."""
    if grp.n <= 1 or nbytes <= 0:
        return 0.0
    link_bw = (cluster.gpu_bw_gbs if grp.link == "package" else cluster.intra_bw_gbs) * GB * a.link_eff
    inter_bw = cluster.inter_bw_gbs * GB * a.comm_eff
    if kind == "p2p":
        return nbytes / (link_bw if grp.k == 1 else inter_bw / cluster.tiles_per_node)
    factor = 2.0 if kind == "all-reduce" else 1.0
    t = 0.0
    if grp.k > 1:  # every tile of a node runs the same collective on its own group: NICs are shared
        t += cluster.tiles_per_node * (nbytes / grp.g) * (grp.k - 1) / grp.k / inter_bw
        t += (grp.k - 1) * cluster.inter_lat_us * 1e-6
    if grp.g > 1:
        t += nbytes * (grp.g - 1) / grp.g / link_bw + (grp.g - 1) * cluster.intra_lat_us * 1e-6
    return factor * t


@dataclass
class StepEstimate:
    compute_s: float  # per microbatch, slowest stage
    comms_mb: list[Comm]
    comms_step: list[Comm]
    mb_s: float  # per microbatch incl. exposed comm
    step_s: float
    bubble: float  # (m + p - 1) / m
    opt_s: float
    flops_per_sample: float
    terms: list[Term] = field(default_factory=list)

    @property
    def sps(self) -> float:
        return 0.0 if self.step_s <= 0 else self.gbs / self.step_s

    gbs: int = 0


def step_time(model: str, layout: Layout, cluster: Cluster, a: Assumptions, seq: int = SEQ) -> StepEstimate:
    m = model_config(model)
    h, V, L, b = m.hidden, m.padded_vocab, m.n_layers, layout.mbs
    f_sample = m.flops_per_sample(seq)  # Megatron-LM model FLOPs (the TFLOPS column's numerator)
    f_head = 6.0 * seq * h * V
    f_layer = (f_sample - f_head) / L
    recompute = f_layer / 3 if layout.remat else 0.0  # one extra forward per checkpointed layer
    layers = L // layout.pp
    stage_flops = b * (layers * (f_layer + recompute) + f_head) / layout.tp  # last stage (it also has the head)
    compute = stage_flops / (cluster.peak_tflops * 1e12 * a.eta)

    tp_g = group_of(layout, ("tensor",), cluster)
    dp_axes = ("data", "fsdp")
    dp_g = group_of(layout, dp_axes, cluster)
    in_g = group_of(layout, ("fsdp",), cluster)
    pp_g = group_of(layout, ("pipeline",), cluster)
    n_local = max(stage_params(m, layout, s) for s in range(layout.pp))
    act = 2.0 * b * seq * h
    mb: list[Comm] = []
    st: list[Comm] = []

    def add(lst: list[Comm], name: str, kind: str, nbytes: float, grp: Group, count: float, ovl: bool) -> None:
        if grp.n > 1 and nbytes > 0 and count > 0:
            lst.append(Comm(name, kind, nbytes, grp, count, ovl,
                            count * collective_seconds(kind, nbytes, grp, cluster, a)))

    if layout.tp > 1:  # Megatron: 2 all-reduces per layer forward, 2 backward, 2 more in the recompute
        per_layer = 4 + (2 if layout.remat else 0)
        add(mb, "TP activations", "all-reduce", act, tp_g, per_layer * layers + 2, False)
    if layout.pp > 1:  # activations forward, their gradients backward, across a stage boundary
        add(mb, "PP send/recv", "p2p", act, group_of(layout, ("pipeline",), cluster)
            if pp_g.k == 1 else Group(("pipeline",), 2, 2, 1, "node"), 2, False)
    z = layout.zero
    pbytes = 2.0 * n_local  # bf16 params (or grads) of this tile's model slice
    if z >= 3:
        param_g = in_g if layout.mics else dp_g
        bwd_g = in_g if (layout.hpz or layout.mics) else dp_g
        add(mb, "ZeRO-3 fwd param all-gather", "all-gather", pbytes, param_g, 1, True)
        add(mb, "ZeRO-3 bwd param all-gathers", "all-gather", pbytes, bwd_g, 2 if layout.remat else 1, True)
        add(mb, "ZeRO-3 grad reduce-scatter", "reduce-scatter", pbytes, param_g, 1, True)
        if layout.mics and layout.data > 1:  # MiCS's second hop runs once, at the accumulation boundary
            add(st, "MiCS grad all-reduce across groups", "all-reduce", pbytes / layout.fsdp,
                group_of(layout, ("data",), cluster), 1, False)
        # At the step boundary each rank exchanges its own partition (fp32 gradient + bf16 parameter, 6 B/param):
        # its share falls as 1/DP (1/shard under MiCS), where the per-microbatch ring traffic does not.
        shard = layout.fsdp if layout.mics else layout.dp
        grp = in_g if layout.mics else dp_g
        if grp.n > 1:
            part = 6.0 * n_local / shard
            bw = (cluster.inter_bw_gbs * GB / cluster.tiles_per_node if grp.k > 1
                  else (cluster.gpu_bw_gbs if grp.link == "package" else cluster.intra_bw_gbs) * GB)
            st.append(Comm("ZeRO-3 step partition exchange", "partition", part, grp, 1, False,
                           part / (bw * a.step_eff)))
    elif z == 2:  # gradients reduce-scattered every microbatch; overlap_comm is off in the generated config
        add(mb, "ZeRO-2 grad reduce-scatter", "reduce-scatter", pbytes, dp_g, 1, False)
        add(st, "ZeRO-2 param all-gather", "all-gather", pbytes, dp_g, 1, False)
    else:  # ZeRO-0/1: fp32 gradients all-reduced once per step, then updated bf16 params all-gathered
        add(st, "ZeRO-1 fp32 grad all-reduce", "all-reduce", 4.0 * n_local, dp_g, 1, False)
        if z == 1:
            add(st, "ZeRO-1 param all-gather", "all-gather", pbytes, dp_g, 1, False)

    opt_div = (layout.fsdp if layout.mics else layout.dp) if z >= 1 else 1
    opt_s = a.opt_bytes_per_param * n_local / opt_div / (cluster.hbm_bw_gbs * GB)
    exposed_mb = sum(c.seconds for c in mb if not c.overlappable)
    ovl_mb = sum(c.seconds for c in mb if c.overlappable)
    mb_s = compute + exposed_mb + (1 - a.overlap) * ovl_mb
    p, gas = layout.pp, layout.gas
    step_s = (gas + p - 1) * mb_s + sum(c.seconds for c in st) + opt_s
    # DeepSpeed's ZeRO-3 prefetcher replays the parameter trace it recorded; the trace is invalidated at each
    # optimizer step, so the first microbatch's forward all-gather runs unprefetched.
    fwd_ag = sum(c.seconds for c in mb if c.name == "ZeRO-3 fwd param all-gather")
    cold = a.overlap * fwd_ag if a.cold_first_microbatch else 0.0
    step_s += cold
    terms = [
        Term("compute / microbatch", compute, f"{stage_flops / 1e12:.0f} TFLOP / ({cluster.peak_tflops:g} x eta)"),
        Term("exposed comm / microbatch", exposed_mb, "not overlapped"),
        Term("overlappable comm / microbatch", ovl_mb, f"x (1 - overlap) = {(1 - a.overlap) * ovl_mb:.3f}"),
        Term("microbatch slots", gas + p - 1, f"m + p - 1 = {gas} + {p} - 1 (bubble {(gas + p - 1) / gas:.2f})"),
        Term("per-step collectives", sum(c.seconds for c in st), ", ".join(c.name for c in st) or "-"),
        Term("optimizer step", opt_s, f"{a.opt_bytes_per_param:g} B/param over HBM"),
        Term("cold first microbatch", cold, "overlap x ZeRO-3 forward all-gather, once per step"),
    ]
    return StepEstimate(compute, mb, st, mb_s, step_s, (gas + p - 1) / gas, opt_s, f_sample, terms, layout.gbs)


def tflops_per_tile(est: StepEstimate, layout: Layout) -> float:
    return est.sps * est.flops_per_sample / layout.ngpu / 1e12


# =============================================================================== calibration
@dataclass
class Fit:
    params: dict[str, float]
    rows: list[dict[str, Any]]  # run, measured, predicted, error, loo prediction, loo error
    rms_log: float
    loo_max: float
    loo_mean: float

    @property
    def max_err(self) -> float:
        return max(abs(r["err"]) for r in self.rows)


def _ok_rows(rows: Sequence[Row]) -> list[Row]:
    return [r for r in rows if r.status == "ok" and r.sps]


def _with(a: Assumptions, x: np.ndarray) -> Assumptions:
    # the fitted values live in (0, 1) through a logistic: the fit cannot leave the physical range
    vals = 1.0 / (1.0 + np.exp(-x))
    return dataclasses.replace(a, **dict(zip(Assumptions.FITTED, map(float, vals), strict=True)))


def _logit(v: float) -> float:
    v = min(max(v, 1e-4), 1 - 1e-4)
    return math.log(v / (1 - v))


def _residuals(x: np.ndarray, rows: Sequence[Row], cluster: Cluster, a: Assumptions) -> np.ndarray:
    aa = _with(a, x)
    return np.array([math.log(step_time(r.model, layout_from_row(r, cluster.tiles_per_node), cluster, aa,
                                        r.seq).sps / r.sps) for r in rows])


def _least_squares(rows: Sequence[Row], cluster: Cluster, a: Assumptions, x0: np.ndarray) -> np.ndarray:
    """Levenberg-Marquardt with a forward-difference Jacobian (a few parameters; numpy only)."""
    x, lam = x0.copy(), 1e-2
    r = _residuals(x, rows, cluster, a)
    cost = float(r @ r)
    for _ in range(100):
        J = np.empty((len(r), len(x)))
        for j in range(len(x)):
            dx = np.zeros_like(x)
            dx[j] = 1e-6
            J[:, j] = (_residuals(x + dx, rows, cluster, a) - r) / 1e-6
        g, H = J.T @ r, J.T @ J
        improved = False
        for _ in range(20):
            step = np.linalg.solve(H + lam * np.diag(np.diag(H) + 1e-12), -g)
            xn = np.clip(x + step, -9, 9)
            rn = _residuals(xn, rows, cluster, a)
            cn = float(rn @ rn)
            if cn < cost:
                x, r, cost, lam, improved = xn, rn, cn, lam / 3, True
                break
            lam *= 4
        if not improved or float(np.abs(step).max()) < 1e-7:
            break
    return x


def calibrate(rows: Sequence[Row] | None = None, cluster: Cluster | None = None,
              a: Assumptions | None = None, loo: bool = True) -> Fit:
    """Fit ``Assumptions.FITTED`` on the measured rows; per-row and leave-one-out errors of samples/s."""
    rows = _ok_rows(load_reference(DEFAULT_REFERENCE) if rows is None else rows)
    cluster = cluster or load_cluster("aurora")
    a = a or Assumptions()
    x0 = np.array([_logit(getattr(a, k)) for k in Assumptions.FITTED])
    x = _least_squares(rows, cluster, a, x0)
    fitted = _with(a, x)
    res = _residuals(x, rows, cluster, a)
    out: list[dict[str, Any]] = []
    for i, r in enumerate(rows):
        pred = r.sps * math.exp(res[i])
        d: dict[str, Any] = {"run": r.run, "model": r.model, "layout": layout_from_row(r).label,
                             "variant": layout_from_row(r).variant, "measured": r.sps, "predicted": pred,
                             "err": pred / r.sps - 1}
        if loo:
            rest = [q for j, q in enumerate(rows) if j != i]
            xi = _least_squares(rest, cluster, a, x)
            d["loo_predicted"] = r.sps * math.exp(_residuals(xi, [r], cluster, a)[0])
            d["loo_err"] = d["loo_predicted"] / r.sps - 1
        out.append(d)
    loo_errs = [abs(d["loo_err"]) for d in out] if loo else [float("nan")]
    return Fit({k: getattr(fitted, k) for k in Assumptions.FITTED}, out, float(np.sqrt(np.mean(res**2))),
               max(loo_errs), float(np.mean(loo_errs)))


def mics_fits(row: Row, cluster: Cluster, a: Assumptions) -> list[tuple[int, MemoryEstimate]]:
    """For a MiCS row: every shard size (1, 2, 4, ... nodes, all its tiles) dividing its DP, with its estimate."""
    out = []
    for shard in mics_shard_sizes(row.dp, cluster.tiles_per_node):
        if row.dp % shard == 0 and shard > 1:
            lay = layout_from_row(row, cluster.tiles_per_node, mics_shard=shard)
            out.append((shard, ds_memory(row.model, lay, cluster, a, row.seq)))
    return out


def _family_key(r: Row, cluster: Cluster) -> tuple:
    lay = layout_from_row(r, cluster.tiles_per_node)
    return (r.model, lay.family, lay.pp, lay.tp, lay.mbs, lay.remat)


def step_terms(rows: Sequence[Row], cluster: Cluster, a: Assumptions) -> list[dict[str, Any]]:
    """Per measured row: the per-microbatch time and the fixed per-step part, measured and modelled.

    Measured, from the study's GAS sweeps: step time = slots x per-microbatch + fixed (slots = GAS + PP - 1),
    a line through the rows of one layout and node count. A row without a sweep of its own takes the slope of its
    family's sweep at another width, scaled by the model's ratio of per-microbatch times, and says so."""
    ok = _ok_rows(rows)
    sweeps: dict[tuple, list[Row]] = {}
    for r in ok:
        sweeps.setdefault((*_family_key(r, cluster), r.nodes), []).append(r)
    slopes: dict[tuple, tuple[float, Row]] = {}
    for key, rs in sweeps.items():
        if len({r.gas for r in rs}) >= 2:
            slots = np.array([r.gas + r.pp - 1 for r in rs], dtype=float)
            step = np.array([r.gbs / r.sps for r in rs])  # type: ignore[operator]
            slopes[key] = (float(np.polyfit(slots, step, 1)[0]), rs[0])
    out = []
    for r in ok:
        lay = layout_from_row(r, cluster.tiles_per_node)
        est = step_time(r.model, lay, cluster, a, r.seq)
        key = (*_family_key(r, cluster), r.nodes)
        if key in slopes:
            mb, src = slopes[key][0], f"{r.nodes}-node GAS sweep"
        else:
            other = [(k, v) for k, v in slopes.items() if k[:-1] == key[:-1]]
            if not other:
                mb, src = float("nan"), "no sweep"
            else:
                k, (slope, ref) = min(other, key=lambda kv: abs(kv[0][-1] - r.nodes))
                ref_est = step_time(ref.model, layout_from_row(ref, cluster.tiles_per_node), cluster, a, ref.seq)
                mb, src = slope * est.mb_s / ref_est.mb_s, f"{k[-1]}-node sweep x model ratio"
        slots = lay.gas + lay.pp - 1
        step = r.gbs / r.sps  # type: ignore[operator]
        out.append({"run": r.run, "family": lay.family, "nodes": r.nodes, "dp": lay.dp, "gas": lay.gas,
                    "step": step, "step_pred": est.step_s, "mb": mb, "mb_pred": est.mb_s,
                    "fixed": step - slots * mb, "fixed_pred": est.step_s - slots * est.mb_s, "source": src})
    return out


def zero3_trend(rows: Sequence[Row], cluster: Cluster, a: Assumptions, nodes: Sequence[int] = (4, 6, 8, 16, 32)
                ) -> list[str]:
    """Lines: the ZeRO-3+hpZ fixed per-step part against DP, measured (study rows at GAS 1) and modelled."""
    lines = []
    for d in step_terms(rows, cluster, a):
        if d["family"] == "ZeRO-3+hpZ" and d["gas"] == 1:
            lines.append(f"measured  DP {d['dp']:>4}: step {d['step']:.1f} s = {d['mb']:.1f} s/microbatch "
                         f"({d['source']}) + fixed {d['fixed']:.1f} s; model: step {d['step_pred']:.1f} s, fixed "
                         f"{d['fixed_pred']:.1f} s")
    for n in nodes:
        lay = Layout("ZeRO-3+hpZ", data=n, fsdp=cluster.tiles_per_node, zero=3, hpz=True)
        est = step_time("llama2-70b", lay, cluster, a)
        per_step = sum(c.seconds for c in est.comms_step)
        lines.append(f"model     DP {lay.dp:>4}: step {est.step_s:.1f} s at GAS 1, fixed {est.step_s - est.mb_s:.1f} s "
                     f"(per-step collectives {per_step:.1f} s)")
    return lines


# =============================================================================== JAX AOT compile (subprocess)
def _cache_dir() -> Path:
    return Path(os.environ.get("AURORAGPT_PLAN_CACHE", Path.home() / ".cache" / "auroragpt-plan"))


def jax_compile_key(cfg: Config, n_devices: int) -> str:
    import jax

    blob = json.dumps({"cfg": cfg.to_dict(), "n": n_devices, "jax": jax.__version__, "v": JAX_WORKER_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def jax_memory(model: str, layout: Layout, seq: int = SEQ, timeout: float = 600, cache: Path | None = None,
               refresh: bool = False) -> dict[str, Any]:
    """Compiled per-device memory of ``layout`` on fake CPU devices: {"ok", "memory", "peak_bytes", ...}.

    One subprocess per layout (the device count is fixed per process); results cached by config hash.
    """
    cfg = layout.jax_config(model, seq)
    cache = cache or _cache_dir()
    key = jax_compile_key(cfg, layout.ngpu)
    path = cache / f"{key}.json"
    if path.is_file() and not refresh:
        return json.loads(path.read_text()) | {"cached": True}
    cmd = [sys.executable, "-m", "compare.plan", "--jax-worker", json.dumps({"cfg": cfg.to_dict(),
                                                                              "n": layout.ngpu})]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        return {"ok": False, "reason": f"compile timed out after {timeout:.0f}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        res: dict[str, Any] = {"ok": False, "reason": err[:300]}
    else:
        res = json.loads(lines[-1])
    res["wall_s"] = time.perf_counter() - t0
    if res.get("ok") or "Error" in str(res.get("reason", "")):  # deterministic outcomes only
        cache.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1) + "\n")
    return res


def _jax_worker(spec: str) -> int:
    """Inside the subprocess: N fake CPU devices, build the Trainer, AOT compile, print one JSON line."""
    import resource

    from configs import config_from_dict

    d = json.loads(spec)
    cfg, n = config_from_dict(d["cfg"]), int(d["n"])
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)
    try:
        from jax_impl.sharding import make_mesh
        from jax_impl.trainer import Trainer

        validate_config(cfg, n)
        trainer = Trainer.build(cfg, make_mesh(cfg.mesh_shape(n)))
        t0 = time.perf_counter()
        ma = trainer.compile_step().memory_analysis()
        compile_s = time.perf_counter() - t0
    except Exception as e:  # any failure is reported as "JAX: not available (reason)"
        print(json.dumps({"ok": False, "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:240]}"}))
        return 0
    mem = {k: int(getattr(ma, k + "_size_in_bytes", 0) or 0) for k in ("argument", "output", "alias", "temp")}
    print(json.dumps({"ok": True, "memory": mem, "peak_bytes": mem["argument"] + mem["output"] - mem["alias"]
                      + mem["temp"], "state_bytes": trainer.state_bytes_per_device(), "compile_s": compile_s,
                      "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    return 0


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith(key):
                return int(ln.split()[1]) * 1024
    raise KeyError(key)


def _jax_measure_worker(spec: str) -> int:
    """Inside a subprocess (1 CPU device): compiled memory vs the resident memory the step really uses.

    CPU devices report no ``memory_stats()``, so the process's RSS is the measurement: the baseline is taken
    after a warm-up step (code, thread pools resident), then fresh state is created and the peak RSS
    (VmHWM, reset through /proc/self/clear_refs) of one step is compared to arguments + outputs - aliased + temp.
    """
    import jax
    import numpy as np

    d = json.loads(spec)
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 1)
    from jax_impl.sharding import activate, batch_sharding, make_mesh
    from jax_impl.trainer import Trainer

    cfg = load_config(d["preset"], d.get("overrides", {}))
    tr = Trainer.build(cfg, make_mesh(cfg.mesh_shape(1)))
    comp = tr.compile_step()
    ma = comp.memory_analysis()
    mem = {k: int(getattr(ma, k + "_size_in_bytes", 0) or 0) for k in ("argument", "output", "alias", "temp")}
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, tr.batch_abstract().shape, dtype=np.int32)
    with activate(tr.mesh):
        batch = jax.device_put(tokens, batch_sharding(tr.mesh))
        warm = comp(*tr.init_state(), batch)  # warm-up: code, thread pools and allocator arenas resident
        jax.block_until_ready(warm)
        del warm
        gc.collect()
        time.sleep(0.3)  # buffers are released asynchronously
        base = _proc_status("VmRSS")
        state = tr.init_state()
        jax.block_until_ready(state)
        after_init = _proc_status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter
        jax.block_until_ready(comp(*state, batch))
        hwm = _proc_status("VmHWM")
    # creating the state also leaves the init computation's temporaries resident (random bits, pad copies)
    init_temp = int(tr._init_jit.lower().compile().memory_analysis().temp_size_in_bytes or 0)
    print(json.dumps({"memory": mem, "compiled_peak": mem["argument"] + mem["output"] - mem["alias"] + mem["temp"],
                      "measured_args": after_init - base, "measured_peak": hwm - base, "init_temp": init_temp}))
    return 0


def measure_jax_memory(preset: str, overrides: dict[str, Any] | None = None, timeout: float = 300) -> dict[str, Any]:
    """Compiled vs measured (RSS) memory of one train step on one CPU device, in a fresh subprocess."""
    spec = json.dumps({"preset": preset, "overrides": overrides or {}})
    proc = subprocess.run([sys.executable, "-m", "compare.plan", "--jax-measure", spec], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          cwd=Path(__file__).resolve().parents[1])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measurement failed: {proc.stderr.strip()[-500:]}")
    return json.loads(lines[-1])


# =============================================================================== candidates and ranking
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def mics_shard_sizes(tiles: int, tiles_per_node: int) -> list[int]:
    """MiCS group sizes (tiles) to try: 1, 2, 4, ... nodes while they divide the tiles, and all tiles."""
    out, nodes = [], 1
    while nodes * tiles_per_node <= tiles:
        if tiles % (nodes * tiles_per_node) == 0:
            out.append(nodes * tiles_per_node)
        nodes *= 2
    return sorted({*out, tiles}) if tiles >= 2 else out


def mesh_candidates(model: str, nodes: int, cluster: Cluster) -> list[Layout]:
    """The study's four layouts and JAX-native meshes (mbs 1, gas 1): the shapes before the batch is split."""
    T, tpn = nodes * cluster.tiles_per_node, cluster.tiles_per_node
    meshes: list[Layout] = []
    tps = [t for t in _divisors(tpn) if t > 1]
    for pp in sorted({nodes, 2 * nodes, 4, 8, 16} & set(_divisors(T)) - {1}):
        for tp in [1, *tps]:
            if T % (pp * tp) == 0:
                meshes.append(Layout("PP+ZeRO-1", pp=pp, data=T // (pp * tp), tp=tp, zero=1))
    if nodes > 1:
        meshes.append(Layout("ZeRO-3+hpZ", data=nodes, fsdp=tpn, zero=3, hpz=True))
    for shard in mics_shard_sizes(T, tpn):  # the MiCS group is a choice like any other
        meshes.append(Layout("ZeRO-3 MiCS", data=T // shard, fsdp=shard, zero=3, mics=True))
    for tp in tps:
        meshes.append(Layout("TP+ZeRO-2", data=T // tp, tp=tp, zero=2))
        meshes.append(Layout("fsdp x tensor (JAX)", fsdp=T // tp, tp=tp, zero=3))
        for shard in mics_shard_sizes(T, tpn):
            meshes.append(Layout("data x fsdp x tensor MiCS (JAX)", data=T // shard, fsdp=shard // tp, tp=tp,
                                 zero=3, mics=True))
    meshes.append(Layout("fsdp (JAX ZeRO-3)", fsdp=T, zero=3))
    meshes.append(Layout("data ZeRO-1", data=T, zero=1))
    return meshes


def batch_splits(dp: int, gbs: int | None) -> list[tuple[int, int]]:
    """(mbs, gas) pairs: every GAS/MBS choice, or at a fixed global batch those with mbs * gas * dp == gbs
    (any GAS: the batch is the user's hyperparameter, the split is the layout's)."""
    if gbs is None:
        return [(m, g) for g in GAS_CHOICES for m in MBS_CHOICES]
    if gbs % dp:
        return []
    per = gbs // dp
    return [(m, per // m) for m in MBS_CHOICES if per % m == 0]


def candidates(model: str, nodes: int, cluster: Cluster, gbs: int | None = None) -> list[Layout]:
    """Every mesh of ``mesh_candidates`` with its MBS/GAS/checkpointing choices (at ``gbs`` if given)."""
    out = []
    for lay in mesh_candidates(model, nodes, cluster):
        for mbs, gas in batch_splits(lay.dp, gbs):
            for remat in (True, False):
                out.append(dataclasses.replace(lay, gas=gas, mbs=mbs, remat=remat))
    return out


def working_gbs(model: str, nodes: int, cluster: Cluster) -> list[int]:
    """The data-parallel widths of the meshes that can be built: a global batch works iff one divides it."""
    return sorted({m.dp for m in mesh_candidates(model, nodes, cluster) if not check_layout(model, m, cluster)})


def nearest_gbs(gbs: int, widths: Sequence[int]) -> list[int]:
    """The nearest global batches below and above ``gbs`` that some width divides."""
    out = []
    below = [w * (gbs // w) for w in widths if gbs // w >= 1]
    if below:
        out.append(max(below))
    out.append(min(w * (gbs // w + 1) for w in widths))
    return sorted(set(out))


def check_gbs(model: str, nodes: int, cluster: Cluster, gbs: int, flag: str = "--gbs") -> None:
    """ConfigError unless some buildable mesh's data-parallel width divides ``gbs`` (naming the nearest that do)."""
    if gbs < 1:
        raise ConfigError(f"{flag} {gbs} must be >= 1 (the global batch in samples)")
    widths = working_gbs(model, nodes, cluster)
    if not widths:
        raise ConfigError(f"no layout of {model} can be built on {nodes} x {cluster.name} nodes; change --nodes")
    if not any(gbs % w == 0 for w in widths):
        near = " or ".join(str(g) for g in nearest_gbs(gbs, widths))
        raise ConfigError(f"{flag} {gbs}: no data-parallel width of {model} on {nodes} x {cluster.name} nodes "
                          f"divides it (widths {', '.join(map(str, widths))}); nearest global batches that work: "
                          f"{near}")


@dataclass
class Planned:
    layout: Layout
    reason: str = ""  # why it is rejected ("" = fits)
    memory: MemoryEstimate | None = None
    step: StepEstimate | None = None
    jax: dict[str, Any] | None = None
    structural: bool = False  # the shape cannot be built at all (indivisible heads/layers, batch, ...)

    @property
    def fits(self) -> bool:
        return not self.reason

    @property
    def uncertain(self) -> bool:
        return self.reason.startswith("uncertain")


def check_layout(model: str, layout: Layout, cluster: Cluster) -> str:
    """'' if the layout can be built on these tiles, else the reason (indivisible shapes, heads, ...)."""
    if layout.tp > cluster.tiles_per_node:
        return f"tensor={layout.tp} would cross nodes ({cluster.tiles_per_node} tiles/node)"
    try:
        validate_config(layout.config(model), layout.ngpu)
    except ConfigError as e:
        return str(e).split(";")[0]
    return ""


def evaluate(model: str, layout: Layout, cluster: Cluster, a: Assumptions, seq: int = SEQ) -> Planned:
    reason = check_layout(model, layout, cluster)
    if reason:
        return Planned(layout, reason, structural=True)
    mem = ds_memory(model, layout, cluster, a, seq)
    p = Planned(layout, "", mem, step_time(model, layout, cluster, a, seq))
    if mem.uncertain:  # neither a pick nor a rejection
        p.reason = (f"uncertain (DeepSpeed model): {mem.total / GB:.1f} GB of {cluster.usable_bytes / GB:.1f} GB "
                    f"usable, {mem.margin / GB:+.1f} GB margin within the model error ±{mem.err / GB:.1f} GB "
                    f"(stage {mem.stage})")
    elif not mem.fits:
        p.reason = (f"OOM (DeepSpeed model): {mem.total / GB:.1f} GB > {cluster.usable_bytes / GB:.1f} GB usable, "
                    f"over by {(mem.total - cluster.usable_bytes) / GB:.1f} GB, model error ±{mem.err / GB:.1f} GB "
                    f"(stage {mem.stage})")
    return p


def plan(model: str, nodes: int, cluster: Cluster, a: Assumptions, seq: int = SEQ,
         layouts: Iterable[Layout] | None = None, gbs: int | None = None) -> list[Planned]:
    """Every candidate evaluated; fitting ones first, by predicted samples/s.

    With ``gbs`` only layouts whose mbs * gas * dp equals it (meshes whose data-parallel width does not divide
    it come back as structural rejections); without it, GBS <= ``a.max_gbs``."""
    if nodes < 1:
        raise ConfigError(f"--nodes {nodes} must be >= 1")
    if gbs is not None:
        check_gbs(model, nodes, cluster, gbs)
    if layouts is None:
        layouts = candidates(model, nodes, cluster, gbs)
        if gbs is not None:  # the meshes no split reaches, kept so the summary can say why
            extra = [Planned(m, f"data-parallel width {m.dp} does not divide GBS {gbs}", structural=True)
                     for m in mesh_candidates(model, nodes, cluster) if gbs % m.dp]
        else:
            extra = []
    else:
        layouts = [lay for lay in layouts if gbs is None or lay.gbs == gbs]
        extra = []
    res = [evaluate(model, lay, cluster, a, seq) for lay in layouts]
    if gbs is None:
        res = [p for p in res if p.layout.gbs <= a.max_gbs or p.layout.gas == 1]
    return sorted(res, key=lambda p: (not p.fits, -(p.step.sps if p.step and p.fits else 0))) + extra


def structural_summary(planned: Sequence[Planned]) -> str:
    """One line: how many mesh shapes cannot be built, and why (distinct reasons, most frequent first)."""
    why: dict[str, set[str]] = {}
    for p in planned:
        if p.structural:
            why.setdefault(p.reason, set()).add(p.layout.label)
    if not why:
        return ""
    n = len(set().union(*why.values()))
    parts = sorted(why.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return (f"{n} mesh shape{'s' if n != 1 else ''} structurally impossible (not listed): "
            + "; ".join(f"{len(v)} x {k}" for k, v in parts))


def best_per_gbs(planned: Sequence[Planned], top: int = 3) -> list[Planned]:
    """The ``top`` best fitting layouts (best variant per mesh) of each global batch, by GBS then samples/s."""
    by: dict[int, list[Planned]] = {}
    for p in planned:
        by.setdefault(p.layout.gbs, []).append(p)
    out: list[Planned] = []
    for g in sorted(by):
        out += best_per_mesh(by[g])[0][:top]
    return out


def best_per_mesh(planned: Sequence[Planned]) -> tuple[list[Planned], list[Planned]]:
    """(best fitting variant of each mesh/ZeRO layout, one rejection per layout that never fits)."""
    best: dict[str, Planned] = {}
    rejected: dict[str, Planned] = {}
    for p in planned:
        key = p.layout.label
        if p.fits:
            if key not in best or p.step.sps > best[key].step.sps:  # type: ignore[union-attr]
                best[key] = p
        elif key not in rejected or (p.memory and rejected[key].memory
                                     and p.memory.total < rejected[key].memory.total):  # type: ignore[union-attr]
            rejected[key] = p
    ok = sorted(best.values(), key=lambda p: -p.step.sps)  # type: ignore[union-attr]
    return ok, [p for k, p in rejected.items() if k not in best]


# =============================================================================== rendering
def _gb(x: float | None) -> str:
    return "–" if x is None else f"{x / GB:.1f}"


def _jax_cell(p: Planned) -> str:
    if p.jax is None:
        return "–"
    if not p.jax.get("ok"):
        return f"not available ({p.jax.get('reason', '?')[:60]})"
    over = p.memory is not None and p.jax["peak_bytes"] > p.memory.usable
    return jax_split(p.jax) + (" (over usable)" if over else "")


def jax_split(res: dict[str, Any]) -> str:
    """A JAX AOT result as 'peak (params P + temp T)' in GB: P the stored arguments (params, optimizer state),
    T XLA's temporaries (activations, gathered weights, gradients)."""
    m = res["memory"]
    return f"{_gb(res['peak_bytes'])} (args {_gb(m['argument'])} + temp {_gb(m['temp'])})"


PLAN_HEAD = ("#", "family", "layout", "variant", "GBS", "DS mem GB/tile", "margin GB (± model error)",
             "JAX mem GB/tile (XLA:CPU)", "samples/s", "TFLOPS/tile", "step s", "bubble")


def plan_rows(ok: Sequence[Planned], per_gbs: bool = False) -> list[list[str]]:
    """Table rows; ``per_gbs`` numbers the rank within each global batch (the grouped view)."""
    rows = []
    i, last = 0, None
    for p in ok:
        i = i + 1 if not per_gbs or p.layout.gbs == last else 1
        last = p.layout.gbs
        s = p.step
        assert s is not None and p.memory is not None
        rows.append([str(i), p.layout.family, p.layout.label, p.layout.variant, str(p.layout.gbs),
                     _gb(p.memory.total), f"{p.memory.margin / GB:.1f} (±{p.memory.err / GB:.1f})", _jax_cell(p),
                     f"{s.sps:.3f}", f"{tflops_per_tile(s, p.layout):.1f}", f"{s.step_s:.2f}", f"{s.bubble:.2f}"])
    return rows


def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def memory_breakdown(p: Planned) -> str:
    assert p.memory is not None
    rows = [[t.name, f"{t.value / GB:.2f}", t.note] for t in p.memory.terms]
    rows.append(["**total**", f"**{p.memory.total / GB:.2f}**", f"stage {p.memory.stage}; usable "
                 f"{p.memory.usable / GB:.1f} GB; {p.memory.verdict()}"])
    return _md_table(("DeepSpeed memory term", "GB/tile", "how"), rows)


def time_breakdown(p: Planned) -> str:
    assert p.step is not None
    rows = [[t.name, f"{t.value:.3f}", t.note] for t in p.step.terms]
    for c in p.step.comms_mb + p.step.comms_step:
        per = "microbatch" if c in p.step.comms_mb else "step"
        rows.append([f"{c.name} ({c.kind})", f"{c.seconds:.3f}", f"{c.count:g} x {c.nbytes / GB:.3f} GB per {per} "
                     f"over {c.group.n} ranks, {c.group.where}" + (", overlappable" if c.overlappable else "")])
    rows.append(["**step**", f"**{p.step.step_s:.2f}**", f"{p.step.sps:.3f} samples/s"])
    return _md_table(("step-time term", "seconds", "how"), rows)


def assumptions_md(a: Assumptions, cluster: Cluster, fit: Fit | None) -> str:
    lines = [f"Cluster: {cluster.describe()}", ""]
    for f in dataclasses.fields(a):
        tag = " (fitted)" if f.name in Assumptions.FITTED and fit else ""
        lines.append(f"- `{f.name}` = {getattr(a, f.name)}{tag}")
    return "\n".join(lines) + "\n"


def plot_plan(ok: Sequence[Planned], rejected: Sequence[Planned], cluster: Cluster, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = list(ok[:15]) + [p for p in rejected if p.memory is not None][:8]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, max(3.5, 0.38 * len(items) + 1.5)), sharey=True)
    names = [f"GBS {p.layout.gbs}: {p.layout.label} ({p.layout.variant})" for p in items]
    y = np.arange(len(items))
    ax1.barh(y, [p.step.sps if p.fits and p.step else 0 for p in items], color="tab:blue")
    ax1.set_yticks(y, names, fontsize=7)
    ax1.invert_yaxis()
    ax1.set_xlabel("predicted samples/s (rejected: 0)")
    ax2.barh(y, [p.memory.total / GB if p.memory else 0 for p in items],
             color=["tab:green" if p.fits else "tab:red" for p in items])
    ax2.axvline(cluster.usable_bytes / GB, color="k", ls="--", label="usable per tile")
    jx = [(i, p.jax["peak_bytes"] / GB) for i, p in enumerate(items) if p.jax and p.jax.get("ok")]
    if jx:
        ax2.scatter([v for _, v in jx], [i for i, _ in jx], color="k", marker="x", label="JAX compiled (XLA:CPU)")
    ax2.set_xlabel("DeepSpeed-modelled memory per tile (GB)")
    ax2.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long layout labels on the left
    plt.close(fig)
    return path


def _print_rich(title: str, head: Sequence[str], rows: Sequence[Sequence[str]], notes: Sequence[str] = ()) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in head:
        table.add_column(h, overflow="fold")
    for r in rows:
        table.add_row(*r)
    con = Console(width=max(160, Console().width))
    con.print(table)
    for n in notes:
        con.print(n, highlight=False)


# =============================================================================== validation
VALID_HEAD = ("run", "model", "layout", "variant", "measured", "memory verdict (DS model)",
              "model states GB: here / DeepSpeed est.", "sps measured", "sps predicted", "err", "sps LOO", "LOO err",
              "s/microbatch meas / pred", "fixed s/step meas / pred")


def _ds_states(model: str, lay: Layout, cluster: Cluster, a: Assumptions, seq: int) -> str:
    try:
        est = deepspeed_estimate(model, lay, cluster, a, seq)
    except ImportError:  # DeepSpeed is the optional torch extra
        return "– (no deepspeed)"
    _, ours, theirs, _ = est[-1]
    return f"{ours / GB:.1f} / {theirs / GB:.1f}"


def validate(cluster: Cluster | None = None, a: Assumptions | None = None,
             reference: Path = DEFAULT_REFERENCE) -> tuple[list[list[str]], Fit, Assumptions]:
    cluster = cluster or load_cluster("aurora")
    rows = load_reference(reference)
    fit = calibrate(rows, cluster, a or Assumptions())
    fitted = dataclasses.replace(a or Assumptions(), **fit.params)
    by_run = {d["run"]: d for d in fit.rows}
    terms = {d["run"]: d for d in step_terms(rows, cluster, fitted)}
    out = []
    for r in rows:
        lay = layout_from_row(r, cluster.tiles_per_node)
        mem = ds_memory(r.model, lay, cluster, fitted, r.seq)
        pred = ("uncertain" if mem.uncertain else "fits" if mem.fits else "OOM") + (
            f" ({mem.margin / GB:+.1f} GB margin, ±{mem.err / GB:.1f})" if mem.fits else
            f" (+{-mem.margin / GB:.1f} GB over, ±{mem.err / GB:.1f})")
        if r.zero == 3 and r.mics_shard is None:  # MiCS, shard size unrecorded: which sizes would fit
            fitting = [str(n) for n, e in mics_fits(r, cluster, fitted) if e.fits and not e.uncertain]
            pred = ("MiCS shard unrecorded; fits at " + ", ".join(fitting) + " tiles") if fitting else (
                "MiCS shard unrecorded; no shard size fits")
        d, t = by_run.get(r.run), terms.get(r.run)
        out.append([r.run, r.model, lay.label, lay.variant, r.status, pred, _ds_states(r.model, lay, cluster, fitted,
                                                                                       r.seq),
                    f"{r.sps:.3f}" if r.sps else "–", f"{d['predicted']:.3f}" if d else "–",
                    f"{d['err']:+.1%}" if d else "–", f"{d['loo_predicted']:.3f}" if d else "–",
                    f"{d['loo_err']:+.1%}" if d else "–",
                    f"{t['mb']:.2f} / {t['mb_pred']:.2f}" if t and t["mb"] == t["mb"] else "–",
                    f"{t['fixed']:.2f} / {t['fixed_pred']:.2f}" if t and t["fixed"] == t["fixed"] else "–"])
    return out, fit, fitted


def ranking_groups(rows: Sequence[Row]) -> list[list[Row]]:
    """Reference rows with the same model, node count, GBS and sequence, in groups of >= 2 distinct layouts."""
    by: dict[tuple[str, int, int, int], list[Row]] = {}
    for r in rows:
        by.setdefault((r.model, r.nodes, r.gbs, r.seq), []).append(r)
    out = []
    for rs in by.values():
        lays = {(lay.label, lay.variant) for lay in map(layout_from_row, rs)}
        if len(lays) >= 2:
            out.append(rs)
    return out


def ranking_check(cluster: Cluster, a: Assumptions, rows: Sequence[Row] | None = None) -> list[dict[str, Any]]:
    """Per group of ``ranking_groups``: the measured order (fastest first; OOM and hung runs last) beside the
    planner's (predicted samples/s; predicted OOM last), and whether they agree."""
    rows = rows if rows is not None else load_reference(DEFAULT_REFERENCE)
    out = []
    for rs in ranking_groups(rows):
        def name(r: Row) -> str:
            lay = layout_from_row(r, cluster.tiles_per_node)
            return f"{lay.label} ({lay.variant})"

        measured = sorted(rs, key=lambda r: (r.status != "ok", -(r.sps or 0), r.run))
        pred: dict[str, tuple[bool, float]] = {}
        for r in rs:
            lay = layout_from_row(r, cluster.tiles_per_node)
            mem = ds_memory(r.model, lay, cluster, a, r.seq)
            oom = not mem.fits and not mem.uncertain  # uncertain: the model cannot say it goes last
            pred[r.run] = (oom, step_time(r.model, lay, cluster, a, r.seq).sps)
        planner = sorted(rs, key=lambda r: (pred[r.run][0], -pred[r.run][1], r.run))
        out.append({
            "group": f"{rs[0].model}, {rs[0].nodes} nodes, GBS {rs[0].gbs}, seq {rs[0].seq}",
            "measured": [f"{name(r)}: " + (f"{r.sps:.3f}" if r.status == "ok" and r.sps else r.status.upper())
                         for r in measured],
            "planner": [f"{name(r)}: " + ("OOM" if pred[r.run][0] else f"{pred[r.run][1]:.3f}") for r in planner],
            "agree": [r.run for r in measured] == [r.run for r in planner],
        })
    return out


def validation_markdown(cluster: Cluster | None = None, a: Assumptions | None = None) -> str:
    """Predicted vs measured for every reference row, as Markdown (for the compare report)."""
    c = cluster or load_cluster("aurora")
    return _validation_md(*validate(c, a), c)


def _validation_md(rows: list[list[str]], fit: Fit, fitted: Assumptions, c: Cluster) -> str:
    return (
        "## Layout planner vs the study\n\n"
        + _md_table(VALID_HEAD, rows)
        + f"\nFitted on {len(fit.rows)} measured rows: "
        + ", ".join(f"`{k}` = {v:.3f}" for k, v in fit.params.items())
        + f". RMS log error {fit.rms_log:.3f}; max |error| {fit.max_err:.1%}; leave-one-out |error| mean "
        f"{fit.loo_mean:.1%}, max {fit.loo_max:.1%}. Memory: DeepSpeed model on {c.name} "
        f"({c.usable_bytes / GB:.1f} GB usable per tile), its error ±{fitted.mem_err_states:.0%} of the model "
        f"states and buckets, ±{fitted.mem_err_act:.0%} of the activations (benchmarks/ds_memory_check.py); "
        "model states beside DeepSpeed's own estimator "
        "(`estimate_zero2/3_model_states_mem_needs`, no offload). Step-time terms: per-microbatch time and fixed "
        "per-step part, measured from the study's GAS sweeps (step = (GAS + PP - 1) x microbatch + fixed) and "
        "modelled. Hangs (status `hang`) are not modelled: the memory model can only say whether the layout "
        "fits.\n\n### ZeRO-3+hpZ fixed per-step part against DP\n\n"
        + "\n".join(f"- {ln}" for ln in zero3_trend(load_reference(DEFAULT_REFERENCE), c, fitted))
        + "\n\n### Ranking at a fixed global batch\n\n"
        "Reference rows with the same model, node count, GBS and sequence and at least two layouts: the measured "
        "order (fastest first; OOM and hung runs last) beside the planner's (predicted samples/s; predicted OOM "
        "last).\n\n" + _md_table(RANK_HEAD, ranking_rows(ranking_check(c, fitted)))
        + "\n### Assumptions\n\n" + assumptions_md(fitted, c, fit)
    )


RANK_HEAD = ("group", "measured order (samples/s)", "planner order (predicted samples/s)", "same order")


def ranking_rows(checks: Sequence[dict[str, Any]]) -> list[list[str]]:
    return [[g["group"], " > ".join(g["measured"]), " > ".join(g["planner"]), "yes" if g["agree"] else "NO"]
            for g in checks]


def plot_validation(fit: Fit, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    meas = [d["measured"] for d in fit.rows]
    ax.scatter(meas, [d["predicted"] for d in fit.rows], label="fit on all rows")
    ax.scatter(meas, [d["loo_predicted"] for d in fit.rows], marker="x", label="leave-one-out")
    lo, hi = min(meas) * 0.8, max(meas) * 1.2
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel("measured samples/s")
    ax.set_ylabel("predicted samples/s")
    ax.set_title("Step-time model vs the study")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# =============================================================================== choice (--mesh auto)
class NothingFits(ConfigError):
    """No layout fits at this global batch and sequence (the message names what would)."""


def host_cluster(devices: int) -> Cluster:
    """This host as one node of ``devices`` CPU devices sharing its memory and cores.

    Assumed figures, not fitted (there is no reference run on a CPU): ~50 GFLOPS and ~10 GB/s of memory
    bandwidth per core; the devices split the host's RAM (80 % of it usable) and its cores."""
    if devices < 1:
        raise ConfigError(f"{devices} devices: need at least one")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cores = os.cpu_count() or 1
    share = cores / devices
    return Cluster(name=f"host-cpu-{devices}dev", tiles_per_node=devices, tiles_per_gpu=1, mem_gb=ram / GB / devices,
                   usable_frac=0.8, peak_tflops=0.05 * share, hbm_bw_gbs=10.0 * share, gpu_bw_gbs=10.0,
                   intra_bw_gbs=10.0 * share, inter_bw_gbs=10.0 * cores, intra_lat_us=5.0, inter_lat_us=5.0)


@dataclass
class Decision:
    """The layout ``choose`` picked, what it weighed and why; ``to_dict`` is what a run records in meta.json."""

    pick: Layout
    runner_up: Layout | None
    framework: str
    config: Config  # the input config with the pick applied
    inputs: dict[str, Any]
    candidates: list[dict[str, Any]]
    why: str
    pick_info: dict[str, Any]
    runner_up_info: dict[str, Any] | None
    cluster_source: str
    memory_source: str

    def parallel(self) -> dict[str, Any]:
        """The parallel settings the pick sets (what a resumed run reapplies)."""
        p = self.config.parallel
        return {k: getattr(p, k) for k in ("mesh", "zero", "hpz", "mics", "mbs", "gas", "gbs", "remat",
                                           "remat_policy", "pipeline_schedule")}

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "cluster_source": self.cluster_source, "memory_source": self.memory_source,
                "pick": self.pick_info, "runner_up": self.runner_up_info, "why": self.why,
                "parallel": self.parallel(), "candidates": self.candidates}

    def lines(self) -> list[str]:
        """What a trainer prints: the pick and the runner-up, each with samples/s and memory margin."""
        out = [f"--mesh auto: {self.inputs['model']} at GBS {self.inputs['gbs']}, seq {self.inputs['seq']}, on "
               f"{self.inputs['devices']} devices; planned with {self.cluster_source}; memory verdict: "
               f"{self.memory_source}"]
        for tag, info in (("pick", self.pick_info), ("runner-up", self.runner_up_info)):
            if info:
                out.append(f"  {tag:<9} {info['layout']} ({info['variant']}): {info['sps']:.4g} samples/s predicted, "
                           f"memory margin {info['margin_gb']:+.2f} GB/device ({info['memory']})")
        out.append(f"  why: {self.why}")
        return out


def _info(p: Planned, jax_verdict: dict[str, Any] | None = None) -> dict[str, Any]:
    assert p.memory is not None and p.step is not None
    d: dict[str, Any] = {"layout": p.layout.label, "variant": p.layout.variant, "family": p.layout.family,
                         "gbs": p.layout.gbs, "sps": round(p.step.sps, 6),
                         "ds_mem_gb": round(p.memory.total / GB, 3), "ds_margin_gb": round(p.memory.margin / GB, 3),
                         "ds_err_gb": round(p.memory.err / GB, 3),
                         "ds_verdict": "uncertain" if p.memory.uncertain else "fits" if p.memory.fits else "OOM"}
    if jax_verdict is not None:
        d |= jax_verdict
        d["margin_gb"], d["memory"] = jax_verdict["jax_margin_gb"], "JAX " + jax_verdict["jax_verdict"]
    else:
        d["margin_gb"], d["memory"] = d["ds_margin_gb"], f"DeepSpeed model {d['ds_verdict']}, ±{d['ds_err_gb']} GB"
    return d


def _jax_verdict(res: dict[str, Any], usable: float, err: float) -> dict[str, Any]:
    if not res.get("ok"):
        return {"jax_verdict": "not compiled", "jax_reason": str(res.get("reason", "?"))[:200],
                "jax_margin_gb": float("nan")}
    peak = float(res["peak_bytes"])
    margin, e = usable - peak, err * peak
    verdict = "uncertain" if abs(margin) <= e else "fits" if margin > 0 else "OOM"
    return {"jax_verdict": verdict, "jax_peak_gb": round(peak / GB, 3), "jax_margin_gb": round(margin / GB, 3),
            "jax_err_gb": round(e / GB, 3), "jax_cached": bool(res.get("cached")), "jax_memory": res["memory"]}


def _torch_refusal(cfg: Config, lay: Layout) -> str:
    """'' if torch_ref runs ``lay`` (its own layout check), else why not."""
    from torch_ref.layouts import plan_layout

    try:
        plan_layout(lay.apply(cfg, "torch"), lay.ngpu)
    except ConfigError as e:
        return str(e).split(";")[0]
    return ""


def _ranked(planned: Sequence[Planned]) -> list[Planned]:
    """Clear fits by samples/s, then the uncertain ones: a verdict within the model's error never goes first."""
    seen: set[tuple[str, str]] = set()
    out = []
    for p in sorted((p for p in planned if p.fits or p.uncertain),
                    key=lambda p: (p.uncertain, -p.step.sps, p.layout.label, p.layout.variant)):  # type: ignore
        if (p.layout.label, p.layout.variant) not in seen:  # a mesh can belong to two families
            seen.add((p.layout.label, p.layout.variant))
            out.append(p)
    return out


def _nothing_fits(cfg: Config, model: str, nodes: int | None, cluster: Cluster, a: Assumptions, framework: str,
                  gbs: int, seq: int, why: str) -> NothingFits:
    """The error for a job nothing fits: the smallest node count that fits (a cluster job), else the largest GBS."""
    def any_fit(n: int, g: int | None) -> bool:
        try:
            ps = plan(model, n, cluster, a, seq, gbs=g)
        except ConfigError:
            return False
        return any(p.fits and (g is not None or p.layout.gbs <= gbs) and (
            framework != "torch" or not _torch_refusal(cfg, p.layout)) for p in ps)

    head = f"--mesh auto: no layout fits {cfg.model.name} at GBS {gbs}, seq {seq} on "
    where = f"{nodes} x {cluster.name} nodes" if nodes else f"{cluster.tiles_per_node} devices ({cluster.name})"
    if nodes:
        for n in range(nodes + 1, 8 * nodes + 33):
            if any_fit(n, gbs):
                return NothingFits(f"{head}{where} ({why}); the smallest node count that fits at this GBS and seq "
                                   f"is {n} (DeepSpeed memory model): --nodes {n}")
    fits = [p.layout.gbs for p in plan(model, nodes or 1, cluster, a, seq) if p.fits and p.layout.gbs < gbs]
    hint = (f"the largest GBS that fits on these {where} is {max(fits)} (--parallel.gbs={max(fits)}, DeepSpeed "
            "memory model)" if fits else "no global batch fits there: use more devices or a smaller model")
    return NothingFits(f"{head}{where} ({why}); {hint}")


def choose(cfg: Config, *, nodes: int | None = None, cluster: Cluster | None = None, framework: str = "jax",
           devices: int | None = None, top: int = 3, rounds: int = 3, assumptions: Assumptions | None = None,
           cache: Path | None = None) -> Decision:
    """The fastest layout that fits ``cfg`` at its global batch (``parallel.gbs``) and sequence.

    ``nodes`` + ``cluster``: a job on that many nodes (the step-time model fitted to the study's runs).
    Otherwise ``devices`` of this host (``host_cluster``, assumed figures) or of ``cluster``. The memory verdict
    comes from the framework that will run: torch -> the DeepSpeed model; jax -> the DeepSpeed model prunes what
    it calls OOM, then the ``top`` fastest are AOT-compiled (parallel processes, cached by config hash) and XLA's
    peak decides, up to ``rounds`` batches. A verdict within its model's error is never picked over a clear fit.
    Deterministic for the same inputs. Raises ConfigError (NothingFits when no layout fits)."""
    if framework not in ("jax", "torch"):
        raise ConfigError(f"framework {framework!r}: use 'jax' or 'torch'")
    gbs, seq = cfg.parallel.gbs, cfg.data.seq_len
    if gbs < 1:
        raise ConfigError(f"--mesh auto needs the global batch: parallel.gbs={gbs}; set --parallel.gbs=G (samples "
                          "per step, e.g. the study's 96 or 768), the planner then splits it into mbs x gas x dp")
    a = dataclasses.replace(assumptions or Assumptions())
    if nodes is not None:
        if nodes < 1:
            raise ConfigError(f"--nodes {nodes} must be >= 1")
        cluster = cluster or load_cluster("aurora")
        fit = calibrate(cluster=cluster, a=a, loo=False)
        a = dataclasses.replace(a, **fit.params)
        source = f"cluster description '{cluster.name}' ({cluster.describe()}), step-time model fitted to the study"
    elif cluster is not None:
        if not devices:
            raise ConfigError("--mesh auto without --nodes needs the number of devices this process sees")
        if devices % cluster.tiles_per_node:  # fewer or other than whole nodes: the visible devices as one node
            cluster = dataclasses.replace(cluster, name=f"{cluster.name}-{devices}dev", tiles_per_node=devices,
                                          tiles_per_gpu=math.gcd(devices, cluster.tiles_per_gpu))
        nodes = devices // cluster.tiles_per_node
        source = (f"cluster description '{cluster.name}' for the {devices} visible devices ({cluster.describe()}), "
                  "step-time model not fitted")
    else:
        if not devices:
            raise ConfigError("--mesh auto without --nodes needs the number of devices this process sees")
        cluster, nodes = host_cluster(devices), None
        source = (f"a description of this host ({cluster.describe()}; assumed figures, not measured), not a "
                  "cluster model")
    n_nodes = nodes or 1
    if nodes is None and cluster.name.startswith("host-cpu"):
        a.runtime_gb = 1.0 / cluster.tiles_per_node  # one process's runtime shared by its fake devices
    # planned without the run's name, steps, seed, ...: they change no memory, and the compile cache is keyed by
    # the config's hash
    from configs.schema import TrainConfig

    model = register_config(dataclasses.replace(cfg, train=TrainConfig(dtype=cfg.train.dtype,
                                                                       platform=cfg.train.platform)))
    check_gbs(model, n_nodes, cluster, gbs, flag="parallel.gbs")
    planned = [p for p in plan(model, n_nodes, cluster, a, seq, gbs=gbs) if not p.structural]
    refused: dict[str, str] = {}
    if framework == "torch":
        for p in planned:
            why = refused.setdefault(p.layout.label, _torch_refusal(cfg, p.layout))
            if why:
                p.reason, p.memory, p.step = f"not run by torch_ref: {why}", None, None
    ranked = _ranked(planned)
    inputs = {"model": cfg.model.name, "config_hash": cfg.hash(), "framework": framework, "gbs": gbs, "seq": seq,
              "nodes": nodes, "devices": n_nodes * cluster.tiles_per_node, "cluster": dataclasses.asdict(cluster),
              "assumptions": dataclasses.asdict(a)}
    considered: list[dict[str, Any]] = []
    if framework == "torch":
        memory_source = "DeepSpeed memory model (the framework that runs)"
        if not ranked:
            raise _nothing_fits(cfg, model, nodes, cluster, a, framework, gbs, seq, "DeepSpeed memory model")
        infos = [_info(p) for p in ranked]
        considered = infos[:20]
        pick_i = 0
        run_i = next((i for i in range(1, len(ranked)) if ranked[i].layout.label != ranked[0].layout.label), None)
        n_clear = sum(not p.uncertain for p in ranked)
        faster_unsure = [p for p in ranked if p.uncertain and p.step.sps > ranked[0].step.sps]  # type: ignore
        why = (f"fastest predicted of the {n_clear} layouts at GBS {gbs} that the DeepSpeed model says clearly fit"
               + (" (none clearly fits: the pick is within the model's error)" if ranked[0].uncertain else "")
               + (f"; {len(faster_unsure)} faster ones are within the model's error and not picked, fastest "
                  f"{faster_unsure[0].layout.label} ({faster_unsure[0].layout.variant})" if faster_unsure else ""))
        chosen = [(ranked[i], infos[i]) for i in (pick_i, run_i) if i is not None]
    else:
        memory_source = (f"JAX AOT-compiled peak (XLA:CPU memory_analysis, ±{a.mem_err_jax:.0%}) of the top "
                         "candidates; the DeepSpeed model only pruned")
        order = sorted(ranked, key=lambda p: (-p.step.sps, p.layout.label, p.layout.variant))  # type: ignore
        done: dict[int, dict[str, Any]] = {}
        for _ in range(rounds):
            todo: list[int] = []
            labels = {order[i].layout.label for i in done}
            for i, p in enumerate(order):  # first the best variant of each mesh not tried, then the rest by speed
                if i not in done and p.layout.label not in labels and len(todo) < top:
                    todo.append(i)
                    labels.add(p.layout.label)
            for i in range(len(order)):
                if len(todo) < top and i not in done and i not in todo:
                    todo.append(i)
            if not todo:
                break
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1))) as ex:
                results = list(ex.map(lambda i: jax_memory(model, order[i].layout, seq, cache=cache), todo))
            for i, res in zip(todo, results, strict=True):
                order[i].jax = res
                done[i] = _jax_verdict(res, cluster.usable_bytes, a.mem_err_jax)
            if any(v["jax_verdict"] == "fits" for v in done.values()):
                break
        considered = [_info(order[i], done[i]) for i in sorted(done)]
        clear = sorted(i for i, v in done.items() if v["jax_verdict"] == "fits")
        unsure = sorted(i for i, v in done.items() if v["jax_verdict"] == "uncertain")
        best = clear + unsure  # order is by speed: a clear fit always before one within the error
        if not best:
            why = "; ".join(f"{order[i].layout.label}: JAX {v['jax_verdict']}" + (
                f" by {-v['jax_margin_gb']:.1f} GB" if v["jax_verdict"] == "OOM" else "") for i, v in done.items())
            raise _nothing_fits(cfg, model, nodes, cluster, a, framework, gbs, seq,
                                why or "the DeepSpeed model rejects every layout")
        faster = [f"{order[i].layout.label} (JAX {done[i]['jax_verdict']})" for i in sorted(done) if i < best[0]]
        why = (f"fastest predicted of the {len(done)} compiled (of {len(order)} the DeepSpeed model did not reject) "
               "whose JAX compiled peak fits" + (" (none clearly fits: the pick is within the error)"
                                                  if not clear else "")
               + (f"; faster but not a clear fit: {', '.join(faster)}" if faster else ""))
        chosen = [(order[i], _info(order[i], done[i])) for i in best[:2]]
    pick, pick_info = chosen[0]
    runner, runner_info = chosen[1] if len(chosen) > 1 else (None, None)
    return Decision(pick.layout, runner.layout if runner else None, framework, pick.layout.apply(cfg, framework),
                    inputs, considered, why, pick_info, runner_info, source, memory_source)


def auto_layout(cfg: Config, *, framework: str, nodes: int | None = None, cluster: str | None = None,
                devices: int | None = None, recorded: dict[str, Any] | None = None, cache: Path | None = None
                ) -> tuple[Config, dict[str, Any], list[str]]:
    """``--mesh auto`` for a trainer: (cfg with the chosen layout, the record for meta.json, lines to print).

    ``recorded`` (a resumed run's ``configs.rundir.recorded_layout``): its layout is reused, nothing re-planned."""
    if recorded is not None:
        was = recorded["parallel"].get("gbs")
        if cfg.parallel.gbs and was and cfg.parallel.gbs != was:
            raise ConfigError(f"parallel.gbs={cfg.parallel.gbs}, but the run being resumed was planned at GBS {was}; "
                              f"a resume keeps its layout and batch: drop --parallel.gbs or give {was}")
        par = dataclasses.replace(cfg.parallel, **{k: v for k, v in recorded["parallel"].items()
                                                   if k in {f.name for f in dataclasses.fields(cfg.parallel)}})
        rec = dict(recorded.get("decision") or {}, reused_on_resume=True)
        return dataclasses.replace(cfg, parallel=par), rec, [
            f"--mesh auto: resuming with the run's recorded layout {par.mesh} ZeRO-{par.zero}"
            + (" hpZ" if par.hpz else "") + (" MiCS" if par.mics else "")
            + f", mbs {par.mbs} gas {par.gas}, GBS {par.gbs} (not re-planned)"]
    cl = load_cluster(cluster or "aurora") if nodes is not None or cluster is not None else None
    d = choose(cfg, nodes=nodes, cluster=cl, framework=framework, devices=devices, cache=cache)
    return d.config, d.to_dict(), d.lines()


# =============================================================================== CLI
def _split_overrides(rest: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    cluster, assume = {}, {}
    it = iter(rest)
    for arg in it:
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"unrecognised argument {arg!r}; overrides look like --cluster.mem_gb=80 or "
                              "--assume.eta=0.3")
        key, _, val = arg[2:].partition("=")
        if not _:
            val = next(it, None)  # type: ignore[assignment]
            if val is None:
                raise ConfigError(f"{arg} has no value; write {arg}=VALUE")
        section, _, name = key.partition(".")
        if section == "cluster":
            cluster[name] = val
        elif section == "assume":
            assume[name] = val
        else:
            raise ConfigError(f"unknown override section {section!r} in {arg!r}; use --cluster.KEY or --assume.KEY")
    return cluster, assume


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m compare.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama2-70b", help="a configs/presets name (llama2-70b, auroragpt-42b-tp6)")
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--cluster", default="aurora", help="compare/clusters/<name>.toml or a path")
    ap.add_argument("--seq", type=int, default=SEQ, help="sequence length (default: the study's 4096)")
    ap.add_argument("--gbs", type=int, default=None,
                    help="rank only layouts with mbs x gas x dp == GBS (default: the best per global batch)")
    ap.add_argument("--mesh", help="plan one layout only, e.g. pipeline=8,data=6,tensor=2")
    ap.add_argument("--zero", type=int, default=None, help="with --mesh (default 1 with a pipeline, else 3)")
    ap.add_argument("--hpz", action="store_true", help="with --mesh: ZeRO-3 hpZ over the fsdp axis")
    ap.add_argument("--mics", action="store_true", help="with --mesh: ZeRO-3 MiCS over the fsdp axis")
    ap.add_argument("--mbs", type=int, default=1)
    ap.add_argument("--gas", type=int, default=None, help="with --mesh (default: every choice)")
    ap.add_argument("--no-remat", action="store_true", help="with --mesh: no activation checkpointing")
    ap.add_argument("--schedule", choices=("1f1b", "gpipe"), default="1f1b",
                    help="with --mesh: pipeline schedule (DeepSpeed runs 1f1b; gpipe holds every microbatch)")
    ap.add_argument("--jax", action="store_true", help="also AOT-compile the top layouts on fake CPU devices")
    ap.add_argument("--jax-top", type=int, default=3, help="how many of the ranked layouts to compile with --jax")
    ap.add_argument("--all", action="store_true", help="list every fitting variant, not the best per layout")
    ap.add_argument("--no-fit", action="store_true", help="use the --assume values as they are")
    ap.add_argument("--validate", action="store_true", help="predicted vs measured for the reference CSV")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--jax-worker", help=argparse.SUPPRESS)
    ap.add_argument("--jax-measure", help=argparse.SUPPRESS)
    return ap


def _single_layouts(args: argparse.Namespace, nodes: int, cluster: Cluster) -> list[Layout]:
    from configs import parse_mesh

    shape = parse_mesh(args.mesh, nodes * cluster.tiles_per_node)
    n = math.prod(shape.values())
    if n != nodes * cluster.tiles_per_node:
        raise ConfigError(f"mesh {args.mesh!r} needs {n} tiles but {nodes} nodes x {cluster.tiles_per_node} tiles "
                          f"= {nodes * cluster.tiles_per_node}; change --nodes or the mesh so they match")
    zero = args.zero if args.zero is not None else (1 if shape["pipeline"] > 1 else 3)
    base = Layout("--mesh", pp=shape["pipeline"], data=shape["data"], fsdp=shape["fsdp"], tp=shape["tensor"],
                  zero=zero, hpz=args.hpz, mics=args.mics, mbs=args.mbs, remat=not args.no_remat,
                  schedule=args.schedule)
    if args.gbs and not args.gas:  # the batch is given: the GAS that makes it, if there is one
        per = args.mbs * base.dp
        if args.gbs % per:
            raise ConfigError(f"--gbs {args.gbs} is not a multiple of mbs x dp = {args.mbs} x {base.dp} = {per} for "
                              f"mesh {args.mesh!r}; use a multiple of {per} or another --mbs/--mesh")
        return [dataclasses.replace(base, gas=args.gbs // per)]
    return [dataclasses.replace(base, gas=g) for g in ((args.gas,) if args.gas else GAS_CHOICES)]


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.jax_worker:
        return _jax_worker(args.jax_worker)
    if args.jax_measure:
        return _jax_measure_worker(args.jax_measure)
    try:
        c_over, a_over = _split_overrides(rest)
        cluster = load_cluster(args.cluster, c_over)
        a = apply_assumptions(Assumptions(), a_over)
        if args.validate:
            return _main_validate(args, cluster, a)
        load_config(args.model)  # unknown preset -> ConfigError with the list
        if args.nodes < 1:
            raise ConfigError(f"--nodes {args.nodes} must be >= 1")
        if args.seq < 1:
            raise ConfigError(f"--seq {args.seq} must be >= 1 (tokens per sample)")
        if args.gbs is not None:
            check_gbs(args.model, args.nodes, cluster, args.gbs)
        fit = None
        if not args.no_fit:
            fit = calibrate(cluster=cluster, a=a, loo=False)
            a = dataclasses.replace(a, **{k: v for k, v in fit.params.items() if k not in a_over})
        layouts = _single_layouts(args, args.nodes, cluster) if args.mesh else None
        planned = plan(args.model, args.nodes, cluster, a, args.seq, layouts, args.gbs)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    impossible = "" if args.mesh else structural_summary(planned)
    if not args.mesh:  # summarised in one line; a layout asked for by --mesh keeps its reason in the list
        planned = [p for p in planned if not p.structural]
    grouped = args.gbs is None and not args.mesh and not args.all
    ok, rejected = (([p for p in planned if p.fits], [p for p in planned if not p.fits]) if args.all or args.mesh
                    else best_per_mesh(planned))
    if grouped:  # one ranking per global batch: a larger batch is not a faster layout
        ok = best_per_gbs(planned)
    if args.jax:
        for p in ok[: args.jax_top] + ([p for p in rejected if p.memory][:1] if args.mesh else []):
            print(f"JAX AOT compile {p.layout.label} ({p.layout.variant}) on {p.layout.ngpu} fake CPU devices ...",
                  file=sys.stderr)
            p.jax = jax_memory(args.model, p.layout, args.seq)
    title = (f"{args.model} on {args.nodes} x {cluster.name} nodes ({args.nodes * cluster.tiles_per_node} tiles), "
             f"seq {args.seq}, " + (f"GBS {args.gbs}" if args.gbs else "best 3 layouts per GBS"))
    rows = plan_rows(ok, per_gbs=grouped)
    uncertain = [p for p in rejected if p.uncertain]  # within the memory model's error: neither picks nor rejections
    rejected = [p for p in rejected if not p.uncertain]
    unc_rows = [[p.layout.family, p.layout.label, p.layout.variant, str(p.layout.gbs), p.reason] for p in uncertain]
    rej_rows = [[p.layout.family, p.layout.label, p.layout.variant, str(p.layout.gbs), p.reason] for p in rejected]
    rej_head = ("family", "layout", "variant", "GBS", "reason")
    notes = ["Memory: DeepSpeed = analytic model of the reference; JAX = XLA:CPU memory_analysis of the AOT-compiled "
             "step on fake CPU devices (a CPU-compiler estimate, not the Intel GPU compiler's; JAX keeps fp32 params).",
             "TFLOPS/tile: Megatron-LM model FLOPs (no recompute term). Fitted: "
             + ", ".join(f"{k}={getattr(a, k):.3f}" for k in Assumptions.FITTED)] + ([impossible] if impossible else [])
    _print_rich(title, PLAN_HEAD, rows[:40 if grouped else 25], notes)
    if unc_rows:
        _print_rich("uncertain: the memory verdict is within the model's error (not picks)",
                    rej_head, unc_rows[:30])
    _print_rich("rejected (could be built; do not fit)", rej_head, rej_rows[:30])
    args.out.mkdir(parents=True, exist_ok=True)
    md = [f"# Layout plan: {title}\n", _md_table(PLAN_HEAD, rows),
          "\n## Uncertain (memory verdict within the model's error; not picks)\n",
          _md_table(rej_head, unc_rows), "\n## Rejected\n",
          _md_table(rej_head, rej_rows), "\n" + "\n\n".join(notes) + "\n"]
    if ok:
        md += [f"\n## Breakdown of #1: {ok[0].layout.label} ({ok[0].layout.variant})\n", memory_breakdown(ok[0]),
               "\n", time_breakdown(ok[0])]
    md += ["\n## Assumptions\n", assumptions_md(a, cluster, fit)]
    stem = f"plan_{args.model}_{args.nodes}n_{cluster.name}" + (f"_gbs{args.gbs}" if args.gbs else "")
    (args.out / f"{stem}.md").write_text("".join(md))
    (args.out / f"{stem}.json").write_text(json.dumps({
        "model": args.model, "nodes": args.nodes, "gbs": args.gbs, "seq": args.seq,
        "cluster": dataclasses.asdict(cluster), "impossible": impossible,
        "assumptions": dataclasses.asdict(a),
        "ranked": [{"layout": p.layout.label, "variant": p.layout.variant, "gbs": p.layout.gbs,
                    "ds_mem_gb": p.memory.total / GB if p.memory else None,
                    "memory_verdict": p.memory.verdict() if p.memory else None, "sps": p.step.sps if p.step else None,
                    "tflops": tflops_per_tile(p.step, p.layout) if p.step else None, "jax": p.jax} for p in ok],
        "uncertain": [{"layout": p.layout.label, "variant": p.layout.variant, "gbs": p.layout.gbs,
                       "reason": p.reason} for p in uncertain],
        "rejected": [{"layout": p.layout.label, "variant": p.layout.variant, "gbs": p.layout.gbs,
                      "reason": p.reason} for p in rejected],
    }, indent=1, default=str) + "\n")
    # grouped: the best of each GBS, so the plot reaches the large batches
    shown = [p for i, p in enumerate(ok) if not grouped or i == 0 or ok[i - 1].layout.gbs != p.layout.gbs]
    png = plot_plan(shown, uncertain + rejected, cluster, args.out / f"{stem}.png",
                    title.replace("best 3 layouts per GBS", "best layout per GBS") if grouped else title)
    if ok:
        print(memory_breakdown(ok[0]))
        print(time_breakdown(ok[0]))
    elif not rejected and not uncertain:
        print("error: no layout to plan", file=sys.stderr)
        return 2
    print(f"wrote {args.out / (stem + '.md')}, {stem}.json, {png.name}")
    return 0


def _main_validate(args: argparse.Namespace, cluster: Cluster, a: Assumptions) -> int:
    rows, fit, fitted = validate(cluster, a)
    notes = ["fitted: " + ", ".join(f"{k}={v:.3f}" for k, v in fit.params.items()),
             f"per-row |err| max {fit.max_err:.1%}; leave-one-out |err| mean {fit.loo_mean:.1%}, max {fit.loo_max:.1%}",
             f"memory model error ±{fitted.mem_err_states:.0%} of model states and buckets, ±{fitted.mem_err_act:.0%} "
             "of activations (benchmarks/ds_memory_check.py)",
             "ZeRO-3+hpZ fixed per-step part against DP (study rows at GAS 1, then the model):",
             *(f"  {ln}" for ln in zero3_trend(load_reference(DEFAULT_REFERENCE), cluster, fitted))]
    _print_rich("planner vs the study (reference CSV)", VALID_HEAD, rows, notes)
    checks = ranking_check(cluster, fitted)
    _print_rich("ranking at a fixed global batch: measured vs planner order", RANK_HEAD, ranking_rows(checks),
                [f"{sum(g['agree'] for g in checks)} of {len(checks)} groups in the same order"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "validation.md").write_text(_validation_md(rows, fit, fitted, cluster))
    png = plot_validation(fit, args.out / "validation.png")
    print(f"wrote {args.out / 'validation.md'}, {png.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
