"""Mesh, logical-axis rules and ZeRO shardings: the only module that names mesh axes.

The model labels every array dimension with a logical name; ``RULES`` maps those names to
mesh axes for compute. ZeRO stages decide which of the *stored* trees (params, grads,
optimizer state) also shard one dimension -- the most major after ``layers``, or ``layers`` itself
(``ZeroPlan.by_layer``), see ``ZeroPlan.zero_dim`` -- over the data-parallel axes:

    ZeRO-0  nothing             ZeRO-2  + gradients
    ZeRO-1  optimizer state     ZeRO-3  + parameters
            With a bf16 compute dtype (DeepSpeed's bf16 ZeRO-1/2): fp32 master params over data x fsdp
            like the states, and a bf16 compute copy replicated over them (``ZeroPlan.copy``, ``Split``)
    hpZ     ZeRO-3, but parameters only over ``fsdp`` (inside a node); states over data x fsdp.
            With a bf16 compute dtype (DeepSpeed's hpZ): fp32 master params over data x fsdp like the
            states, and a bf16 *compute copy* over ``fsdp`` that the forward/backward gather from
            (``ZeroPlan.compute``, ``Split``)
    MiCS    ZeRO-3, every model state over ``fsdp`` only, replicated across ``data``
            ZeRO-3 and MiCS with a bf16 compute dtype (DeepSpeed gathers its bf16 params): each layer's weights
            are cast to bf16 where they are stored and gathered as bf16 (``ZeroPlan.gather_bits``)

JAX only accepts jit arguments whose sharded dimensions divide evenly, and no 70B dimension
divides by 3 (so not by 96 or 192). Such dimensions are stored *padded* to the next multiple
of the shard count -- DeepSpeed pads its flat ZeRO partitions the same way -- and sliced back
to the logical size where the weight is used. Padding is zero and receives zero gradient,
so AdamW keeps it zero; it never replicates a dimension silently.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from configs import MESH_AXES, Config, ConfigError, Layout

DP_AXES = ("data", "fsdp")
PIPELINE_AXIS = "pipeline"  # [pipeline] the axis jax_impl.pipeline runs its stages over

# logical name -> mesh axes, for compute (activations and gathered weights)
RULES: dict[str, tuple[str, ...]] = {
    "batch": DP_AXES,
    "seq": (),
    # Megatron-style sequence parallelism (jax.sequence_parallel, see `logical_spec`): the activations
    # between the blocks (residual stream, norms) split over `tensor` along the sequence; gathered before
    # qkv / mlp-in, reduce-scattered after out / mlp-out. Off: whole sequences, as "seq".
    "act_seq": ("tensor",),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "embed": (),
    "norm": (),
    "layers": (PIPELINE_AXIS,),  # [pipeline] contiguous stages of layers; a no-op when pipeline == 1
}
# dimensions that ZeRO shards over the data-parallel axes in stored trees
ZERO_DIMS = ("embed", "norm")

# gather_weight reduce-scatters each layer's weight gradient to the step's gradient sharding inside the
# backward (docs/memory.md); False: the gradient keeps the weight's stored sharding until the step's end
GRADS_PER_LAYER = True
# hpZ with a compute dtype narrower than the stored fp32: the master params live over data x fsdp and the step
# gathers its layers from a compute-dtype copy over fsdp (ZeroPlan.compute); False: fp32 params over fsdp
HPZ_COMPUTE_COPY = True
# ZeRO-1/2 with a narrower compute dtype: the fp32 master params live over data x fsdp with the optimizer state
# and the step reads a compute-dtype copy replicated over them; False: fp32 params replicated
ZERO_COMPUTE_COPY = True
# ZeRO-3 (not hpZ) and MiCS with a bf16 compute dtype: each layer's weight is cast to bf16 on the device that
# stores it and all-gathered as bf16 bits, half the bytes of gathering fp32 and casting after (what XLA did);
# no copy is kept, the master being sharded as the gather's source would be. False: fp32 gathered
ZERO3_GATHER_BF16 = True

# ZeRO-1/2 on a mesh that is only data-parallel: each projection's weight gradient is computed per device and
# reduce-scattered into the optimizer state's sharding inside one shard_map (weight_grad_fn). Left to the SPMD
# partitioner, XLA:CPU all-reduces the whole gradient and slices it: its pipeline has no pass that makes the
# pair a reduce-scatter (in-process, 2 devices, 64 MiB: 42.8 ms against 15.5 ms). False: the partitioner's way
EXPLICIT_GRAD_SCATTER = True
# ZeRO-1/2 (fp32 compute) on a data-parallel mesh whose shard count divides the layer count: the stacked layer
# matrices' optimizer state (and ZeRO-2 gradients) are sharded on `layers`, so each device owns whole layers, as a
# contiguous block of DeepSpeed's flat partition would. Each layer's weight gradient stays per device through the
# backward and the stack is reduce-scattered once after it (ZeroPlan.by_layer, scatter_layer_grads); the updated
# weights' all-gather then moves contiguous blocks in the layout the dots read (sharding a layer's rows, XLA:CPU
# gathered into a transposed layout and copied every stacked weight back once per step). False: a layer's rows
STATES_BY_LAYER = True
# ... while the whole stacks' fp32 gradient, which each device then holds until the backward ends, is at most this
# (the bench preset: 45 MiB; gpu-1b's 3.2 GiB stays with a layer's rows, reduce-scattered layer by layer)
BY_LAYER_MAX_GRAD_BYTES = 256 * 2**20

_ACTIVE: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("mesh", default=None)


def make_mesh(shape: dict[str, int], devices: list | None = None) -> Mesh:
    """A mesh over (pipeline, data, fsdp, tensor); ``tensor`` is innermost (fastest link)."""
    devices = jax.devices() if devices is None else devices
    n = math.prod(shape[a] for a in MESH_AXES)
    if n > len(devices):
        raise ConfigError(
            f"mesh {shape} needs {n} devices but only {len(devices)} exist; on CPU start a fresh process "
            f"(the trainer then creates {n} host devices), or shrink the mesh"
        )
    grid = np.asarray(devices[:n], dtype=object).reshape([shape[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def make_abstract_mesh(shape: dict[str, int]) -> AbstractMesh:
    """A device-free mesh of the same shape: enough to plan shardings for 96 tiles on a laptop."""
    return AbstractMesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def dp_size(mesh: Mesh | AbstractMesh) -> int:
    """Data-parallel size of a mesh: the devices that split a global batch (``configs.Layout.dp`` of its shape)."""
    return Layout.from_shape(dict(mesh.shape)).dp


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[Mesh]:
    """Make ``constrain``/``gather_weight`` act on ``mesh`` (outside: plain no-ops)."""
    token = _ACTIVE.set(mesh)
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _ACTIVE.reset(token)


def _axes(mesh: Mesh, names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(a for a in names if mesh.shape[a] > 1)


def logical_spec(names: tuple[str | None, ...], mesh: Mesh, rules: dict[str, tuple[str, ...]] = RULES,
                 seq_parallel: bool = False) -> P:
    """The PartitionSpec of logical ``names`` on ``mesh``; ``act_seq`` follows its rule only with ``seq_parallel``
    (else it is left whole, like ``seq``)."""
    parts = []
    for n in names:
        axes = _axes(mesh, rules[n]) if n and (n != "act_seq" or seq_parallel) else ()
        parts.append(axes if len(axes) > 1 else (axes[0] if axes else None))
    return P(*parts)


def constrain(x: jax.Array, names: tuple[str | None, ...], seq_parallel: bool = False) -> jax.Array:
    """Sharding constraint from logical names (``seq_parallel``: see ``logical_spec``); identity when no mesh
    is active."""
    mesh = _ACTIVE.get()
    if mesh is None:
        return x
    # [pipeline] inside jax.shard_map(axis_names={"pipeline"}) the context mesh marks `pipeline` Manual;
    # a constraint must be built on that mesh (its specs never name the manual axis: see jax_impl.pipeline).
    return _constrain_spec(x, logical_spec(names, mesh, seq_parallel=seq_parallel))


def _constrain_spec(x: jax.Array, spec: P) -> jax.Array:
    ctx = jax.sharding.get_abstract_mesh()
    target = ctx if ctx.manual_axes else _ACTIVE.get()
    return jax.lax.with_sharding_constraint(x, NamedSharding(target, spec))


def gather_weight(w: jax.Array, names: tuple[str, ...], shape: tuple[int, ...],
                  plan: ZeroPlan | None = None, stacked: bool = False) -> jax.Array:
    """A stored (maybe ZeRO-sharded, maybe padded) weight in compute layout and logical shape; ``plan``: how
    the weight is stored (None: as computed, no ZeRO pinning); ``stacked``: ``w`` is one layer's slice of a
    stack (``names`` and ``shape`` without ``layers``).

    Under ZeRO-3 the weight is first pinned to its stored sharding: a layer's slice of the stacked
    weights is then all-gathered as the 2-D matrix it is. Left to itself, XLA gathered the
    (1, rows, cols) slice before dropping the layer axis, in a layout with the gathered axis major,
    and copied every gathered weight once more into the plain row-major layout the dots read.
    """
    if _layer_grad_kept(names, plan, stacked):
        # replicated for compute; its gradient stays this device's own until the stack is reduce-scattered
        return constrain(w, names)
    if weight_grad_fn(names, shape, plan) is not None:
        # the matmul's backward hands over a gradient already scattered to the optimizer's sharding: the
        # forward constraint must not pull it back to the replicated compute layout (an all-gather)
        if isinstance(w, Split):
            w = _from_copy(w.copy, w.master, None, None)
        return _grad_sharded_as(w, plan.spec(names, "opt", shape), logical_spec(names, _ACTIVE.get()))
    if isinstance(w, Split):
        if plan is None or _ACTIVE.get() is None:  # no mesh: the copy's values, gradient to the master
            w = _from_copy(w.copy, w.master, None, None)
        else:
            w = _from_copy(w.copy, w.master, (plan.spec(names, "compute", shape), logical_spec(names, plan.mesh)),
                           plan.spec(names, "opt", shape))
    elif plan is not None and _ACTIVE.get() is not None and plan.gather_bits and "norm" not in names:
        # cast where stored, gathered as bf16 bits; the fp32 cotangent goes to w reduce-scattered as below (norm
        # weights, applied in fp32, are gathered as they are)
        spec = plan.spec(names, "params", shape)
        w = _from_copy(copy_bits(jax.lax.stop_gradient(w)), w, (spec, logical_spec(names, plan.mesh)),
                       plan.spec(names, "opt", shape) if GRADS_PER_LAYER else spec)
    elif plan is not None and _ACTIVE.get() is not None:
        if plan.opt and GRADS_PER_LAYER:
            # the gradient of this one layer's weight is reduce-scattered to the step's gradient sharding
            # (the optimizer state's) inside the backward, so the layer scan stacks 1/dp-sized gradients
            # instead of full ones, or ones sharded only inside a node (hpZ, 70B: 21.5 -> 2.7 GiB)
            w = _grad_sharded_as(w, plan.spec(names, "opt", shape))
        if plan.params:
            w = _constrain_spec(w, plan.spec(names, "params", shape))
    w = constrain(w, names)
    if w.shape != shape:
        w = w[tuple(slice(0, n) for n in shape)]
    return w


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _grad_sharded_as(w: jax.Array, spec: P, value_spec: P | None = None) -> jax.Array:
    """Identity, or ``w`` constrained to ``value_spec``; its cotangent is constrained to ``spec`` (a plain
    sharding constraint's transpose would constrain it to ``value_spec`` too)."""
    return w if value_spec is None else _constrain_spec(w, value_spec)


def _grad_sharded_as_fwd(w: jax.Array, spec: P, value_spec: P | None) -> tuple[jax.Array, None]:
    return _grad_sharded_as(w, spec, value_spec), None


def _grad_sharded_as_bwd(spec: P, value_spec: P | None, _: None, ct: jax.Array) -> tuple[jax.Array]:
    return (_constrain_spec(ct, spec),)


_grad_sharded_as.defvjp(_grad_sharded_as_fwd, _grad_sharded_as_bwd)
GRAD_SHARDED_AS = _grad_sharded_as.__name__  # its primitive's name (remat policies leave its output unsaved)


def weight_grad_fn(names: tuple[str, ...], shape: tuple[int, ...], plan: ZeroPlan | None,
                   stacked: bool = False) -> Callable[[jax.Array, jax.Array], jax.Array] | None:
    """``dw(x, ct)``, the weight gradient of ``x @ w`` (x (batch, ..., k), ct (batch, ..., n)) summed over the
    data-parallel devices and left in the optimizer state's sharding of the weight (``names``, ``shape``:
    one layer's, unpadded), by a local dot and an explicit reduce-scatter; None where the partitioner's own
    reduction is used: no mesh, no ZeRO-1/2, a weight gathered for compute (ZeRO-3, hpZ, MiCS), a mesh
    with tensor or pipeline shards, a padded weight, or ``EXPLICIT_GRAD_SCATTER`` off. A layer of a stack
    sharded by layer (``stacked``, ``ZeroPlan.by_layer``): this device's own sum, reduced with the whole stack
    after the backward (``scatter_layer_grads``)."""
    mesh = _ACTIVE.get()
    if _layer_grad_kept(names, plan, stacked):
        return partial(_scattered_dw, mesh, _axes(mesh, RULES["batch"]), None, ())
    if not EXPLICIT_GRAD_SCATTER or plan is None or mesh is None or not plan.opt or not GRADS_PER_LAYER:
        return None
    replicated = not plan.compute if plan.copy else not plan.params
    if not replicated or jax.sharding.get_abstract_mesh().manual_axes:
        return None
    batch_axes = _axes(mesh, RULES["batch"])
    if any(mesh.shape[a] > 1 for a in mesh.axis_names if a not in batch_axes):
        return None
    if plan.storage_shape(names, shape) != tuple(shape):
        return None
    scatter_axes = _axes(mesh, plan.opt)
    if not set(scatter_axes) <= set(batch_axes):
        return None
    return partial(_scattered_dw, mesh, batch_axes, plan.zero_dim(names, shape), scatter_axes)


def _one_or_tuple(axes: tuple[str, ...]) -> str | tuple[str, ...]:
    return axes[0] if len(axes) == 1 else axes


def _scattered_dw(mesh: Mesh, batch_axes: tuple[str, ...], dim: int | None, scatter_axes: tuple[str, ...],
                  x: jax.Array, ct: jax.Array) -> jax.Array:
    """The weight gradient reduce-scattered over ``scatter_axes`` on ``dim``; ``dim`` None: this device's own sum,
    typed replicated, for ``scatter_layer_grads`` to reduce with the whole stack."""
    lead = tuple(range(x.ndim - 1))
    rest = tuple(a for a in batch_axes if a not in scatter_axes)

    def local(x, ct):  # this device's samples: x (mbs, ..., k), ct (mbs, ..., n)
        dw = jax.lax.dot_general(x, ct, ((lead, lead), ((), ())), preferred_element_type=jnp.float32)
        if dim is None:
            return dw
        if rest:
            dw = jax.lax.psum(dw, rest)
        return jax.lax.psum_scatter(dw, scatter_axes, scatter_dimension=dim, tiled=True)

    out = [None, None]
    if dim is not None:
        out[dim] = _one_or_tuple(scatter_axes)
    batch = P(_one_or_tuple(batch_axes))
    return jax.shard_map(local, mesh=mesh, in_specs=(batch, batch), out_specs=P(*out),
                         axis_names=set(batch_axes), check_vma=False)(x, ct)


def _layer_grad_kept(names: tuple[str, ...], plan: ZeroPlan | None, stacked: bool) -> bool:
    """Does one layer of this stacked weight keep its gradient per device until the whole stack is reduced?"""
    return (stacked and plan is not None and plan.layer_matrix(("layers", *names)) and _ACTIVE.get() is not None
            and not jax.sharding.get_abstract_mesh().manual_axes)


def scatter_layer_grads(stack: jax.Array, names: tuple[str, ...], plan: ZeroPlan | None) -> jax.Array:
    """A stored stack of layer weights, unchanged; under ``ZeroPlan.by_layer`` its gradient -- each layer's as
    this device's own sum (``_scattered_dw``) -- is summed over the data-parallel devices and scattered by layer to
    the optimizer state's sharding in one reduce-scatter. ``names``: the stack's, ``layers`` first."""
    if not _layer_grad_kept(names[1:], plan, True):
        return stack
    return _layer_scatter(stack, plan.spec(names, "opt", stack.shape))


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _layer_scatter(w: jax.Array, spec: P) -> jax.Array:
    return w


def _layer_scatter_fwd(w: jax.Array, spec: P) -> tuple[jax.Array, None]:
    return w, None


def _layer_scatter_bwd(spec: P, _: None, ct: jax.Array) -> tuple[jax.Array]:
    # by layer, the states are sharded over every data-parallel (batch) axis: one reduce-scatter sums and splits
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)

    def local(ct):  # (layers, k, n), this device's sums
        return jax.lax.psum_scatter(ct, axes, scatter_dimension=0, tiled=True)

    return (jax.shard_map(local, mesh=_ACTIVE.get(), in_specs=P(), out_specs=spec, axis_names=set(axes),
                          check_vma=False)(ct),)


_layer_scatter.defvjp(_layer_scatter_fwd, _layer_scatter_bwd)


# A bf16 compute copy is kept as its bit pattern (uint16): XLA:CPU's float-normalization-bf16 pass runs a bf16
# dynamic-slice in fp32, and the layer scan's slice of the copy then read an fp32 convert of the whole stack,
# hoisted out of the loop (70B hpZ, 8 nodes: +21.5 GiB of temp, docs/memory.md). Bits are sliced as they are.
COPY_DTYPE, COPY_BITS = jnp.bfloat16, jnp.uint16


def copy_bits(x: jax.Array) -> jax.Array:
    """``x`` rounded to the compute copy's dtype, as its bits (``COPY_BITS``)."""
    return jax.lax.bitcast_convert_type(x.astype(COPY_DTYPE), COPY_BITS)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Split:
    """One weight as the model reads it under a compute copy: ``copy`` (compute dtype or its ``COPY_BITS``,
    sharded inside the node) gives the values, ``master`` (fp32, sharded over every data-parallel device) takes
    the gradient. A pytree, so the layer scan slices both stacks together."""

    copy: jax.Array
    master: jax.Array


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _from_copy(copy: jax.Array, master: jax.Array, specs: tuple[P, P] | None, grad_spec: P | None) -> jax.Array:
    """``copy`` gathered to its compute layout (``specs``: stored, compute), *then* cast to the master's dtype:
    the all-gather moves compute-dtype bytes. The cotangent, in the master's dtype as it is without a copy,
    goes to ``master`` constrained to ``grad_spec`` (reduce-scattered over every data-parallel device inside
    the backward, as ``_grad_sharded_as``); the copy is derived state and gets none."""
    if specs is not None:
        copy = _constrain_spec(_constrain_spec(copy, specs[0]), specs[1])
    if copy.dtype == COPY_BITS:
        copy = jax.lax.bitcast_convert_type(copy, COPY_DTYPE)
    return copy.astype(master.dtype)


def _from_copy_fwd(copy, master, specs, grad_spec):
    return _from_copy(copy, master, specs, grad_spec), None


def _from_copy_bwd(specs, grad_spec, _, ct):
    return None, (ct if grad_spec is None else _constrain_spec(ct, grad_spec))


_from_copy.defvjp(_from_copy_fwd, _from_copy_bwd)
FROM_COPY = _from_copy.__name__


@dataclass(frozen=True)
class ZeroPlan:
    """Which mesh axes the ZeRO dimensions of each stored tree are sharded over; ``copy``: the step reads its
    weights from a compute-dtype copy of the (master) params, whose ZeRO axes are ``compute`` (hpZ: ``fsdp``;
    ZeRO-1/2: none, the copy is replicated over the data-parallel axes)."""

    mesh: Mesh | AbstractMesh
    params: tuple[str, ...]
    grads: tuple[str, ...]
    opt: tuple[str, ...]
    compute: tuple[str, ...] = ()
    copy: bool = False
    # stacked layer matrices are ZeRO-sharded on `layers` (STATES_BY_LAYER); their gradients then reach the
    # optimizer's sharding by one reduce-scatter of the stack after the backward (scatter_layer_grads)
    by_layer: bool = False
    # ZeRO-3 / MiCS in bf16: params (fp32, ZeRO-sharded) are cast to bf16 bits before each layer's all-gather
    gather_bits: bool = False

    @classmethod
    def from_config(cls, cfg: Config, mesh: Mesh) -> ZeroPlan:
        p = cfg.parallel
        everywhere = _axes(mesh, DP_AXES)
        inside = _axes(mesh, ("fsdp",))
        # DeepSpeed's hpZ under mixed precision: only the bf16 copy stays inside the node; the fp32 master
        # joins the optimizer state over every device (not with pipeline stages, which read params directly)
        narrow = cfg.train.dtype != "fp32" and mesh.shape[PIPELINE_AXIS] == 1
        copy = p.hpz and HPZ_COMPUTE_COPY and narrow and bool(inside)
        if copy:
            # fsdp-major: a device's fsdp block of the copy is then the blocks of the states held by its own
            # `data` peers, and making the copy is one all-gather over `data` (data-major needed a permute first)
            everywhere = _axes(mesh, ("fsdp", "data"))
        states = inside if p.mics else everywhere
        # DeepSpeed's bf16 ZeRO-1/2: bf16 params replicated, the fp32 master partitioned with the optimizer state
        zero_copy = p.zero in (1, 2) and ZERO_COMPUTE_COPY and narrow and bool(states)
        params = (everywhere if copy else inside if (p.hpz or p.mics) else everywhere) if p.zero >= 3 else ()
        gather_bits = ZERO3_GATHER_BF16 and narrow and cfg.train.dtype == "bf16" and bool(params) and not p.hpz
        n_states = math.prod(mesh.shape[a] for a in states)
        batch_axes = _axes(mesh, RULES["batch"])
        # not with a compute copy: its stacks are gathered as bf16 bits, and by layer measured no faster there
        by_layer = (STATES_BY_LAYER and EXPLICIT_GRAD_SCATTER and GRADS_PER_LAYER and p.zero in (1, 2)
                    and not (p.hpz or p.mics or zero_copy) and n_states > 1 and cfg.model.n_layers % n_states == 0
                    and 4 * cfg.model.layer_matrix_params() <= BY_LAYER_MAX_GRAD_BYTES
                    and all(mesh.shape[a] == 1 for a in mesh.axis_names if a not in batch_axes))
        return cls(
            mesh=mesh,
            params=states if zero_copy else params,
            grads=states if p.zero >= 2 else (),
            opt=states if p.zero >= 1 else (),
            compute=inside if copy else (),
            copy=copy or zero_copy,
            by_layer=by_layer,
            gather_bits=gather_bits,
        )

    def shards(self, axes: tuple[str, ...]) -> int:
        return math.prod(self.mesh.shape[a] for a in axes)

    def pad_multiple(self) -> int:
        """Stored ZeRO dims are padded to a multiple of every tree's shard count."""
        return math.lcm(*(self.shards(a) for a in (self.params, self.grads, self.opt, self.compute)))

    def zero_dim(self, names: tuple[str, ...], shape: tuple[int, ...]) -> int:
        """Which dimension of a stored parameter ZeRO shards.

        Its most major dimension after ``layers``: then every ZeRO all-gather and reduce-scatter runs
        over contiguous blocks, and XLA needs no transposed layout for it (sharding a *minor*
        dimension, e.g. ``embed`` of ``w_down`` (L, F, h), made XLA:CPU write the whole AdamW update of
        that weight through a transposed layout, ~10x slower than a plain elementwise pass). The
        exception: a tensor-sharded dimension that would need padding keeps its tensor blocks aligned
        by sharding ``embed``/``norm`` instead. A projection stack under ``by_layer`` is sharded on ``layers``.
        """
        if self.layer_matrix(names):
            return 0
        idx = [i for i, n in enumerate(names) if n != "layers"]
        first = idx[0]
        tp = self.shards(_axes(self.mesh, RULES[names[first]]))
        if tp == 1 or shape[first] % (tp * self.pad_multiple()) == 0 or not any(names[i] in ZERO_DIMS for i in idx):
            return first
        return next(i for i in idx if names[i] in ZERO_DIMS)

    def layer_matrix(self, names: tuple[str, ...]) -> bool:
        """Is this a stacked layer matrix ZeRO-sharded on ``layers`` (``by_layer``)? ``names``: the stored
        array's, ``layers`` first."""
        return self.by_layer and len(names) == 3 and names[0] == "layers"

    def storage_shape(self, names: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
        mult = self.pad_multiple()
        zd = self.zero_dim(names, shape)
        out = []
        for i, (n, size) in enumerate(zip(names, shape, strict=True)):
            tp = self.shards(_axes(self.mesh, RULES[n]))
            if i == zd:
                size = -(-size // (mult * tp)) * (mult * tp)
            elif size % tp:
                raise ConfigError(f"dimension {n!r} of size {size} does not divide by its {tp} tensor shards")
            out.append(size)
        return tuple(out)

    def spec(self, names: tuple[str, ...], tree: str, shape: tuple[int, ...]) -> P:
        zero_axes = _axes(self.mesh, getattr(self, tree))
        zd = self.zero_dim(names, shape)
        parts = []
        for i, n in enumerate(names):
            axes = _axes(self.mesh, RULES[n]) + (zero_axes if i == zd else ())
            parts.append(axes if len(axes) > 1 else (axes[0] if axes else None))
        return P(*parts)

    def sharding(self, names: tuple[str, ...], tree: str, shape: tuple[int, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names, tree, shape))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Global batch (gas, dp*mbs, seq+1): samples split over the data-parallel axes."""
    return NamedSharding(mesh, logical_spec((None, "batch", None), mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
