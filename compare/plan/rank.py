"""The candidate layouts of a model on some nodes (meshes x batch splits x checkpointing), each evaluated
(buildable, which frameworks run it, DeepSpeed memory verdict where DeepSpeed runs it, step time) and ranked by
predicted samples/s."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from compare.cluster import Cluster
from compare.plan.assumptions import GB, SEQ, Assumptions
from compare.plan.jax_probe import jax_verdict
from compare.plan.layout import Layout, planned_dtype
from compare.plan.memory import MemoryEstimate, ds_memory
from compare.plan.timing import StepEstimate, step_time
from configs import ConfigError, validate_config
from configs import Layout as MeshLayout

GAS_CHOICES = (1, 2, 4, 8, 16, 32)


FRAMEWORKS = ("deepspeed", "torch_ref", "jax")


MBS_CHOICES = (1, 2)


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
            if shard == T:  # one group over every tile is the fsdp x tensor mesh above
                continue
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
    reason: str = ""  # why it is rejected ("" = fits, or not judged yet: ``unprobed``)
    memory: MemoryEstimate | None = None  # the DeepSpeed model's; None where DeepSpeed does not run the layout
    step: StepEstimate | None = None
    jax: dict[str, Any] | None = None
    structural: bool = False  # the shape cannot be built at all (indivisible heads/layers, batch, ...)
    runs_on: tuple[str, ...] = ()  # the FRAMEWORKS that run it (empty when it cannot be built)
    ds_refusal: str = ""  # why DeepSpeed does not run it ('' where it does): JAX's compiled peak judges it then
    jax_judged: dict[str, Any] | None = None  # ``jax_verdict`` of ``jax`` (set by ``judge_jax``)

    @property
    def jax_only(self) -> bool:
        """DeepSpeed does not run it: no DeepSpeed memory figure, only JAX's compiled peak can judge it."""
        return bool(self.ds_refusal)

    @property
    def unprobed(self) -> bool:
        """JAX-only and not compiled yet: no memory verdict at all, so neither a fit nor a rejection."""
        return self.jax_only and self.jax is None and not self.reason

    @property
    def fits(self) -> bool:
        return not self.reason and not self.unprobed

    @property
    def uncertain(self) -> bool:
        return self.reason.startswith("uncertain")

    def judge_jax(self, res: dict[str, Any], usable: float, err: float) -> dict[str, Any]:
        """Record ``jax_memory``'s result and return its verdict (``jax_verdict``); it is the memory verdict of a
        JAX-only layout (``reason`` set from it), beside the DeepSpeed model's verdict of the others."""
        self.jax = res
        self.jax_judged = v = jax_verdict(res, usable, err)
        if self.jax_only:
            self.reason = _jax_reason(v, usable)
        return v


def _jax_reason(v: dict[str, Any], usable: float) -> str:
    """The ``reason`` of a JAX-only layout from its JAX verdict ('' = fits)."""
    if v["jax_verdict"] == "not compiled":
        return f"not compiled (JAX): {v['jax_reason'][:120]}"
    figures = (f"{v['jax_peak_gb']:.1f} GB of {usable / GB:.1f} GB usable, {v['jax_margin_gb']:+.1f} GB margin, "
               f"error ±{v['jax_err_gb']:.1f} GB")
    if v["jax_verdict"] == "OOM":
        return f"OOM (JAX compiled peak): {figures}"
    return f"uncertain (JAX compiled peak): {figures}" if v["jax_verdict"] == "uncertain" else ""


@functools.lru_cache(maxsize=1024)  # a few meshes, thousands of batch splits
def _refusals(shape: MeshLayout, dtype: str) -> tuple[str, str, str]:
    from torch_ref.layouts import deepspeed_refusal, torch_ref_refusal  # configs only: no torch imported

    return deepspeed_refusal(shape, dtype), torch_ref_refusal(shape, dtype), ""


def runs_on(model: str, layout: Layout) -> tuple[tuple[str, ...], str]:
    """(the FRAMEWORKS that run ``layout`` of ``model``, why DeepSpeed does not: '' where it does).

    DeepSpeed: its engines' rules (``torch_ref.layouts.deepspeed_refusal``; pipeline x tensor as
    Megatron-DeepSpeed runs it); torch_ref: those and its own limits; JAX: every mesh that can be built."""
    why = _refusals(layout.shape, planned_dtype(model))
    return tuple(f for f, w in zip(FRAMEWORKS, why, strict=True) if not w), why[0].split(";")[0]


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
    frameworks, not_ds = runs_on(model, layout)
    if not_ds:  # no DeepSpeed figure for what DeepSpeed does not run: unjudged until JAX compiles it
        return Planned(layout, "", None, step_time(model, layout, cluster, a, seq), runs_on=frameworks,
                       ds_refusal=not_ds)
    mem = ds_memory(model, layout, cluster, a, seq)
    p = Planned(layout, "", mem, step_time(model, layout, cluster, a, seq), runs_on=frameworks)
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
    """Every candidate evaluated; fitting ones first, by predicted samples/s (JAX-only layouts not compiled yet
    are not fits: ``Planned.unprobed``).

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


def unprobed_per_mesh(planned: Sequence[Planned], top: int | None = None) -> list[Planned]:
    """The fastest variant of each mesh with no memory verdict yet (``Planned.unprobed``), by GBS then predicted
    samples/s; ``top`` of them per GBS."""
    best: dict[tuple[int, str], Planned] = {}
    for p in planned:
        key = (p.layout.gbs, p.layout.label)
        if p.unprobed and (key not in best or p.step.sps > best[key].step.sps):  # type: ignore[union-attr]
            best[key] = p
    out: list[Planned] = []
    shown: dict[int, int] = {}
    for p in sorted(best.values(), key=lambda p: (p.layout.gbs, -p.step.sps)):  # type: ignore[union-attr]
        shown[p.layout.gbs] = shown.get(p.layout.gbs, 0) + 1
        if top is None or shown[p.layout.gbs] <= top:
            out.append(p)
    return out


def best_per_mesh(planned: Sequence[Planned]) -> tuple[list[Planned], list[Planned]]:
    """(best fitting variant of each mesh/ZeRO layout, one rejection per layout that never fits); layouts with
    no memory verdict (``Planned.unprobed``) are neither."""
    best: dict[str, Planned] = {}
    rejected: dict[str, Planned] = {}
    for p in planned:
        key = p.layout.label
        if p.unprobed:
            continue
        if p.fits:
            if key not in best or p.step.sps > best[key].step.sps:  # type: ignore[union-attr]
                best[key] = p
        elif key not in rejected or (p.memory and rejected[key].memory
                                     and p.memory.total < rejected[key].memory.total):  # type: ignore[union-attr]
            rejected[key] = p
    ok = sorted(best.values(), key=lambda p: -p.step.sps)  # type: ignore[union-attr]
    return ok, [p for k, p in rejected.items() if k not in best]
