"""A parallel layout (``Layout``): its mesh, ZeRO stage and batch split, the project Config it is, and the
layout a study row ran. Planner functions take a model name: a preset, or a run config registered under a name."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from compare.plan.assumptions import SEQ
from compare.reference import Row
from configs import Config, ParallelConfig, load_config
from configs import Layout as MeshLayout


@dataclass(frozen=True)
class Layout:
    """One parallel layout on the mesh (pipeline, data, fsdp, tensor), tensor innermost, with what the planner
    chooses beside it (family, batch split, remat, schedule); the mesh facts are ``shape``'s (``configs.Layout``)."""

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

    def __post_init__(self) -> None:
        # built once per layout (not a field: equality and replace() stay the planner's fields)
        object.__setattr__(self, "_shape", _mesh_layout(self.pp, self.data, self.fsdp, self.tp, self.zero,
                                                        self.hpz, self.mics))

    @property
    def shape(self) -> MeshLayout:
        """The mesh and ZeRO settings as the trainers read them: sizes, rank map, dp."""
        return self._shape  # type: ignore[attr-defined]

    @classmethod
    def on(cls, family: str, shape: MeshLayout, **choices: object) -> Layout:
        """The planner's layout of ``shape`` (``choices``: mbs, gas, remat, schedule, ...)."""
        return cls(family, pp=shape.pipeline, data=shape.data, fsdp=shape.fsdp, tp=shape.tensor, zero=shape.zero,
                   hpz=shape.hpz, mics=shape.mics, **choices)  # type: ignore[arg-type]

    @property
    def dp(self) -> int:
        return self.shape.dp

    @property
    def ngpu(self) -> int:
        return self.shape.world

    @property
    def gbs(self) -> int:
        return self.mbs * self.gas * self.dp

    @property
    def mesh(self) -> str:
        return self.shape.spec

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
        return dataclasses.replace(base, parallel=par, data=dataclasses.replace(base.data, seq_len=seq),
                                   train=dataclasses.replace(base.train, dtype=planned_dtype(model)))

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


@functools.lru_cache(maxsize=4096)  # the planner builds hundreds of thousands of layouts over a few meshes
def _mesh_layout(pp: int, data: int, fsdp: int, tp: int, zero: int, hpz: bool, mics: bool) -> MeshLayout:
    return MeshLayout(pipeline=pp, data=data, fsdp=fsdp, tensor=tp, zero=zero, hpz=hpz, mics=mics)


_CONFIGS: dict[str, Config] = {}  # run configs planned under a name (a preset with the user's overrides)


def register_config(cfg: Config) -> str:
    """A planner model name for ``cfg`` (every planner function takes a preset name): ``<model>@<config hash>``."""
    name = f"{cfg.model.name}@{cfg.hash()}"
    _CONFIGS[name] = cfg
    return name


def planned_dtype(model: str) -> str:
    """The dtype ``model`` is planned at: a preset as the study ran it (bf16); a registered run config its own."""
    return _CONFIGS[model].train.dtype if model in _CONFIGS else "bf16"


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
