"""GPipe over the ``pipeline`` axis (plain or circular): ``jax.grad`` of a loop of ticks in which every stage runs
one microbatch; the head, loss and their backward run inside the tick that a microbatch leaves the last stage."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from configs import Config
from jax_impl import model
from jax_impl.model import ModelOptions
from jax_impl.pipeline.common import PIPE, SplitHead, StageVjp, embed, outer_weights, run_if, shift, stage_fn, varying


def schedule(cfg: Config, opts: ModelOptions, p: int, params: dict, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
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
    params = {"layers": params["layers"], **outer_weights(opts, params)}
    m = tokens.shape[0]
    v = cfg.jax.pipeline_repeats
    s = jax.lax.axis_index(PIPE)
    run = stage_fn(opts)
    stage = StageVjp(run)
    inputs, labels = tokens[:, :, :-1], tokens[:, :, 1:]  # (gas, batch, seq)
    act = jax.eval_shape(partial(embed, opts), params["embed"], inputs[0])
    norm_w, head_w = jax.lax.stop_gradient(params["final_norm"]), jax.lax.stop_gradient(params["head"])
    split = cfg.jax.pipeline_head == "split"
    if split:  # this stage's vocabulary columns s, s+p, ... (a strided slice keeps a tensor-sharded vocab local)
        V = head_w.shape[-1]
        head_w = jax.lax.dynamic_index_in_dim(head_w.reshape(-1, V // p, p), s, axis=2, keepdims=False)
        # the loss is combined over the stages inside (SplitHead) and is the same on every stage
        head_grad = jax.value_and_grad(
            lambda y, n, h, lab: model.head_loss(opts, y, n, h, lab, SplitHead(p)) / m, argnums=(0, 1, 2))
    else:
        head_grad = jax.value_and_grad(lambda y, n, h, lab: model.head_loss(opts, y, n, h, lab) / m, argnums=(0, 1, 2))
    f32 = jnp.float32
    # a model small enough to unroll its layers (JaxConfig.layer_unroll) unrolls its ticks too, as a
    # Python loop: no loop-carried residual stacks (-10 % step time, -8 to -15 % XLA temp on the bench
    # preset, pp2 GAS 4), and each tick knows statically which chunk it runs and whether the head does
    ticks, n_layers = m * v + p - 1, cfg.model.n_layers
    unrolled = cfg.jax.layer_unroll(n_layers) == n_layers and ticks <= 16 and not opts.ticks_as_scan
    # v > 1: params["layers"] is the list of this stage's v chunks (common.chunks); a traced tick indexes them stacked
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
        return rnd * lc  # traced ticks: the chunk's first layer, indexed inside each layer (see model.layers)

    def tick(carry, t):
        recv, buf, surrogate, loss, dnorm, dhead = carry  # recv: (batch, seq, hidden) from stage s-1 last tick
        static = isinstance(t, int)
        if v > 1:  # on stage 0, recv is the last stage's output of item t - p: park it until round r+1 starts
            buf = buf.at[(t - p) % m].set(recv)

        def feed():  # stage 0: microbatch t's embedding in round 0 (bubble ticks repeat the last one), else the buffer
            emb = lambda: varying(embed(opts, params["embed"], inputs[jnp.minimum(t, m - 1)]))  # noqa: E731
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
            y = run_if((t - s >= 0) & (t - s < m * v), stage, chunk(t), x)
        else:
            y = run(chunk(t), x) if static or v == 1 else run(stacked, x, start=chunk(t), count=lc)
        i = t - (p - 1) - (v - 1) * m  # the microbatch leaving the last stage after its last round this tick

        # the head's sums go into the branches: a stage that runs no head passes them through (returning zero
        # gradients to add filled and added a head-sized buffer per tick and stage)
        def last(y, sums):
            li, (dy, dn, dh) = head_grad(y, norm_w, head_w, labels[jnp.maximum(i, 0)])
            if split:  # every stage has li and y's cotangent: count them on the last stage only
                li, dy = jnp.where(s == p - 1, li, 0.0), jnp.where(s == p - 1, dy, 0)
            return varying((dy.astype(y.dtype), tuple(a + b for a, b in zip(sums, (li, dn, dh), strict=True))))

        def other(y, sums):
            return varying(jnp.zeros_like(y)), sums

        send = shift(y, p, +1, wrap=v > 1)
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
    carry = varying((jnp.zeros(act.shape, act.dtype), buf, zero, zero, jnp.zeros(norm_w.shape, f32),
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
