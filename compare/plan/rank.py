"""The candidate layouts of a model on some nodes (meshes x batch splits x checkpointing), each evaluated
(buildable, DeepSpeed memory verdict, step time) and ranked by predicted samples/s."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from compare.cluster import Cluster
from compare.plan.assumptions import GB, SEQ, Assumptions
from compare.plan.layout import Layout
from compare.plan.memory import MemoryEstimate, ds_memory
from compare.plan.timing import StepEstimate, step_time
from configs import ConfigError, validate_config

GAS_CHOICES = (1, 2, 4, 8, 16, 32)


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
