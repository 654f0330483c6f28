"""Which torch/DeepSpeed machinery runs a config's layout, decided (and refused) before any worker starts.

Ranks are laid out as the JAX mesh: (pipeline, data, fsdp, tensor), ``tensor`` innermost, so
rank = ((p * data + d) * fsdp + f) * tensor + t and the data-parallel rank is d * fsdp + f.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

from configs import Config, ConfigError, validate_config
from configs.cli import layout_label

FSDP2_MICS = "mics (torch FSDP2 hybrid shard, not DeepSpeed)"
DEEPSPEED_MICS = "mics (DeepSpeed MiCS, mics_shard_size)"
TP_AUTOTP = "tp (DeepSpeed AutoTP training, tensor_parallel.autotp_size)"


def deepspeed_has_mics() -> bool:
    """DeepSpeed removed MiCS in 0.19.7; older installs still have ``deepspeed.runtime.zero.mics``."""
    try:
        return importlib.util.find_spec("deepspeed.runtime.zero.mics") is not None
    except ModuleNotFoundError:
        return False


@dataclass(frozen=True)
class Layout:
    label: str  # short name, the same vocabulary as jax_impl.train.layout_name ("pp2+zero1", "zero3+hpz")
    engine: str  # deepspeed | deepspeed-pipe | fsdp2-mics | deepspeed-mics
    description: str  # what really runs, for meta.json
    mesh: dict[str, int]
    world_size: int

    @property
    def dp(self) -> int:
        return self.mesh["data"] * self.mesh["fsdp"]

    def coords(self, rank: int) -> dict[str, int]:
        """Mesh coordinates of a global rank (tensor innermost)."""
        out, rest = {}, rank
        for axis in ("tensor", "fsdp", "data", "pipeline"):
            out[axis], rest = rest % self.mesh[axis], rest // self.mesh[axis]
        return out

    def dp_rank(self, rank: int) -> int:
        c = self.coords(rank)
        return c["data"] * self.mesh["fsdp"] + c["fsdp"]


def plan_layout(cfg: Config, world_size: int | None = None, validate: bool = True) -> Layout:
    """Check the layout against what torch_ref/DeepSpeed can run; ConfigError names the value and the fix.

    torch_ref's backend check: with ``validate`` it also runs ``validate_config`` (every section's checks) among
    its own DeepSpeed-specific ones, so a start validates once; a worker re-planning a checked config passes
    ``validate=False``."""
    p = cfg.parallel
    if "-1" in p.mesh and world_size is None:
        raise ConfigError(
            f"mesh {p.mesh!r} has a -1 axis, but the torch launcher starts exactly the ranks the mesh names; "
            "give every axis a size (e.g. --mesh data=2)")
    mesh = cfg.mesh_shape(world_size)
    if mesh["pipeline"] > 1 and p.zero > 1:
        raise ConfigError(
            f"--zero {p.zero} with pipeline={mesh['pipeline']}: DeepSpeed's PipelineEngine supports only ZeRO-0/1 "
            "(it refuses ZeRO-2/3); use --zero 1 or drop the pipeline axis")
    if validate:
        validate_config(cfg, world_size)
    n = math.prod(mesh.values())
    if world_size is not None and world_size != n:
        raise ConfigError(
            f"world size {world_size} (from the launcher's environment) does not match mesh {p.mesh!r}, which needs "
            f"{n} ranks; launch {n} ranks or change --mesh so its axes multiply to {world_size}")
    if cfg.train.dtype == "bf16" and p.zero == 0:
        raise ConfigError(
            "--dtype bf16 with --zero 0: DeepSpeed keeps fp32 master weights for bf16 only under ZeRO (or a "
            "pipeline); use --zero 1")
    if mesh["tensor"] > 1:
        if mesh["pipeline"] > 1:
            raise ConfigError(f"tensor={mesh['tensor']} with pipeline={mesh['pipeline']} is not implemented in "
                              "torch_ref; use one of the two")
        if p.zero not in (1, 2):
            raise ConfigError(f"tensor={mesh['tensor']} runs under DeepSpeed ZeRO-1/2 (as the study's TP=6 + ZeRO-2); "
                              f"got --zero {p.zero}: use --zero 1 or --zero 2")
    label = layout_label(cfg)
    if p.mics:
        if deepspeed_has_mics():
            return Layout(label, "deepspeed-mics", DEEPSPEED_MICS, mesh, n)
        return Layout(label, "fsdp2-mics", FSDP2_MICS, mesh, n)
    if mesh["pipeline"] > 1:
        return Layout(label, "deepspeed-pipe", f"DeepSpeed PipelineModule ({mesh['pipeline']} stages) + ZeRO-{p.zero}",
                      mesh, n)
    desc = f"DeepSpeed ZeRO-{p.zero}" + (f" + hpZ (zero_hpz_partition_size={mesh['fsdp']})" if p.hpz else "")
    if mesh["tensor"] > 1:
        desc = f"{TP_AUTOTP}, tensor={mesh['tensor']}, {desc}"
    return Layout(label, "deepspeed", desc, mesh, n)
