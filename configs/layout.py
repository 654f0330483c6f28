"""A run's parallel layout, parsed once from its Config: mesh sizes, ZeRO stage, hpZ/MiCS, and its label.

Ranks are laid out as the JAX mesh lays out its devices: axes (pipeline, data, fsdp, tensor), ``tensor``
innermost, so ``rank = ((p * data + d) * fsdp + f) * tensor + t`` and the data-parallel rank is
``d * fsdp + f``. Both trainers, the report, the planner and the Aurora launcher read mesh facts from here;
besides this module only the JAX logical-axis rules and mesh construction (``jax_impl.sharding``) spell an
axis name (``tests/test_layout.py`` parses the sources for a mesh dict indexed by one).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from configs.schema import MESH_AXES, ConfigError, parse_mesh

if TYPE_CHECKING:
    from configs.schema import Config

_AXIS_SET = frozenset(MESH_AXES)


@dataclass(frozen=True)
class Layout:
    """Mesh sizes (fields in ``MESH_AXES`` order) and how ZeRO shards over them."""

    pipeline: int = 1
    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    zero: int = 3
    hpz: bool = False  # ZeRO-3 + hpZ: params over `fsdp` (inside a node), states over data x fsdp
    mics: bool = False  # ZeRO-3 MiCS: every model state over `fsdp` only, replicated across `data`

    def __post_init__(self) -> None:
        for axis, size in zip(MESH_AXES, self.sizes, strict=True):
            # an exact int first: the ABC check is slow and layouts are built in the planner's inner loops
            ok = size.__class__ is int or (isinstance(size, numbers.Integral) and not isinstance(size, bool))
            if not ok or size < 1:
                raise ConfigError(f"mesh axis {axis}={size!r} must be an integer >= 1; give every axis a size")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: Config, n_devices: int | None = None) -> Layout:
        """``cfg.parallel``'s layout; a ``-1`` axis takes the rest of ``n_devices``."""
        p = cfg.parallel
        return cls.from_spec(p.mesh, n_devices, zero=p.zero, hpz=p.hpz, mics=p.mics)

    @classmethod
    def from_spec(cls, spec: str, n_devices: int | None = None, *, zero: int = 3, hpz: bool = False,
                  mics: bool = False) -> Layout:
        """A mesh string (``"data=2,fsdp=-1"``) with the ZeRO settings; errors as ``parse_mesh``'s."""
        return cls.from_shape(parse_mesh(spec, n_devices), zero=zero, hpz=hpz, mics=mics)

    @classmethod
    def from_shape(cls, shape: Mapping[str, int], *, zero: int = 3, hpz: bool = False, mics: bool = False) -> Layout:
        """An axis -> size mapping (``Config.mesh_shape()``, a JAX mesh's ``shape``); axes left out are 1."""
        unknown = sorted(set(shape) - set(MESH_AXES))
        if unknown:
            raise ConfigError(f"unknown mesh axes {unknown} in {dict(shape)}; axes are {', '.join(MESH_AXES)}")
        return cls(**{a: int(shape.get(a, 1)) for a in MESH_AXES}, zero=zero, hpz=hpz, mics=mics)

    # ------------------------------------------------------------------ sizes
    @property
    def sizes(self) -> tuple[int, ...]:
        """Per-axis sizes in ``MESH_AXES`` order (the JAX mesh's device-grid shape)."""
        return (self.pipeline, self.data, self.fsdp, self.tensor)

    def mesh_shape(self) -> dict[str, int]:
        """``{axis: size}`` in ``MESH_AXES`` order: the JAX mesh constructor's input and ``meta.json``'s ``mesh``."""
        return dict(zip(MESH_AXES, self.sizes, strict=True))

    @property
    def dp(self) -> int:
        """Data-parallel size: the ranks that split a global batch (data x fsdp)."""
        return self.data * self.fsdp

    @property
    def world(self) -> int:
        return math.prod(self.sizes)

    @property
    def spec(self) -> str:
        """The mesh as a ``--mesh`` string, axes of size 1 left out (``"pipeline=8,data=6,tensor=2"``)."""
        return ",".join(f"{a}={n}" for a, n in zip(MESH_AXES, self.sizes, strict=True) if n > 1) or "data=1"

    @property
    def label(self) -> str:
        """``pp2+zero1+tp2``-style name, the same in both frameworks' ``meta.json`` and the report."""
        name = f"zero{self.zero}" + ("+hpz" if self.hpz else "") + ("+mics" if self.mics else "")
        if self.tensor > 1:
            name += f"+tp{self.tensor}"
        if self.pipeline > 1:
            name = f"pp{self.pipeline}+" + name
        return name

    # ------------------------------------------------------------------ ranks
    def _strides(self) -> tuple[int, ...]:
        t = self.tensor  # tensor innermost
        return (self.data * self.fsdp * t, self.fsdp * t, t, 1)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world:
            raise ConfigError(f"rank {rank} is outside mesh {self.spec} of {self.world} ranks (0..{self.world - 1})")

    def coords(self, rank: int) -> dict[str, int]:
        """Mesh coordinates of a global rank (tensor innermost)."""
        self._check_rank(rank)
        return {a: rank // s % n for a, s, n in zip(MESH_AXES, self._strides(), self.sizes, strict=True)}

    def rank(self, **coords: int) -> int:
        """The global rank at ``coords`` (axes left out are 0): the inverse of ``coords``."""
        unknown = sorted(set(coords) - set(MESH_AXES))
        if unknown:
            raise ConfigError(f"unknown mesh axes {unknown}; axes are {', '.join(MESH_AXES)}")
        out = 0
        for a, s, n in zip(MESH_AXES, self._strides(), self.sizes, strict=True):
            c = coords.get(a, 0)
            if not 0 <= c < n:
                raise ConfigError(f"coordinate {a}={c} is outside mesh {self.spec} ({a} has {n}: 0..{n - 1})")
            out += c * s
        return out

    def dp_rank(self, rank: int) -> int:
        """The rank's index among the data-parallel ranks (which slice of the global batch it reads)."""
        c = self.coords(rank)
        return c["data"] * self.fsdp + c["fsdp"]

    def stage(self, rank: int) -> int:
        """The rank's pipeline stage."""
        return self.coords(rank)["pipeline"]

    def group(self, axes: Iterable[str], rank: int = 0) -> tuple[int, ...]:
        """The ranks that share every coordinate with ``rank`` but those along ``axes`` (a collective's members),
        ascending."""
        axes = tuple(axes)
        if not set(axes) <= _AXIS_SET:
            raise ConfigError(f"unknown mesh axes {sorted(set(axes) - _AXIS_SET)}; axes are {', '.join(MESH_AXES)}")
        self._check_rank(rank)
        return _group(self.sizes, self._strides(), axes, rank)

    def replace(self, **changes: int | bool) -> Layout:
        return dataclasses.replace(self, **changes)


@functools.lru_cache(maxsize=4096)  # the planner asks for the same few groups hundreds of thousands of times
def _group(sizes: tuple[int, ...], strides: tuple[int, ...], axes: tuple[str, ...], rank: int) -> tuple[int, ...]:
    ranks = [rank]
    for a, s, n in zip(MESH_AXES, strides, sizes, strict=True):
        if a in axes and n > 1:
            base = rank - (rank // s % n) * s  # ``rank`` with its coordinate along ``a`` set to 0
            ranks = [r - rank + base + i * s for r in ranks for i in range(n)]
    return tuple(sorted(ranks))
