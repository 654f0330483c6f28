"""1F1B over the ``pipeline`` axis, written out with ``jax.vjp``: after p - s warm-up forwards stage s alternates one
microbatch's forward with another's backward, keeping at most p - s microbatches' activations in a ring of p slots."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jax_impl import model
from jax_impl.model import ModelOptions
from jax_impl.pipeline.common import OUTER, PIPE, StageVjp, embed, outer_weights, shift, stage_fn, varying


def schedule(opts: ModelOptions, p: int, params: dict, tokens: jax.Array) -> tuple[jax.Array, dict]:
    """(mean loss, grads of params) by an explicit 1F1B schedule. Runs per stage (manual pipeline axis)."""
    stored = params
    params = {"layers": params["layers"], **outer_weights(opts, params)}  # as in gpipe.schedule
    m = tokens.shape[0]
    s = jax.lax.axis_index(PIPE)
    run = stage_fn(opts)
    layers = params["layers"]
    inputs, labels = tokens[:, :, :-1], tokens[:, :, 1:]  # (gas, batch, seq)
    act = jax.eval_shape(partial(embed, opts), params["embed"], inputs[0])  # (batch, seq, hidden)
    stage = StageVjp(run)
    # one abstract trace fixes the residual layout; the ring holds p microbatches of it (activations only)
    res_shapes = jax.eval_shape(lambda x: stage.forward(layers, varying(x))[1],
                                jax.ShapeDtypeStruct(act.shape, act.dtype))
    ring = [jnp.zeros((p, *r.shape), r.dtype) for r in res_shapes]  # each (stages, *residual)
    zeros_act = jnp.zeros(act.shape, act.dtype)
    grads0 = jax.tree.map(lambda w: jnp.zeros(w.shape, jnp.float32), params)

    def forward(state, i):
        recv_f, _, _, ring, grads, loss = state
        x = jax.lax.cond(s == 0, lambda: varying(embed(opts, params["embed"], inputs[i])), lambda: recv_f)
        y, acts = stage.forward(layers, x)
        ring = [buf.at[i % p].set(a) for buf, a in zip(ring, acts, strict=True)]

        def head(y, grads, loss):
            # last stage: loss and its gradient now; the cotangent waits for the next slot's backward
            fn = partial(model.head_loss, opts, labels=labels[i])
            li, (dy, dnorm, dhead) = jax.value_and_grad(fn, argnums=(0, 1, 2))(
                y, params["final_norm"], params["head"])
            grads = dict(grads, final_norm=grads["final_norm"] + dnorm / m, head=grads["head"] + dhead / m)
            return (dy / m).astype(y.dtype), grads, loss + li

        ct_head, grads, loss = jax.lax.cond(s == p - 1, head, lambda y, g, l: (varying(zeros_act), g, l),
                                            y, grads, loss)
        return y, varying(zeros_act), ct_head, ring, grads, loss

    def backward(state, i):
        _, recv_b, ct_head, ring, grads, loss = state
        ct = jnp.where(s == p - 1, ct_head, recv_b)  # (batch, seq, hidden)
        dlayers, dx = stage.backward(layers, [buf[i % p] for buf in ring], ct)
        grads = dict(grads, layers=jax.tree.map(jnp.add, grads["layers"], dlayers))

        def embed_grad(dx, g):  # stage 0: scatter the input cotangent into the embedding rows
            _, evjp = jax.vjp(lambda e: embed(opts, e, inputs[i]), params["embed"])
            return g + evjp(dx)[0]

        grads["embed"] = jax.lax.cond(s == 0, embed_grad, lambda dx, g: g, dx, grads["embed"])
        return varying(zeros_act), dx, ct_head, ring, grads, loss

    def slot(carry, k):
        recv_f, recv_b, ct_head, ring, grads, loss = carry
        fi, bi = k - s, k - (2 * p - 1 - s)  # 2x the microbatch index whose F / B this slot may run
        is_f = (fi % 2 == 0) & (fi >= 0) & (fi < 2 * m)
        is_b = (bi % 2 == 0) & (bi >= 0) & (bi < 2 * m)
        kind = jnp.where(is_f, 1, jnp.where(is_b, 2, 0))
        idle = lambda st, i: (varying(zeros_act), varying(zeros_act), *st[2:])  # noqa: E731
        out = jax.lax.switch(kind, (idle, forward, backward), (recv_f, recv_b, ct_head, ring, grads, loss),
                             jnp.where(is_f, fi, bi) // 2)
        send_f, send_b, ct_head, ring, grads, loss = out
        return (shift(send_f, p, +1), shift(send_b, p, -1), ct_head, ring, grads, loss), None

    init = varying((zeros_act, zeros_act, zeros_act, ring, grads0, jnp.zeros((), jnp.float32)))
    (*_, grads, loss), _ = jax.lax.scan(slot, init, jnp.arange(2 * (m + p - 1)))
    # back to storage shape; the vjp of the stage-varying cast is the sum over stages that puts the
    # embedding's grads (stage 0) and the head's (stage p-1) on every stage
    _, to_storage = jax.vjp(partial(outer_weights, opts), {k: stored[k] for k in OUTER})
    return jax.lax.psum(loss, PIPE) / m, {"layers": grads["layers"], **to_storage({k: grads[k] for k in OUTER})[0]}
