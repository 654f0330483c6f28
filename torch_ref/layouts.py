"""Which torch/DeepSpeed machinery runs a config's layout, decided (and refused) before any worker starts.

Ranks are laid out as the JAX mesh (``configs.layout``: tensor innermost); sizes, coordinates and the
data-parallel rank are the config's ``configs.Layout``'s.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from configs import Config, ConfigError, validate_config
from configs import Layout as MeshLayout

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
    shape: MeshLayout  # mesh sizes, ZeRO stage, hpZ/MiCS: the rank map and the label come from it
    engine: str  # deepspeed | deepspeed-pipe | fsdp2-mics | deepspeed-mics
    description: str  # what really runs, for meta.json

    @property
    def label(self) -> str:
        """Short name, the same vocabulary as the JAX trainer's meta.json ("pp2+zero1", "zero3+hpz")."""
        return self.shape.label

    @property
    def mesh(self) -> dict[str, int]:
        return self.shape.mesh_shape()

    @property
    def world_size(self) -> int:
        return self.shape.world

    @property
    def dp(self) -> int:
        return self.shape.dp

    def coords(self, rank: int) -> dict[str, int]:
        """Mesh coordinates of a global rank (tensor innermost)."""
        return self.shape.coords(rank)

    def dp_rank(self, rank: int) -> int:
        return self.shape.dp_rank(rank)


def deepspeed_refusal(layout: MeshLayout, dtype: str = "bf16") -> str:
    """'' if DeepSpeed's engines run ``layout`` at ``dtype``, else why not (the message names the fix).

    The engines' own rules, whoever drives them: the PipelineEngine takes ZeRO-0/1 only, bf16 keeps fp32 master
    weights only under ZeRO, and tensor parallelism (AutoTP, Megatron-DeepSpeed) runs under ZeRO-1/2. Pipeline x
    tensor passes here (Megatron-DeepSpeed runs it, as the study did); torch_ref's own limits are
    ``plan_layout``'s."""
    if layout.pipeline > 1 and layout.zero > 1:
        return (f"--zero {layout.zero} with pipeline={layout.pipeline}: DeepSpeed's PipelineEngine supports only "
                "ZeRO-0/1 (it refuses ZeRO-2/3); use --zero 1 or drop the pipeline axis")
    if dtype == "bf16" and layout.zero == 0:
        return ("--dtype bf16 with --zero 0: DeepSpeed keeps fp32 master weights for bf16 only under ZeRO (or a "
                "pipeline); use --zero 1")
    if layout.tensor > 1 and layout.zero not in (1, 2):
        return (f"tensor={layout.tensor} runs under DeepSpeed ZeRO-1/2 (as the study's TP=6 + ZeRO-2); "
                f"got --zero {layout.zero}: use --zero 1 or --zero 2")
    return ""


def torch_ref_refusal(layout: MeshLayout, dtype: str = "bf16") -> str:
    """'' if torch_ref runs ``layout`` at ``dtype``: DeepSpeed's rules, then what torch_ref itself lacks."""
    if why := deepspeed_refusal(layout, dtype):
        return why
    if layout.tensor > 1 and layout.pipeline > 1:
        return (f"tensor={layout.tensor} with pipeline={layout.pipeline} is not implemented in torch_ref; use one of "
                "the two")
    return ""


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
    lay = cfg.layout(world_size)
    if why := deepspeed_refusal(lay, cfg.train.dtype):  # the engine's rules speak before validate_config's
        raise ConfigError(why)
    if validate:
        validate_config(cfg, world_size)
    n = lay.world
    if world_size is not None and world_size != n:
        raise ConfigError(
            f"world size {world_size} (from the launcher's environment) does not match mesh {p.mesh!r}, which needs "
            f"{n} ranks; launch {n} ranks or change --mesh so its axes multiply to {world_size}")
    if why := torch_ref_refusal(lay, cfg.train.dtype):  # what torch_ref lacks beyond DeepSpeed's rules
        raise ConfigError(why)
    if p.mics:
        if deepspeed_has_mics():
            return Layout(lay, "deepspeed-mics", DEEPSPEED_MICS)
        return Layout(lay, "fsdp2-mics", FSDP2_MICS)
    if lay.pipeline > 1:
        return Layout(lay, "deepspeed-pipe", f"DeepSpeed PipelineModule ({lay.pipeline} stages) + ZeRO-{p.zero}")
    desc = f"DeepSpeed ZeRO-{p.zero}" + (f" + hpZ (zero_hpz_partition_size={lay.fsdp})" if p.hpz else "")
    if lay.tensor > 1:
        desc = f"{TP_AUTOTP}, tensor={lay.tensor}, {desc}"
    return Layout(lay, "deepspeed", desc)
