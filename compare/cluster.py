"""Cluster descriptions for the layout planner: a dataclass plus TOML presets in ``compare/clusters/``.

    load_cluster("aurora", {"mem_gb": "80"})      # preset + overrides (CLI: --cluster.mem_gb=80)
    load_cluster("path/to/my_cluster.toml")

A "tile" is one device the framework sees (Aurora: half a PVC GPU; H100: one GPU). Bandwidths are
nominal and per direction; the planner multiplies all of them by one fitted efficiency.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from configs import ConfigError
from configs.schema import coerce_value

CLUSTER_DIR = Path(__file__).parent / "clusters"


@dataclass(frozen=True)
class Cluster:
    name: str = "aurora"
    tiles_per_node: int = 12
    tiles_per_gpu: int = 2  # tiles sharing one package; groups inside one package use gpu_bw_gbs
    mem_gb: float = 64.0  # per tile, 1e9 bytes
    usable_frac: float = 0.97  # fraction of mem_gb an application can allocate
    peak_tflops: float = 298.0  # bf16 dense, per tile
    hbm_bw_gbs: float = 1600.0  # per tile (memory-bound optimizer step)
    gpu_bw_gbs: float = 200.0  # tile <-> tile inside one package, per direction
    intra_bw_gbs: float = 50.0  # per tile to other packages in the node, per direction
    inter_bw_gbs: float = 200.0  # per node, all NICs together, per direction
    intra_lat_us: float = 10.0  # per hop of a ring inside a node
    inter_lat_us: float = 20.0  # per hop of a ring across nodes

    @property
    def usable_bytes(self) -> float:
        return self.mem_gb * 1e9 * self.usable_frac

    def describe(self) -> str:
        return (f"{self.name}: {self.tiles_per_node} tiles/node ({self.tiles_per_gpu}/package), "
                f"{self.mem_gb:g} GB x {self.usable_frac:g} usable, {self.peak_tflops:g} TFLOPS bf16, "
                f"HBM {self.hbm_bw_gbs:g} GB/s, links: package {self.gpu_bw_gbs:g}, "
                f"node {self.intra_bw_gbs:g} GB/s/tile, "
                f"network {self.inter_bw_gbs:g} GB/s/node; latency {self.intra_lat_us:g}/{self.inter_lat_us:g} us")


def list_clusters() -> list[str]:
    return sorted(p.stem for p in CLUSTER_DIR.glob("*.toml"))


def load_cluster(name: str = "aurora", overrides: dict[str, Any] | None = None) -> Cluster:
    """A preset name (``compare/clusters/<name>.toml``) or a .toml path, then ``overrides`` (key -> value)."""
    path = Path(name) if name.endswith(".toml") else CLUSTER_DIR / f"{name}.toml"
    if not path.is_file():
        hint = difflib.get_close_matches(name, list_clusters(), n=1)
        raise ConfigError(f"unknown cluster {name!r}; presets are {', '.join(list_clusters())}"
                          + (f" (did you mean {hint[0]!r}?)" if hint else "") + ", or give a path to a .toml file")
    with path.open("rb") as f:
        data: dict[str, Any] = tomllib.load(f)
    data.setdefault("name", path.stem)
    data.update(overrides or {})
    hints = typing.get_type_hints(Cluster)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in hints:
            hint = difflib.get_close_matches(key, list(hints), n=1)
            raise ConfigError(f"unknown cluster key {key!r} (in {path} or --cluster.*)"
                              + (f"; did you mean {hint[0]!r}?" if hint else f"; keys: {', '.join(hints)}"))
        values[key] = coerce_value(value, hints[key], f"cluster.{key}")
    cluster = Cluster(**values)
    for f in dataclasses.fields(cluster):
        v = getattr(cluster, f.name)
        if f.name != "name" and not v > 0:
            raise ConfigError(f"cluster.{f.name}={v} must be > 0")
    if cluster.usable_frac > 1:
        raise ConfigError(f"cluster.usable_frac={cluster.usable_frac} must be <= 1")
    if cluster.tiles_per_node % cluster.tiles_per_gpu:
        raise ConfigError(f"cluster.tiles_per_node={cluster.tiles_per_node} is not a multiple of "
                          f"cluster.tiles_per_gpu={cluster.tiles_per_gpu}")
    return cluster
