"""The step-time model: compute at a fraction of peak plus the collectives each layout runs (hierarchical ring
costs on the link they cross), not hidden by overlap, over the pipeline's (m + p - 1) microbatch slots."""

from __future__ import annotations

from dataclasses import dataclass, field

from compare.cluster import Cluster
from compare.plan.assumptions import GB, SEQ, Assumptions
from compare.plan.layout import Layout
from compare.plan.memory import Term, model_config, stage_params
from compare.plan.topology import Group, group_of


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
