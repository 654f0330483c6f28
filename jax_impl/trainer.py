"""The sharded training step: optax AdamW, GAS microbatches, explicit shardings, donation.

Everything is built from the config and a mesh; nothing is allocated until ``init_state``,
so ``compile_step`` can plan a 70B step on abstract arrays (ahead-of-time compilation).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from configs import Config, lr_at
from jax_impl import devices, pipeline
from jax_impl.model import PARAM_AXES, ModelOptions, cross_entropy, forward, init_params
from jax_impl.sharding import (
    COPY_BITS,
    COPY_DTYPE,
    Split,
    ZeroPlan,
    activate,
    batch_sharding,
    copy_bits,
    dp_size,
    replicated,
)


def lr_schedule(cfg: Config) -> optax.Schedule:
    """Megatron's warmup + cosine schedule: ``configs.lr_at`` on the traced step. optax calls it with the count
    of updates already applied (0 for the first), lr_at's 0-based step index; the lr is fp32."""

    def sched(count):
        step = jnp.asarray(count, jnp.float32)
        return jnp.broadcast_to(jnp.asarray(lr_at(cfg, step, xp=jnp), jnp.float32), step.shape)

    return sched


NORM_PER_LAYER_MIN_BYTES = 256 * 2**20  # gradients per device from which the norm goes layer by layer


def _sum_sq(g: jax.Array) -> jax.Array:
    return jax.lax.dot_general(g, g, ((tuple(range(g.ndim)),) * 2, ((), ())), preferred_element_type=jnp.float32)


def global_norm(tree: Any, per_layer: Any = None) -> jax.Array:
    """sqrt of the sum of squares of every leaf (optax.tree.norm), each sum as a full contraction
    dot_general(g, g): XLA:CPU runs it as a dot instead of a reduction split into reduce-window passes.

    ``per_layer``: a tree of bools matching ``tree`` (default all False). A True leaf is summed one index of
    its leading (layer) axis at a time in a ``scan``. XLA:CPU rewrites a whole-leaf contraction into a
    product buffer the size of the leaf and keeps every leaf's at once, a second copy of the gradients
    (24.6 GiB for a 7B model's on one device); one layer's product is 1/n_layers of a leaf. Only for a
    leading axis that is not sharded: a scan over a sharded axis would gather it.
    """
    leaves = jax.tree.leaves(tree)
    flags = [False] * len(leaves) if per_layer is None else jax.tree.leaves(per_layer)

    def layer_by_layer(g):
        return jax.lax.scan(lambda acc, gl: (acc + _sum_sq(gl), None), jnp.zeros((), jnp.float32), g)[0]

    return jnp.sqrt(sum(layer_by_layer(g) if f else _sum_sq(g) for g, f in zip(leaves, flags, strict=True)))


def _clipped(g: jax.Array, g_norm: jax.Array, max_norm: float) -> jax.Array:
    return g * (max_norm / g_norm).astype(g.dtype)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """``optax.clip_by_global_norm`` (same threshold, same empty state) that takes the norm when the caller
    already has it (``tx.update(..., grad_norm=n)``): the step computes it for its metrics and guard, and a
    second pass over every gradient is measurable on a memory-bound update.

    Over the threshold it scales by ``max_norm / norm``, one scalar (as torch's ``clip_grad_norm_``), where
    optax computes ``(g / norm) * max_norm``: XLA fuses a scalar multiply into both Adam moments' updates,
    while the divide per element made it write the clipped gradients out in full (a gradient-sized buffer).
    The results differ in the last bits."""

    def update_fn(updates, state, params=None, *, grad_norm=None, **extra):
        del params, extra
        g_norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
        trigger = jnp.squeeze(g_norm < max_norm)
        return jax.tree.map(lambda t: jax.lax.select(trigger, t, _clipped(t, g_norm, max_norm)), updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def make_optimizer(cfg: Config, params_like: Any) -> optax.GradientTransformationExtraArgs:
    """Clip by global norm, then AdamW; no weight decay on norm weights (as Megatron)."""
    o = cfg.optim
    decay_mask = {k: ({n: not n.endswith("norm") for n in v} if isinstance(v, dict) else not k.endswith("norm"))
                  for k, v in params_like.items()}
    return optax.chain(
        clip_by_global_norm(o.clip) if o.clip > 0 else optax.identity(),
        optax.adamw(lr_schedule(cfg), b1=o.beta1, b2=o.beta2, eps=o.eps, weight_decay=o.weight_decay,
                    mask=decay_mask),
    )


def guarded_update(ok: jax.Array, apply: Any, params: Any, opt_state: Any, grads: Any) -> tuple[Any, Any]:
    """``apply(params, opt_state, grads)`` if ``ok`` else the state unchanged.

    A branch rather than ``where(ok, new, old)``: the update runs only when it is kept, and no select
    pass over params and Adam moments follows it (docs/performance.md).
    """
    return jax.lax.cond(ok, apply, lambda p, o, g: (p, o), params, opt_state, grads)


def param_names(params_like: dict) -> dict:
    """The tree of logical axis names, mirroring the params dict."""
    return {k: ({n: PARAM_AXES[n] for n in v} if isinstance(v, dict) else PARAM_AXES[k])
            for k, v in params_like.items()}


@dataclass
class Trainer:
    cfg: Config
    mesh: Mesh
    plan: ZeroPlan
    names: dict  # logical axes per parameter
    shapes: dict  # logical shapes per parameter
    storage: dict  # padded storage ShapeDtypeStructs (with shardings) per parameter
    param_sh: dict
    grad_sh: dict  # gradients as ZeRO stores them (what ``with_grads`` returns)
    opt_sh: Any
    opt_leaf_sh: dict  # the optimizer-state sharding of one parameter-shaped leaf (Adam's mu and nu)
    opt_abstract: Any
    tx: optax.GradientTransformation
    # how the model runs, built once: compute dtype, remat, ..., and the ZeRO plan its weights are gathered under
    model_opts: ModelOptions
    # the compute copy (``plan.copy``; None without one): per parameter, its ShapeDtypeStruct with sharding
    copy_abstract: dict | None = None

    @classmethod
    def build(cls, cfg: Config, mesh: Mesh) -> Trainer:
        pipeline.check(cfg, mesh.shape)  # [pipeline] stage/schedule errors before anything is traced
        plan = ZeroPlan.from_config(cfg, mesh)
        logical = jax.eval_shape(lambda: init_params(cfg.model, cfg.train.seed))
        names = param_names(logical)
        shapes = jax.tree.map(lambda a: a.shape, logical)
        def tree_sharding(tree: str) -> dict:
            return jax.tree.map(lambda n, a: plan.sharding(n, tree, a.shape), names, logical,
                                is_leaf=lambda x: isinstance(x, tuple))

        param_sh, grad_sh = tree_sharding("params"), tree_sharding("grads")
        storage = jax.tree.map(
            lambda n, a, s: jax.ShapeDtypeStruct(plan.storage_shape(n, a.shape), a.dtype, sharding=s),
            names, logical, param_sh, is_leaf=lambda x: isinstance(x, tuple))
        tx = make_optimizer(cfg, names)
        opt_abstract = jax.eval_shape(tx.init, storage)
        opt_leaf_sh = tree_sharding("opt")
        opt_sh = optax.tree_map_params(
            tx, lambda _, s: s, opt_abstract, opt_leaf_sh,
            transform_non_params=lambda _: replicated(mesh))
        opt_abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    opt_abstract, opt_sh)
        opts = ModelOptions.from_config(cfg, plan)
        copy_abstract = None
        if plan.copy:
            # norm weights stay fp32: the model applies them in fp32 (rms_norm); every other weight enters a
            # compute-dtype matmul or embedding lookup, so casting it once here rounds it as the step would
            # (a bf16 copy as its bits: sharding.COPY_BITS)
            copy_abstract = jax.tree.map(
                lambda n, s: jax.ShapeDtypeStruct(
                    s.shape, s.dtype if "norm" in n else COPY_BITS if opts.dtype == COPY_DTYPE else opts.dtype,
                    sharding=plan.sharding(n, "compute", s.shape)),
                names, storage, is_leaf=lambda x: isinstance(x, tuple))
        return cls(cfg, mesh, plan, names, shapes, storage, param_sh, grad_sh, opt_sh, opt_leaf_sh, opt_abstract, tx,
                   opts, copy_abstract)

    # ------------------------------------------------------------------ state
    @functools.cached_property
    def _init_jit(self):
        cfg = self.cfg

        def init_both():
            params = init_params(cfg.model, cfg.train.seed)
            params = jax.tree.map(
                lambda p, s: jnp.pad(p, [(0, t - n) for n, t in zip(p.shape, s.shape, strict=True)]),
                params, self.storage)
            return params, self.tx.init(params)

        return jax.jit(init_both, out_shardings=(self.param_sh, self.opt_sh))  # one compile for both trees

    def init_state(self) -> tuple[dict, Any]:
        """Initial (params, opt_state), created directly in their shardings (compiled once per Trainer)."""
        with activate(self.mesh):
            return self._init_jit()

    def logical_params(self, params: dict) -> dict:
        """Storage params sliced back to their logical shapes (for export and checks)."""
        return jax.tree.map(lambda p, s: p[tuple(slice(0, n) for n in s)], params, self.shapes,
                            is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x))

    # ------------------------------------------------------------------ compute copy
    def compute_copy(self, params: dict) -> dict | None:
        """The compute copy of the (master) ``params``: cast, then resharded to ``plan.compute`` -- one
        compute-dtype all-gather over ``data`` (ZeRO-1/2: over every data-parallel axis) per step. None without
        a copy (``plan.copy`` false).

        Derived from the master at the start of every step rather than carried between steps: the same
        all-gather (the refresh after an update is the gather before the next step), checkpoints keep
        (master, optimizer state) unchanged, and a restored or re-initialised master needs no rebuild step.
        """
        if self.copy_abstract is None:
            return None
        def one(p, a, master_sh):
            c = copy_bits(p) if a.dtype == COPY_BITS else p.astype(a.dtype)
            # cast where the master lives, then gathered: left free, XLA gathered the fp32 master and cast after
            c = jax.lax.with_sharding_constraint(c, master_sh)
            return jax.lax.with_sharding_constraint(c, a.sharding)

        return jax.tree.map(one, params, self.copy_abstract, self.param_sh)

    def model_params(self, params: dict, copy: dict | None) -> dict:
        """What the model reads: ``params`` themselves, or with a copy each weight as a ``Split`` (values from
        the copy, gradient to the master; ``sharding.gather_weight``)."""
        if copy is None:
            return params
        return jax.tree.map(Split, jax.lax.stop_gradient(copy), params)

    def norm_per_layer(self) -> dict | None:
        """Per parameter: is its gradient's norm summed layer by layer (``global_norm``)? Every stacked layer
        matrix once the gradients reach ``NORM_PER_LAYER_MIN_BYTES`` per device, unless the pipeline shards the
        layer axis. None (every leaf whole) below that: there the product buffers are small, and the loops
        moved XLA:CPU's gradient all-reduces into one combined buffer (bench ZeRO-1/2 bf16: +30 MiB temp)."""
        if pipeline.stages(self.mesh.shape) > 1:
            return None
        grad_bytes = sum(math.prod(sh.shard_shape(a.shape)) * a.dtype.itemsize
                         for a, sh in zip(jax.tree.leaves(self.storage), jax.tree.leaves(self.opt_leaf_sh),
                                          strict=True))
        if grad_bytes < NORM_PER_LAYER_MIN_BYTES:
            return None
        return jax.tree.map(lambda n: n[0] == "layers" and len(n) > 2 and not self.plan.layer_matrix(n), self.names,
                            is_leaf=lambda x: isinstance(x, tuple))

    # ------------------------------------------------------------------ step
    def loss_fn(self, params: dict, tokens: jax.Array, opts: ModelOptions | None = None) -> jax.Array:
        """Mean next-token loss of one microbatch tokens (batch, seq+1); ``opts``: the trainer's by default."""
        return cross_entropy(forward(opts or self.model_opts, params, tokens[:, :-1]), tokens[:, 1:])

    def _step(self, params: dict, opt_state: Any, batch: jax.Array, with_grads: bool = False, guard: bool = False):
        copy = self.compute_copy(params)  # once per step, outside the microbatch loop
        grad_fn = jax.value_and_grad(lambda p, tokens: self.loss_fn(self.model_params(p, copy), tokens))

        # Gradients live only inside the step, so they are reduced straight into the sharding of the
        # optimizer state that consumes them: under ZeRO-1 a reduce-scatter instead of an all-reduce of
        # the full gradients (half the traffic, half the buffer); ZeRO-2/3 store them that way anyway.
        step_grad_sh = self.opt_leaf_sh

        def micro(tokens):
            loss, g = grad_fn(params, tokens)
            return loss, jax.lax.with_sharding_constraint(g, step_grad_sh)

        gas = batch.shape[0]
        if pipeline.stages(self.mesh.shape) > 1:  # [pipeline] the microbatches flow through the stages
            loss, grads = pipeline.loss_and_grads(self.cfg, self.mesh, params, batch, self.model_opts)
            grads = jax.lax.with_sharding_constraint(grads, step_grad_sh)
        elif gas == 1:
            loss, grads = micro(batch[0])
        else:
            def body(acc, tokens):
                loss, g = micro(tokens)
                return jax.tree.map(jnp.add, acc, g), loss

            zeros = jax.tree.map(lambda s, sh: jax.lax.with_sharding_constraint(jnp.zeros(s.shape, s.dtype), sh),
                                 self.storage, step_grad_sh)
            grads, losses = jax.lax.scan(body, zeros, batch)
            grads = jax.tree.map(lambda g: g / gas, grads)
            loss = jnp.mean(losses)
        grad_norm = global_norm(grads, self.norm_per_layer())
        metrics = {"loss": loss, "grad_norm": grad_norm}

        def apply(params, opt_state, grads):
            updates, new_opt = self.tx.update(grads, opt_state, params, grad_norm=grad_norm)
            return optax.apply_updates(params, updates), new_opt

        if guard:  # a non-finite step changes nothing (Adam moments and the schedule count included)
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            new_params, new_opt = guarded_update(ok, apply, params, opt_state, grads)
            metrics["finite"] = ok
        else:
            new_params, new_opt = apply(params, opt_state, grads)
        if with_grads:  # for checks and debugging: the step's (averaged, storage-shaped) gradients
            metrics["grads"] = grads
        return new_params, new_opt, metrics

    def jitted_step(self, with_grads: bool = False, guard: bool = False):
        """The step, jitted with explicit shardings and donated state.

        ``with_grads``: metrics also hold the step's gradients; ``guard``: metrics hold ``finite`` and a
        step whose loss or gradient norm is not finite leaves params and optimizer state unchanged.
        """
        rep = replicated(self.mesh)
        metrics_sh = {"loss": rep, "grad_norm": rep, **({"grads": self.grad_sh} if with_grads else {}),
                      **({"finite": rep} if guard else {})}
        return jax.jit(
            partial(self._step, with_grads=with_grads, guard=guard),
            compiler_options=devices.compiler_options(),
            in_shardings=(self.param_sh, self.opt_sh, batch_sharding(self.mesh)),
            out_shardings=(self.param_sh, self.opt_sh, metrics_sh),
            donate_argnums=(0, 1),
        )

    def _eval_loss(self, params: dict, batch: jax.Array) -> jax.Array:
        if pipeline.stages(self.mesh.shape) > 1:  # [pipeline] the same schedule; its gradients are dropped
            return pipeline.loss_and_grads(self.cfg, self.mesh, params, batch, self._eval_opts)[0]
        # the mean over the microbatches
        mp = self.model_params(params, self.compute_copy(params))
        return jnp.mean(jax.lax.map(partial(self.loss_fn, mp, opts=self._eval_opts), batch))

    @property
    def _eval_opts(self) -> ModelOptions:
        # the evaluation step has always traced without sequence parallelism (whole sequences between blocks)
        return dataclasses.replace(self.model_opts, sequence_parallel=False)

    @functools.cached_property
    def eval_step(self):
        """(params, batch) -> the batch's mean loss, no update: the validation loss of one global batch."""
        return jax.jit(self._eval_loss, compiler_options=devices.compiler_options(),
                       in_shardings=(self.param_sh, batch_sharding(self.mesh)), out_shardings=replicated(self.mesh))

    def compile_eval(self):
        """Ahead-of-time compile of ``eval_step`` on abstract inputs (allocates nothing), as ``compile_step``."""
        with activate(self.mesh):
            return self.eval_step.lower(self.storage, self.batch_abstract()).compile()

    def batch_abstract(self) -> jax.ShapeDtypeStruct:
        p = self.cfg.parallel
        dp = dp_size(self.mesh)
        return jax.ShapeDtypeStruct((p.gas, dp * p.mbs, self.cfg.data.seq_len + 1), jnp.int32,
                                    sharding=batch_sharding(self.mesh))

    def compile_step(self, guard: bool = False, compiler_options: dict | None = None):
        """Ahead-of-time compile of the train step on abstract inputs (allocates nothing).

        ``compiler_options`` are added to (and override) the backend's (``jax_impl.devices.compiler_options``).
        """
        with activate(self.mesh):
            lowered = self.jitted_step(guard=guard).lower(self.storage, self.opt_abstract, self.batch_abstract())
            if compiler_options is None:
                return lowered.compile()
            return lowered.compile(compiler_options={**(devices.compiler_options() or {}), **compiler_options})

    # ------------------------------------------------------------------ accounting
    def state_bytes_per_device(self) -> dict[str, int]:
        """Bytes per device of params, grads and optimizer state, from shapes and shardings."""
        def per_dev(shape, dtype, sh: NamedSharding) -> int:
            shard = sh.shard_shape(shape)
            return math.prod(shard) * jnp.dtype(dtype).itemsize

        params = sum(per_dev(s.shape, s.dtype, s.sharding) for s in jax.tree.leaves(self.storage))
        grads = sum(per_dev(s.shape, s.dtype, sh) for s, sh in
                    zip(jax.tree.leaves(self.storage), jax.tree.leaves(self.grad_sh), strict=True))
        opt = sum(per_dev(s.shape, s.dtype, s.sharding) for s in jax.tree.leaves(self.opt_abstract))
        out = {"params": params, "grads": grads, "opt_state": opt}
        if self.copy_abstract is not None:  # derived in the step, not stored; live through forward and backward
            out["compute_copy"] = sum(per_dev(s.shape, s.dtype, s.sharding)
                                      for s in jax.tree.leaves(self.copy_abstract))
        return out
