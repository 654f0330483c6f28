"""Pipeline parallelism over the ``pipeline`` mesh axis: GPipe (plain or circular) and 1F1B schedules.

Stage ``s`` of ``p`` stores only its contiguous slice of the stacked ``layers`` (``sharding.RULES``). The step
runs inside ``jax.shard_map`` with only ``pipeline`` manual, so stages hand activations on with ``lax.ppermute``
while the compiler keeps splitting each microbatch over ``data``/``fsdp`` and each weight over ``tensor``.
The embedding runs on stage 0; GPipe's head + loss are split over all stages by vocabulary columns
(``parallel.pipeline_head="split"``) so the last stage does not do them alone while the others wait; ``"last"``
and 1F1B keep them on the last stage. Their weights are stored on every stage: no extra collective in the
schedule, at 2 V h / TP parameters per device (``report_placement``).
GPipe is ``jax.grad`` of a tick loop; 1F1B is written out with ``jax.vjp`` and a ring of ``p`` residual slots,
so at most ``p - s`` microbatches' activations live on stage ``s``. Every layer runs under ``jax.checkpoint``
with a policy that never saves the weights (``all_but_weights``, ``_StageVjp``): what a schedule keeps for
the backward (1F1B's ring, the skipped fill/drain ticks) must be activations, not a copy of the stage.
Schedules, memory and the measurements behind each choice: docs/pipeline.md and docs/performance.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from configs import Config, validate_config
from jax_impl.model import DTYPES, PARAM_AXES, REMAT_POLICIES, all_but_weights, block, matmul, rms_norm, rope_tables
from jax_impl.sharding import PIPELINE_AXIS, constrain, gather_weight

PIPE = PIPELINE_AXIS
OUTER = ("embed", "final_norm", "head")  # weights outside the layer stack
TICKS_AS_SCAN = False  # benchmarks/ab_step.py lever:ticks=scan: unrolled ticks as an unrolled lax.scan (traced t)


def stages(mesh_shape: Any) -> int:
    return int(dict(mesh_shape).get(PIPE, 1))


def check(cfg: Config, mesh_shape: Any) -> None:
    """Pipeline config errors (stages, ZeRO stage, 1F1B's GAS) before anything is traced or compiled.

    The checks live in ``configs.validate_config``, which the CLIs run first; ``Trainer.build`` calls
    this so that programmatic users get the same messages.
    """
    if stages(mesh_shape) > 1:
        validate_config(cfg, math.prod(mesh_shape[a] for a in mesh_shape))


# --------------------------------------------------------------------------------------- pieces
def _stage_fn(cfg: Config, seq: int) -> Callable[..., jax.Array]:
    """This stage's layers: ``run(layers, x)`` scans x (batch, seq, hidden) through the local (L/p, ...) weights;
    ``run(layers, x, start=i, count=n)`` through layers i .. i+n-1 of them, i traced (a circular schedule's chunk)."""
    m, par = cfg.model, cfg.parallel
    dtype = DTYPES[cfg.train.dtype]
    cos, sin = rope_tables(seq, m.dim_head, m.rope_theta)
    block_fn = partial(block, m, dtype, par.attn_chunk, cos, sin, attn_impl=par.attn_impl, matmul_out=par.matmul_out)
    policy = REMAT_POLICIES[par.remat_policy]
    # without remat: every intermediate saved but the weights, so the backward reads them from the layer's inputs
    # (slices of the stage's stack) rather than from a stacked copy (what _StageVjp and _run_if rely on)
    layer = jax.checkpoint(block_fn, policy=policy if par.remat else all_but_weights, prevent_cse=False)

    def layer_at(x, layers, i):
        # the weights indexed *inside* the (checkpointed) layer: indexed outside, autodiff would save them per
        # tick as residuals (the 70B plan, pp8 x v2: 647 GiB temp); recomputing an index costs nothing
        w = jax.tree.map(lambda a: checkpoint_name(jax.lax.dynamic_index_in_dim(a, i, keepdims=False), "pipe_w"),
                         layers)
        return block_fn(x, w)

    layer_at = jax.checkpoint(layer_at, prevent_cse=False, policy=policy if par.remat else all_but_weights)
    unroll = par.layer_unroll(m.n_layers)  # as model.forward: small models unroll their layer loop

    def run(layers: dict, x: jax.Array, start: jax.Array | None = None, count: int = 0) -> jax.Array:
        if start is None:
            x, _ = jax.lax.scan(lambda c, w: (layer(c, w), None), x, layers, unroll=unroll)
        else:
            x, _ = jax.lax.scan(lambda c, j: (layer_at(c, layers, start + j), None), x, jnp.arange(count))
        return x

    return run


def _embed(cfg: Config, embed: jax.Array, tokens: jax.Array) -> jax.Array:
    """tokens (batch, seq) -> (batch, seq, hidden) in the compute dtype (as model.forward)."""
    V, h = cfg.model.padded_vocab, cfg.model.hidden
    table = gather_weight(embed, PARAM_AXES["embed"], (V, h))
    return constrain(jnp.take(table, tokens, axis=0).astype(DTYPES[cfg.train.dtype]), ("batch", "seq", "act_embed"))


def _head_loss(cfg: Config, y: jax.Array, final_norm: jax.Array, head: jax.Array, labels: jax.Array,
               split: int = 0) -> jax.Array:
    """Final norm + head + mean cross-entropy of one microbatch; y (batch, seq, hidden).

    With ``split`` = p stages, every stage runs this on the same y with ``head`` its columns ``s, s+p, s+2p, ...``
    (hidden, V/p): the log-partition and the gold logit are combined over the stages (an all-gather of
    (batch, seq) values and a psum)."""
    V, h = cfg.model.padded_vocab, cfg.model.hidden
    x = rms_norm(y, gather_weight(final_norm, ("norm",), (h,)), cfg.model.norm_eps, DTYPES[cfg.train.dtype])
    logits = constrain(matmul(x, head if split else gather_weight(head, PARAM_AXES["head"], (h, V))),
                       ("batch", "seq", "act_vocab"))  # (batch, seq, V or V/p)
    logz = jax.nn.logsumexp(logits, axis=-1)  # (batch, seq)
    cols = labels
    if split:
        logz = jax.nn.logsumexp(jax.lax.all_gather(logz, PIPE), axis=0)
        cols = jnp.where(labels % split == jax.lax.axis_index(PIPE), labels // split, -1)  # -1: not this stage's
    # model.cross_entropy picks the gold logit with take_along_axis; inside this loop, with vocab over
    # `tensor` and batch over `data`, that gather aborts XLA's SPMD partitioner (jax 0.10.2, CPU). A
    # one-hot sum is the same number (one nonzero term) and partitions as a plain reduction.
    gold = jnp.sum(jnp.where(jax.nn.one_hot(cols, logits.shape[-1], dtype=jnp.bool_), logits, 0.0), axis=-1)
    if split:
        gold = jax.lax.psum(gold, PIPE)
    return jnp.mean(logz - gold)


def _outer_weights(cfg: Config, params: dict) -> dict:
    """Embedding, final norm and head in logical shape, once per step: sliced inside the tick loop they
    would be saved per tick as residuals (8 x 0.5 GiB for the 70B head). Stage-varying (see _gpipe)."""
    V, h = cfg.model.padded_vocab, cfg.model.hidden
    shapes = {"embed": (V, h), "final_norm": (h,), "head": (h, V)}
    return {k: gather_weight(_varying(params[k]), PARAM_AXES[k], shapes[k]) for k in OUTER}


def _varying(x: Any) -> Any:
    """Mark fresh (stage-independent) values as varying over the pipeline axis, as loop carries must be."""
    def cast(a):
        return a if PIPE in jax.typeof(a).manual_axis_type.varying else jax.lax.pcast(a, PIPE, to="varying")

    return jax.tree.map(cast, x)


def _shift(x: jax.Array, p: int, step: int, wrap: bool = False) -> jax.Array:
    """Send to stage s + step (step = +1: activations forward, -1: cotangents backward); with ``wrap`` the last
    stage sends to the first (the circular schedule's next round)."""
    perm = [(s, (s + step) % p) for s in range(p) if wrap or 0 <= s + step < p]
    return jax.lax.ppermute(x, PIPE, perm)


def _chunks(layers: dict, v: int) -> list[dict]:
    """The stored (L, ...) stack as v contiguous chunks of L/v layers. Sharded over the p stages, chunk r puts
    layers (r p + s) L/(p v) ... on stage s: its round-r logical stage of the circular schedule. (XLA moves the
    (v-1)/v of each stage's layers that the stored contiguous blocks keep elsewhere, and their gradients back,
    once per step; a split's transpose is a single concatenation.)"""
    parts = jax.tree.map(lambda w: jnp.split(w, v, axis=0), layers)
    return [jax.tree.map(lambda ps, r=r: ps[r], parts, is_leaf=lambda x: isinstance(x, list)) for r in range(v)]


class _StageVjp:
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
        return [_varying(jnp.zeros(shape, dtype)) if varying else jnp.zeros(shape, dtype)
                for shape, dtype, varying in self.shapes]

    def backward(self, layers: dict, acts: list[jax.Array], ct: jax.Array) -> tuple[dict, jax.Array]:
        """(d layers, d x) for the output cotangent ct, from the weights and ``forward``'s residuals."""
        leaves, rest = jax.tree.leaves(layers), iter(acts)
        vjp = jax.tree.unflatten(self.tdef, [next(rest) if j is None else leaves[j] for j in self.where])
        return vjp(ct)


def _run_if(busy: jax.Array, stage: _StageVjp, layers: dict, x: jax.Array) -> jax.Array:
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
        idle = lambda layers, _, ct: (_varying(jax.tree.map(jnp.zeros_like, layers)), ct)  # noqa: E731
        dlayers, dx = jax.lax.cond(busy, stage.backward, idle, layers, acts, ct)
        return None, dlayers, dx

    f.defvjp(fwd, bwd)
    return f(busy, layers, x)


# --------------------------------------------------------------------------------------- GPipe
def _gpipe(cfg: Config, p: int, params: dict, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(surrogate, mean loss) over the microbatches; differentiate the surrogate for the GPipe backward.

    params: {"layers": local (L/p, ...) weights (with ``pipeline_repeats`` v > 1: a list of the stage's v
    chunks of L/(p v), see ``_chunks``), embed, final_norm, head}; tokens (gas, batch, seq+1). Runs per stage.
    Stage s works in tick t on item k = t - s: round r = k // m (its r-th chunk of layers) of microbatch
    k % m; m v + p - 1 ticks in all. A microbatch leaving the last stage before its last round goes back to
    stage 0 (ring shift) and waits in a buffer of m activations until its next round starts there, m - p
    ticks later.
    The last stage's output of the last round runs the head, the loss *and their backward* in that tick
    (overlapping the other stages' layers), outside autodiff; the surrogate
    ``sum_i <dL/dy_i, y_i> + <dL/dhead, head> + <dL/dnorm, norm>`` then has exactly the loss's gradient
    for every parameter. So no head weight or logits are saved per tick for the backward.
    """
    # outer weights as stage-varying values: their per-stage gradients then meet in a psum over stages
    # (the transpose of this cast), and model.matmul's custom vjp sees matching types
    params = {"layers": params["layers"], **_outer_weights(cfg, params)}
    m, seq = tokens.shape[0], tokens.shape[2] - 1
    v = cfg.parallel.pipeline_repeats
    s = jax.lax.axis_index(PIPE)
    run = _stage_fn(cfg, seq)
    stage = _StageVjp(run)
    inputs, labels = tokens[:, :, :-1], tokens[:, :, 1:]  # (gas, batch, seq)
    act = jax.eval_shape(partial(_embed, cfg), params["embed"], inputs[0])
    norm_w, head_w = jax.lax.stop_gradient(params["final_norm"]), jax.lax.stop_gradient(params["head"])
    split = cfg.parallel.pipeline_head == "split"
    if split:  # this stage's vocabulary columns s, s+p, ... (a strided slice keeps a tensor-sharded vocab local)
        V = head_w.shape[-1]
        head_w = jax.lax.dynamic_index_in_dim(head_w.reshape(-1, V // p, p), s, axis=2, keepdims=False)
        # the loss is reduced over the stages inside, so each stage's seed of 1 reaches every stage's share:
        # differentiate loss / p for the gradient of the loss (and report p x that value)
        split_grad = jax.value_and_grad(lambda y, n, h, lab: _head_loss(cfg, y, n, h, lab, split=p) / (m * p),
                                        argnums=(0, 1, 2))

        def head_grad(*args):
            li, grads = split_grad(*args)
            return li * p, grads
    else:
        head_grad = jax.value_and_grad(lambda y, n, h, lab: _head_loss(cfg, y, n, h, lab) / m, argnums=(0, 1, 2))
    f32 = jnp.float32
    # a model small enough to unroll its layers (ParallelConfig.layer_unroll) unrolls its ticks too, as a
    # Python loop: no loop-carried residual stacks (-10 % step time, -8 to -15 % XLA temp on the bench
    # preset, pp2 GAS 4), and each tick knows statically which chunk it runs and whether the head does
    ticks, n_layers = m * v + p - 1, cfg.model.n_layers
    unrolled = cfg.parallel.layer_unroll(n_layers) == n_layers and ticks <= 16 and not TICKS_AS_SCAN
    # v > 1: params["layers"] is the list of this stage's v chunks (see _chunks); a traced tick indexes them stacked
    chunks = params["layers"] if v > 1 else [params["layers"]]
    lc = jax.tree.leaves(chunks[0])[0].shape[0]  # layers per chunk
    stacked = jax.tree.map(lambda *c: jnp.concatenate(c), *chunks) if v > 1 and not unrolled else None

    def chunk(t):
        """This stage's layers for tick t: its chunk of round clip((t - s) // m). With t a Python int (unrolled
        ticks) every stage is in one of two rounds, usually the same one: that chunk, else a select of two."""
        if v == 1:
            return params["layers"]
        rnd = jnp.clip((t - s) // m, 0, v - 1)
        if isinstance(t, int):
            first, last = (min(max((t - q) // m, 0), v - 1) for q in (0, p - 1))  # stage 0's and p-1's round
            if first == last:
                return chunks[first]
            return jax.tree.map(lambda a, b: jnp.where(rnd == first, a, b), chunks[first], chunks[last])
        return rnd * lc  # traced ticks: the chunk's first layer, indexed inside each layer (see _stage_fn)

    def tick(carry, t):
        recv, buf, surrogate, loss, dnorm, dhead = carry  # recv: (batch, seq, hidden) from stage s-1 last tick
        static = isinstance(t, int)
        if v > 1:  # on stage 0, recv is the last stage's output of item t - p: park it until round r+1 starts
            buf = buf.at[(t - p) % m].set(recv)

        def feed():  # stage 0: microbatch t's embedding in round 0 (bubble ticks repeat the last one), else the buffer
            emb = lambda: _varying(_embed(cfg, params["embed"], inputs[jnp.minimum(t, m - 1)]))  # noqa: E731
            if v == 1 or (static and t < m):
                return emb()
            if static:
                return buf[t % m]
            return jax.lax.cond(t < m, emb, lambda: buf[t % m])

        if static:  # (a cond per unrolled tick trips XLA's conditional-sharding check on a tensor-sharded embedding)
            x = jnp.where(s == 0, feed(), recv)
        else:
            x = jax.lax.cond(s == 0, feed, lambda: recv)
        if static and not p - 1 <= t < m * v:
            # a fill or drain tick: the stages that hold no microbatch skip their layers (and so their backward),
            # leaving the cores to the busy stages' intra-op threads instead of computing on a bubble
            y = _run_if((t - s >= 0) & (t - s < m * v), stage, chunk(t), x)
        else:
            y = run(chunk(t), x) if static or v == 1 else run(stacked, x, start=chunk(t), count=lc)
        i = t - (p - 1) - (v - 1) * m  # the microbatch leaving the last stage after its last round this tick

        # the head's sums go into the branches: a stage that runs no head passes them through (returning zero
        # gradients to add filled and added a head-sized buffer per tick and stage)
        def last(y, sums):
            li, (dy, dn, dh) = head_grad(y, norm_w, head_w, labels[jnp.maximum(i, 0)])
            if split:  # every stage has li and y's cotangent: count them on the last stage only
                li, dy = jnp.where(s == p - 1, li, 0.0), jnp.where(s == p - 1, dy, 0)
            return _varying((dy.astype(y.dtype), tuple(a + b for a, b in zip(sums, (li, dn, dh), strict=True))))

        def other(y, sums):
            return _varying(jnp.zeros_like(y)), sums

        send = _shift(y, p, +1, wrap=v > 1)
        if static and i < 0:  # no microbatch leaves in this tick: no head work at all
            return (send, buf, surrogate, loss, dnorm, dhead), None
        if split:
            # every stage gets the microbatch leaving the last stage and runs its share of the head on it
            # (in fp32: a bf16 all-reduce here aborts XLA:CPU's AllReducePromotion pass, jax 0.10.2);
            # dn, dh: each stage's own share, summed over the stages after the loop
            y_out = jax.lax.psum(jnp.where(s == p - 1, jax.lax.stop_gradient(y).astype(f32), 0), PIPE).astype(y.dtype)
            run_head = last if static else partial(jax.lax.cond, i >= 0, last, other)
            dy, (loss, dnorm, dhead) = run_head(y_out, (loss, dnorm, dhead))
        else:
            dy, (loss, dnorm, dhead) = jax.lax.cond((s == p - 1) & (i >= 0), last, other, jax.lax.stop_gradient(y),
                                                    (loss, dnorm, dhead))
        surrogate = surrogate + jnp.sum(dy.astype(f32) * y.astype(f32))  # d/dy = dy
        return (send, buf, surrogate, loss, dnorm, dhead), None

    zero = jnp.zeros((), f32)
    buf = jnp.zeros((m, *act.shape), act.dtype) if v > 1 else None  # (gas, batch, seq, hidden)
    carry = _varying((jnp.zeros(act.shape, act.dtype), buf, zero, zero, jnp.zeros(norm_w.shape, f32),
                      jnp.zeros(head_w.shape, f32)))
    if unrolled:
        for t in range(ticks):
            carry, _ = tick(carry, t)
    else:
        carry, _ = jax.lax.scan(tick, carry, jnp.arange(ticks))
    _, _, surrogate, loss, dnorm, dhead = carry
    if split:  # this stage's columns back into the head's shape
        full = jnp.zeros((dhead.shape[0], dhead.shape[1], p), f32)
        dhead = jax.lax.dynamic_update_index_in_dim(full, dhead, s, axis=2).reshape(dhead.shape[0], -1)
    surrogate = (surrogate + jnp.sum(jax.lax.stop_gradient(dnorm) * params["final_norm"])
                 + jnp.sum(jax.lax.stop_gradient(dhead) * params["head"]))
    return jax.lax.psum(surrogate, PIPE), jax.lax.psum(loss, PIPE)


# --------------------------------------------------------------------------------------- 1F1B
def _one_f_one_b(cfg: Config, p: int, params: dict, tokens: jax.Array) -> tuple[jax.Array, dict]:
    """(mean loss, grads of params) by an explicit 1F1B schedule. Runs per stage (manual pipeline axis)."""
    stored = params
    params = {"layers": params["layers"], **_outer_weights(cfg, params)}  # as in _gpipe
    m, seq = tokens.shape[0], tokens.shape[2] - 1
    s = jax.lax.axis_index(PIPE)
    run = _stage_fn(cfg, seq)
    layers = params["layers"]
    inputs, labels = tokens[:, :, :-1], tokens[:, :, 1:]  # (gas, batch, seq)
    act = jax.eval_shape(partial(_embed, cfg), params["embed"], inputs[0])  # (batch, seq, hidden)
    stage = _StageVjp(run)
    # one abstract trace fixes the residual layout; the ring holds p microbatches of it (activations only)
    res_shapes = jax.eval_shape(lambda x: stage.forward(layers, _varying(x))[1],
                                jax.ShapeDtypeStruct(act.shape, act.dtype))
    ring = [jnp.zeros((p, *r.shape), r.dtype) for r in res_shapes]  # each (stages, *residual)
    zeros_act = jnp.zeros(act.shape, act.dtype)
    grads0 = jax.tree.map(lambda w: jnp.zeros(w.shape, jnp.float32), params)

    def forward(state, i):
        recv_f, _, _, ring, grads, loss = state
        x = jax.lax.cond(s == 0, lambda: _varying(_embed(cfg, params["embed"], inputs[i])), lambda: recv_f)
        y, acts = stage.forward(layers, x)
        ring = [buf.at[i % p].set(a) for buf, a in zip(ring, acts, strict=True)]

        def head(y, grads, loss):
            # last stage: loss and its gradient now; the cotangent waits for the next slot's backward
            fn = partial(_head_loss, cfg, labels=labels[i])
            li, (dy, dnorm, dhead) = jax.value_and_grad(fn, argnums=(0, 1, 2))(
                y, params["final_norm"], params["head"])
            grads = dict(grads, final_norm=grads["final_norm"] + dnorm / m, head=grads["head"] + dhead / m)
            return (dy / m).astype(y.dtype), grads, loss + li

        ct_head, grads, loss = jax.lax.cond(s == p - 1, head, lambda y, g, l: (_varying(zeros_act), g, l),
                                            y, grads, loss)
        return y, _varying(zeros_act), ct_head, ring, grads, loss

    def backward(state, i):
        _, recv_b, ct_head, ring, grads, loss = state
        ct = jnp.where(s == p - 1, ct_head, recv_b)  # (batch, seq, hidden)
        dlayers, dx = stage.backward(layers, [buf[i % p] for buf in ring], ct)
        grads = dict(grads, layers=jax.tree.map(jnp.add, grads["layers"], dlayers))

        def embed_grad(dx, g):  # stage 0: scatter the input cotangent into the embedding rows
            _, evjp = jax.vjp(lambda e: _embed(cfg, e, inputs[i]), params["embed"])
            return g + evjp(dx)[0]

        grads["embed"] = jax.lax.cond(s == 0, embed_grad, lambda dx, g: g, dx, grads["embed"])
        return _varying(zeros_act), dx, ct_head, ring, grads, loss

    def slot(carry, k):
        recv_f, recv_b, ct_head, ring, grads, loss = carry
        fi, bi = k - s, k - (2 * p - 1 - s)  # 2x the microbatch index whose F / B this slot may run
        is_f = (fi % 2 == 0) & (fi >= 0) & (fi < 2 * m)
        is_b = (bi % 2 == 0) & (bi >= 0) & (bi < 2 * m)
        kind = jnp.where(is_f, 1, jnp.where(is_b, 2, 0))
        idle = lambda st, i: (_varying(zeros_act), _varying(zeros_act), *st[2:])  # noqa: E731
        out = jax.lax.switch(kind, (idle, forward, backward), (recv_f, recv_b, ct_head, ring, grads, loss),
                             jnp.where(is_f, fi, bi) // 2)
        send_f, send_b, ct_head, ring, grads, loss = out
        return (_shift(send_f, p, +1), _shift(send_b, p, -1), ct_head, ring, grads, loss), None

    init = _varying((zeros_act, zeros_act, zeros_act, ring, grads0, jnp.zeros((), jnp.float32)))
    (*_, grads, loss), _ = jax.lax.scan(slot, init, jnp.arange(2 * (m + p - 1)))
    # back to storage shape; the vjp of the stage-varying cast is the sum over stages that puts the
    # embedding's grads (stage 0) and the head's (stage p-1) on every stage
    _, to_storage = jax.vjp(partial(_outer_weights, cfg), {k: stored[k] for k in OUTER})
    return jax.lax.psum(loss, PIPE) / m, {"layers": grads["layers"], **to_storage({k: grads[k] for k in OUTER})[0]}


# --------------------------------------------------------------------------------------- entry
def _specs(params: dict) -> dict:
    return {k: (jax.tree.map(lambda _: P(PIPE), v) if k == "layers" else P()) for k, v in params.items()}


def loss_and_grads(cfg: Config, mesh: Mesh, params: dict, batch: jax.Array) -> tuple[jax.Array, dict]:
    """Mean loss and mean gradients over the ``gas`` microbatches of ``batch`` (gas, dp*mbs, seq+1).

    ``params`` are the stored (maybe padded) trees with ``layers`` sharded over ``pipeline``; the
    result equals ``jax.value_and_grad`` of the non-pipelined loss averaged over the microbatches.
    """
    p = stages(mesh.shape)
    check(cfg, mesh.shape)
    specs = _specs(params)
    if cfg.parallel.pipeline_schedule == "gpipe":
        v = cfg.parallel.pipeline_repeats
        if v > 1:  # the layers as v chunks (circular schedule), each sharded over the stages
            specs = dict(specs, layers=[specs["layers"]] * v)
        staged = jax.shard_map(partial(_gpipe, cfg, p), mesh=mesh, in_specs=(specs, P()), out_specs=(P(), P()),
                               axis_names={PIPE})

        def fn(params, batch):
            return staged(dict(params, layers=_chunks(params["layers"], v)) if v > 1 else params, batch)

        (_, loss), grads = jax.value_and_grad(fn, has_aux=True)(params, batch)
        return loss, grads
    fn = jax.shard_map(partial(_one_f_one_b, cfg, p), mesh=mesh, in_specs=(specs, P()), out_specs=(P(), specs),
                       axis_names={PIPE})
    return fn(params, batch)


def report_placement(cfg: Config, mesh_shape: Any) -> dict[str, int]:
    """Parameter counts per device of the stage's layers and of the embedding/head copy every stage keeps."""
    m, p, tp = cfg.model, stages(mesh_shape), int(dict(mesh_shape).get("tensor", 1))
    layer_params = (m.n_params() - 2 * m.padded_vocab * m.hidden - m.hidden) // m.n_layers
    return {"layers_per_stage": m.n_layers // p, "stage_layer_params": m.n_layers // p * layer_params // tp,
            "embed_head_params": 2 * m.padded_vocab * m.hidden // tp + m.hidden}
