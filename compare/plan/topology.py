"""Which ranks a collective spans: the group of one rank along mesh axes, and the link its intra-node part uses."""

from __future__ import annotations

from dataclasses import dataclass

from compare.cluster import Cluster
from compare.plan.layout import Layout


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
    """The group of rank 0 along ``axes`` (the trainers' rank map: ``configs.Layout.group``)."""
    ranks = layout.shape.group(axes)
    nodes = {r // cluster.tiles_per_node for r in ranks}
    pkgs = {r // cluster.tiles_per_gpu for r in ranks}
    k = len(nodes)
    g = len(ranks) // k
    return Group(axes, len(ranks), k, g, "package" if len(pkgs) == k else "node")
