"""The DeepSpeed memory model: every term one tile holds (model states, buckets, activations by schedule), with
the model's error, and its model states beside DeepSpeed's own estimator."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from compare.cluster import Cluster
from compare.plan.assumptions import GB, SEQ, Assumptions
from compare.plan.layout import Layout, _preset
from configs import ModelConfig

# DeepSpeed's documented defaults, used where the generated config leaves a key out (ZeRO-1/2).
DS_DEFAULT_REDUCE_BUCKET = 5e8


DS_DEFAULT_ALLGATHER_BUCKET = 5e8


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
