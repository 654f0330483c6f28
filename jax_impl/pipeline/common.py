"""Stage plumbing shared by the schedules: placement checks, the stage's layers and their vjp, the outer weights,
the head's vocabulary split over the stages, and the sends between stages over the manual ``pipeline`` axis."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from configs import Config, parse_mesh
from configs.schema import check_pipeline
from jax_impl import model
from jax_impl.model import PARAM_AXES, ModelOptions
from jax_impl.sharding import PIPELINE_AXIS

PIPE = PIPELINE_AXIS
OUTER = ("embed", "final_norm", "head")  # weights outside the layer stack


def stages(mesh_shape: Any) -> int:
    return int(dict(mesh_shape).get(PIPE, 1))


def check(cfg: Config, mesh_shape: Any) -> None:
    """Pipeline config errors (stages, ZeRO stage, 1F1B's GAS) before anything is traced or compiled.

    The checks live in ``configs.schema.check_pipeline`` (part of ``validate_config``, which the CLIs run once);
    ``Trainer.build`` calls this so that programmatic users get the same messages.
    """
    if stages(mesh_shape) > 1:
        check_pipeline(cfg, parse_mesh(cfg.parallel.mesh, math.prod(mesh_shape[a] for a in mesh_shape)))


def stage_fn(opts: ModelOptions) -> Callable[..., jax.Array]:
    """This stage's layers: ``run(layers, x)`` scans x (batch, seq, hidden) through the local (L/p, ...) weights;
    ``run(layers, x, start=i, count=n)`` through layers i .. i+n-1 of them, i traced (a circular schedule's chunk).
    Without remat every intermediate is saved but the weights, so the backward reads them from the layer's inputs
    (slices of the stage's stack) rather than from a stacked copy (what StageVjp and run_if rely on)."""
    return partial(model.layers, opts)


def embed(opts: ModelOptions, table: jax.Array, tokens: jax.Array) -> jax.Array:
    """Stage 0's input: the embedding of tokens (batch, seq), whole sequences (the carry between stages)."""
    return model.embed(opts, table, tokens, whole_seq=True)


class SplitHead:
    """``model.VocabSplit`` over the p stages: stage s holds the head's vocabulary columns s, s+p, s+2p, ...;
    the log-partition and the gold logit are combined over the stages, each by a psum. Both come out the same
    on every stage, and so does the loss: its gradient reaches each stage's share once, unscaled."""

    def __init__(self, p: int):
        self.p = p

    def logz(self, logz: jax.Array) -> jax.Array:
        # every stage's (batch, seq) log-partition, stacked (p, batch, seq) by a psum of one-hot rows: the same
        # numbers as an all-gather, but the transpose is this stage's row (no collective), where all_gather's
        # is a reduce-scatter. With the all-gather, the stages' sends stalled over gloo (stages as processes on
        # CPU): 4.35 s per bench pp2 step against 0.65 s (docs/performance.md, "Pipeline + ZeRO-1 on CPU")
        row = jax.nn.one_hot(jax.lax.axis_index(PIPE), self.p, dtype=logz.dtype).reshape((self.p,) + (1,) * logz.ndim)
        return jax.nn.logsumexp(jax.lax.psum(row * logz[None], PIPE), axis=0)

    def columns(self, labels: jax.Array) -> jax.Array:
        return jnp.where(labels % self.p == jax.lax.axis_index(PIPE), labels // self.p, -1)  # -1: not this stage's

    def gold(self, gold: jax.Array) -> jax.Array:
        return jax.lax.psum(gold, PIPE)


def outer_weights(opts: ModelOptions, params: dict) -> dict:
    """Embedding, final norm and head in logical shape, once per step: sliced inside the tick loop they
    would be saved per tick as residuals (8 x 0.5 GiB for the 70B head). Stage-varying (see gpipe.schedule)."""
    V, h = opts.cfg.padded_vocab, opts.cfg.hidden
    shapes = {"embed": (V, h), "final_norm": (h,), "head": (h, V)}
    return {k: opts.gather(varying(params[k]), PARAM_AXES[k], shapes[k]) for k in OUTER}


def varying(x: Any) -> Any:
    """Mark fresh (stage-independent) values as varying over the pipeline axis, as loop carries must be."""
    def cast(a):
        return a if PIPE in jax.typeof(a).manual_axis_type.varying else jax.lax.pcast(a, PIPE, to="varying")

    return jax.tree.map(cast, x)


def shift(x: jax.Array, p: int, step: int, wrap: bool = False) -> jax.Array:
    """Send to stage s + step (step = +1: activations forward, -1: cotangents backward); with ``wrap`` the last
    stage sends to the first (the circular schedule's next round)."""
    perm = [(s, (s + step) % p) for s in range(p) if wrap or 0 <= s + step < p]
    return jax.lax.ppermute(x, PIPE, perm)


def chunks(layers: dict, v: int) -> list[dict]:
    """The stored (L, ...) stack as v contiguous chunks of L/v layers. Sharded over the p stages, chunk r puts
    layers (r p + s) L/(p v) ... on stage s: its round-r logical stage of the circular schedule. (XLA moves the
    (v-1)/v of each stage's layers that the stored contiguous blocks keep elsewhere, and their gradients back,
    once per step; a split's transpose is a single concatenation.)"""
    parts = jax.tree.map(lambda w: jnp.split(w, v, axis=0), layers)
    return [jax.tree.map(lambda ps, r=r: ps[r], parts, is_leaf=lambda x: isinstance(x, list)) for r in range(v)]


class StageVjp:
    """A stage's forward with its vjp residuals split into the weights and the rest (activations).

    A schedule that keeps residuals between a stage's forward and its backward (1F1B's ring, a skippable tick's
    cond outputs) must keep only the activations: the weights are the stage's inputs anyway and are put back
    when the backward runs. ``forward`` records where each residual comes from (one layout for every trace;
    a trace with another layout is an error), ``backward`` rebuilds the vjp from the weights and the stored rest.
    """

    def __init__(self, run: Callable[..., jax.Array]):
        self.run = run
        self.tdef: Any = None
        self.where: tuple[int | None, ...] | None = None  # per residual: index into the weights, or None
        self.shapes: list[tuple[tuple[int, ...], Any, bool]] | None = None  # shape, dtype, varying over stages

    def forward(self, layers: dict, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """(run(layers, x), the vjp's residuals that are not weights)."""
        y, vjp = jax.vjp(self.run, layers, x)
        leaves, tdef = jax.tree.flatten(vjp)
        ids = {id(w): j for j, w in enumerate(jax.tree.leaves(layers))}
        where = tuple(ids.get(id(r)) for r in leaves)
        acts = [r for r, j in zip(leaves, where, strict=True) if j is None]
        shapes = [(a.shape, a.dtype, PIPE in jax.typeof(a).manual_axis_type.varying) for a in acts]
        if self.where is None:
            self.tdef, self.where, self.shapes = tdef, where, shapes  # the treedef holds the vjp's jaxpr
        elif (where, shapes) != (self.where, self.shapes):
            raise RuntimeError("pipeline: the stage's vjp residual layout differs between two traces of one function")
        return y, acts

    def zeros(self) -> list[jax.Array]:
        """Residuals of the layout's shapes, all zero (a stage that ran no forward)."""
        return [varying(jnp.zeros(shape, dtype)) if stage_varying else jnp.zeros(shape, dtype)
                for shape, dtype, stage_varying in self.shapes]

    def backward(self, layers: dict, acts: list[jax.Array], ct: jax.Array) -> tuple[dict, jax.Array]:
        """(d layers, d x) for the output cotangent ct, from the weights and ``forward``'s residuals."""
        leaves, rest = jax.tree.leaves(layers), iter(acts)
        vjp = jax.tree.unflatten(self.tdef, [next(rest) if j is None else leaves[j] for j in self.where])
        return vjp(ct)


def run_if(busy: jax.Array, stage: StageVjp, layers: dict, x: jax.Array) -> jax.Array:
    """``stage.run(layers, x)`` where ``busy`` (a traced bool, e.g. per stage), else ``x``, skipping the compute.

    A plain ``lax.cond`` does the same, but JAX's partial evaluation of a cond returns every residual of the
    branch as a cond output, weights included (it forwards none of the branch's inputs): each skippable tick
    then kept a copy of all the stage's weights until its backward (with all_but_weights: 209 -> 164 MiB temp
    of a bench pp2 bf16 step). Here the forward cond returns the activations only and the backward cond takes
    the weights as they are.
    """
    @jax.custom_vjp
    def f(busy, layers, x):
        return jax.lax.cond(busy, stage.run, lambda _, x: x, layers, x)

    def fwd(busy, layers, x):
        if stage.shapes is None:  # the first skippable tick: one abstract trace fixes the layout for the zeros
            jax.eval_shape(stage.forward, layers, x)
        y, acts = jax.lax.cond(busy, stage.forward, lambda _, x: (x, stage.zeros()), layers, x)
        return y, (busy, layers, acts)

    def bwd(res, ct):
        busy, layers, acts = res
        idle = lambda layers, _, ct: (varying(jax.tree.map(jnp.zeros_like, layers)), ct)  # noqa: E731
        dlayers, dx = jax.lax.cond(busy, stage.backward, idle, layers, acts, ct)
        return None, dlayers, dx

    f.defvjp(fwd, bwd)
    return f(busy, layers, x)
