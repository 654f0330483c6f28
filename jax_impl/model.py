"""Llama-2 in Flax NNX: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Layers are stored stacked along a leading ``layers`` axis and run with ``lax.scan``, so a
70B model compiles as one layer. Parameters carry *logical* axis names only (``embed``,
``heads``, ``mlp``, ...); ``jax_impl.sharding`` owns the one table that maps them to mesh
axes. Weights are (in, out) matrices, so every projection is a plain ``x @ W``.

Parameter names (and shapes; L layers, h hidden, H*D query width, K*D key/value width, F ffn):
    embed (V, h)                head (h, V)                     final_norm (h,)
    layers.attn_norm (L, h)     layers.wq (L, h, H*D)           layers.wk (L, h, K*D)
    layers.wv (L, h, K*D)       layers.wo (L, H*D, h)           layers.mlp_norm (L, h)
    layers.w_gate (L, h, F)     layers.w_up (L, h, F)           layers.w_down (L, F, h)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from configs import Config, ModelConfig
from configs import rope as configs_rope
from jax_impl.sharding import (
    FROM_COPY,
    GRAD_SHARDED_AS,
    ZeroPlan,
    constrain,
    gather_weight,
    scatter_layer_grads,
    weight_grad_fn,
)

# logical axis names of every parameter, by name (the model's whole sharding vocabulary)
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "head": ("embed", "vocab"),
    "final_norm": ("norm",),
    "attn_norm": ("layers", "norm"),
    "wq": ("layers", "embed", "heads"),
    "wk": ("layers", "embed", "kv_heads"),
    "wv": ("layers", "embed", "kv_heads"),
    "wo": ("layers", "heads", "embed"),
    "mlp_norm": ("layers", "norm"),
    "w_gate": ("layers", "embed", "mlp"),
    "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
}

WEIGHTS = "layer_w"  # checkpoint name of a layer's weights as its matmuls read them (see block)
KEPT_ATTN, KEPT_MLP = "kept_attn", "kept_mlp"  # checkpoint names of what save_matmuls / save_mlp keep (_kept)

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}  # train.dtype -> compute dtype

def _vjp_name(params: dict) -> str:
    """The name of a custom_vjp function, from its call's parameters (its backward rule is ``<name>_bwd``)."""
    return getattr(params.get("bwd"), "__name__", "").removesuffix("_bwd")


def all_but_weights(prim: Any, *_, **params: Any) -> bool:
    """Remat policy: save every intermediate but the layer's weights as its matmuls read them (``WEIGHTS``,
    ``pipe_w``) and the resharding or slicing that makes them from the layer's inputs. The backward then reads
    the weights from the inputs -- slices of the stored stack, which the layer scan's vjp keeps as that stack
    itself -- instead of a stacked copy of them saved for it (42B, TP=6 + ZeRO-2, no recompute: 25 GiB of
    per-device temp, docs/memory.md). (jax 0.10.2's ``save_anything_except_these_names`` saves named values
    too: it ignores its names.)"""
    if prim.name == "name":
        return params["name"] not in (WEIGHTS, "pipe_w")
    if prim.name == "custom_vjp_call":  # the weight's gradient-sharding identity or compute-copy read (gather_weight)
        return _vjp_name(params) not in (GRAD_SHARDED_AS, FROM_COPY)
    return prim.name not in ("sharding_constraint", "slice")


def no_dot_recompute(prim: Any, *_, **params: Any) -> bool:
    """Remat policy for training without activation checkpointing: the inputs of every matmul, of attention
    and of the norms, and the gate/up projections SiLU reads (``_kept``), so the backward recomputes no dot of
    the layer's projections -- only elementwise work (norms, rotary, SiLU) and the attention's scores -- and
    never a weight (as all_but_weights)."""
    return prim.name == "name" and params["name"] in (KEPT_ATTN, KEPT_MLP)


REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
    # no matmul recomputed: the projections are custom_vjp calls, which save_dots does not see as dots
    "save_matmuls": no_dot_recompute,
    # the MLP's matmuls not recomputed, the attention block's are (its q/k/v/o projections and scores)
    "save_mlp": jax.checkpoint_policies.save_only_these_names(KEPT_MLP),
}
# what a layer saves for the backward when parallel.remat is off (docs/memory.md)
NO_REMAT_POLICY: Callable = all_but_weights


@dataclass(frozen=True)
class ModelOptions:
    """How the model's math runs: everything ``embed``, ``layers``, ``head_loss`` and ``forward`` read besides
    the parameters and the tokens. Built once per trainer (``from_config``); ``ModelOptions(model_cfg)`` is
    the plain single-device model."""

    cfg: ModelConfig
    dtype: Any = jnp.float32  # compute dtype
    remat: bool = False
    remat_policy: str = "full"  # REMAT_POLICIES key (with remat)
    attn_chunk: int = 0
    attn_impl: str = "xla"
    unroll: int = 1  # layers per iteration of the layer scan
    matmul_out: str = "fp32"  # the projections' output dtype: fp32 or the compute dtype ("compute")
    # activations between the blocks split along the sequence over the tensor shards (the act_seq rule)
    sequence_parallel: bool = False
    # how the parameters are stored (ZeRO): gather_weight brings each to its compute layout; None: as computed
    plan: ZeroPlan | None = None
    # GPipe: a model whose ticks would be unrolled as Python steps runs them as a lax.scan instead (the earlier
    # schedule, kept for benchmarks/ab_step.py's lever:ticks=scan); never set from a config
    ticks_as_scan: bool = False

    @classmethod
    def from_config(cls, cfg: Config, plan: ZeroPlan | None = None) -> ModelOptions:
        p, j, m = cfg.parallel, cfg.jax, cfg.model
        return cls(m, dtype=DTYPES[cfg.train.dtype], remat=p.remat, remat_policy=p.remat_policy,
                   attn_chunk=j.attn_chunk, attn_impl=j.attn_impl, unroll=j.layer_unroll(m.n_layers),
                   matmul_out=j.matmul_out, sequence_parallel=j.sequence_parallel, plan=plan)

    def gather(self, w: jax.Array, names: tuple[str, ...], shape: tuple[int, ...], stacked: bool = False) -> jax.Array:
        """A stored weight in compute layout and logical shape (``sharding.gather_weight`` under ``plan``);
        ``stacked``: one layer's slice of the layer stack."""
        return gather_weight(w, names, shape, self.plan, stacked)

    def weight_grad(self, names: tuple[str, ...], shape: tuple[int, ...], stacked: bool = False) -> Callable | None:
        """How a weight read by ``gather`` forms its gradient in its matmul's backward
        (``sharding.weight_grad_fn`` under ``plan``; None: one dot, reduced by the partitioner)."""
        return weight_grad_fn(names, shape, self.plan, stacked)

    def constrain(self, x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
        return constrain(x, names, self.sequence_parallel)

    @property
    def policy(self) -> Callable | None:
        """The layer's remat policy: what it saves for the backward (never the weights without remat)."""
        return REMAT_POLICIES[self.remat_policy] if self.remat else NO_REMAT_POLICY


def _param(rngs: nnx.Rngs, std: float, shape: tuple[int, ...], name: str) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, out_sharding=PARAM_AXES[name], eager_sharding=False)


def _ones(shape: tuple[int, ...], name: str) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, jnp.float32), out_sharding=PARAM_AXES[name], eager_sharding=False)


def matmul(x: jax.Array, w: jax.Array, out_dtype=jnp.float32,
           dw: Callable[[jax.Array, jax.Array], jax.Array] | None = None) -> jax.Array:
    """x (..., k) @ w (k, n) in x's dtype with fp32 accumulation; returns ``out_dtype`` (fp32 by default).

    The backward pass casts the cotangent to x's dtype first, so every dot -- weight
    gradients included -- is compute-dtype in, fp32-accumulated (XLA:CPU runs bf16->bf16 dots ~6x
    slower than bf16->fp32, hence the fp32 output there). ``out_dtype=x.dtype`` writes the
    result (and the input gradient) in the compute dtype instead: on a GPU the library still
    accumulates in fp32, and half the activation bytes are written and kept for the backward pass.
    Weight gradients are fp32 either way. In fp32 this is an ordinary matmul. ``dw``: how the weight
    gradient is formed from x and the cotangent (``ModelOptions.weight_grad``; None: one dot).
    """
    return _matmul(x, w, jnp.dtype(out_dtype), dw)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x: jax.Array, w: jax.Array, out, dw_fn=None) -> jax.Array:
    return jnp.matmul(x, w.astype(x.dtype), preferred_element_type=out)


def _matmul_fwd(x, w, out, dw_fn):
    return _matmul(x, w, out, dw_fn), (x, w)


def _matmul_bwd(out, dw_fn, res, ct):
    x, w = res
    ct = ct.astype(x.dtype)
    wc = w.astype(x.dtype)
    dx = jnp.matmul(ct, wc.T, preferred_element_type=out).astype(x.dtype)
    if dw_fn is not None:
        return dx, dw_fn(x, ct).astype(w.dtype)
    # dW = sum over (batch, seq) of x^T ct, contracted over the leading dims as they are: on
    # XLA:CPU this bf16 dot runs 2-4x faster than flattening to 2-D first (x.reshape(-1, k).T @ ...).
    lead = tuple(range(x.ndim - 1))
    dw = jax.lax.dot_general(x, ct, ((lead, lead), ((), ())), preferred_element_type=jnp.float32)
    return dx, dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def rms_norm(x: jax.Array, w: jax.Array, eps: float, dtype) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w).astype(dtype)


def rope_tables(seq: int, dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables (seq, dim) fp32 for non-interleaved ("rotate half") rotary embeddings.

    Host constants, not traced ops: traced, XLA fused sin/cos into every fusion that reads the tables and
    evaluated them once per element of q and k, in every layer, forward and backward (4.5 % of the CPU time
    of a bench step). The one definition both models use (``configs.rope``), so torch_ref's are the same bits.
    """
    return configs_rope.rope_tables(int(seq), int(dim), float(theta))


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (batch, seq, heads, head_dim); rotation in fp32, result in x's dtype."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos[None, :, None, :] + rotated * sin[None, :, None, :]).astype(x.dtype)


def _probs(qh: jax.Array, kh: jax.Array, q_offset) -> jax.Array:
    """Causal softmax(q k^T / sqrt(d)) in fp32, cast to k's dtype: (batch, kv_heads, group, cq, seq).

    qh (batch, kv_heads, group, cq, head_dim), kh (batch, kv_heads, seq, head_dim): head-major, so that the
    score dot's natural output order (batch dims, lhs free, rhs free) is the softmax's layout."""
    cq, s, hd = qh.shape[3], kh.shape[2], qh.shape[-1]
    scores = jnp.einsum("bngqd,bnkd->bngqk", qh, kh, preferred_element_type=jnp.float32) / jnp.sqrt(hd)
    mask = (q_offset + jnp.arange(cq))[:, None] >= jnp.arange(s)[None, :]  # (cq, seq)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).astype(kh.dtype)


def _heads_major(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(batch, seq, kv_heads, [group,] head_dim) -> (batch, kv_heads, [group,] seq, head_dim): the score-sized
    dots then need no transposes of their (seq x seq) operands or results on XLA:CPU, only of these small ones."""
    return q.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


@jax.custom_vjp
def _attend(q: jax.Array, k: jax.Array, v: jax.Array, q_offset) -> jax.Array:
    """q (batch, cq, kv_heads, group, head_dim) attends causally to all of k, v (batch, seq, kv_heads, head_dim)."""
    return _attend_fwd(q, k, v, q_offset)[0]  # (batch, cq, kv_heads, group, head_dim)


def _attend_fwd(q, k, v, q_offset):
    qh, kh, vh = _heads_major(q, k, v)
    probs = _probs(qh, kh, q_offset)  # (batch, kv_heads, group, cq, seq)
    out = jnp.einsum("bngqk,bnkd->bngqd", probs, vh, preferred_element_type=jnp.float32).astype(q.dtype)
    return out.transpose(0, 3, 1, 2, 4), (qh, kh, vh, probs)


def _attend_bwd(res, dout):
    """The softmax-attention backward written out, so that the weight-like products (dK, dV) contract the
    score-sized operand along its major axes as the *right* operand: XLA:CPU then transposes the small
    (seq x head_dim) operands instead of copying the (cq x seq) probabilities (docs/performance.md)."""
    qh, kh, vh, probs = res
    f32, scale = jnp.float32, 1.0 / jnp.sqrt(qh.shape[-1]).astype(jnp.float32)
    dout = dout.astype(qh.dtype).transpose(0, 2, 3, 1, 4)  # (batch, kv_heads, group, cq, head_dim)
    dprobs = jnp.einsum("bngqd,bnkd->bngqk", dout, vh, preferred_element_type=f32)
    p32 = probs.astype(f32)
    dscores = (p32 * (dprobs - jnp.sum(dprobs * p32, axis=-1, keepdims=True)) * scale).astype(qh.dtype)
    dv = jnp.einsum("bngqd,bngqk->bndk", dout, probs, preferred_element_type=f32)  # (batch, kv, head_dim, seq)
    dk = jnp.einsum("bngqd,bngqk->bndk", qh, dscores, preferred_element_type=f32)
    dq = jnp.einsum("bngqk,bnkd->bngqd", dscores, kh, preferred_element_type=f32)
    to_kv = lambda t, like: t.transpose(0, 3, 1, 2).astype(like.dtype)  # noqa: E731 -- (b, n, d, s) -> (b, s, n, d)
    return dq.transpose(0, 3, 1, 2, 4).astype(qh.dtype), to_kv(dk, kh), to_kv(dv, vh), None  # q_offset: a position


_attend.defvjp(_attend_fwd, _attend_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int = 0, impl: str = "xla") -> jax.Array:
    """Causal grouped-query attention.

    q (batch, seq, heads, head_dim); k, v (batch, seq, kv_heads, head_dim). Query head j
    reads KV head j // (heads / kv_heads). Scores and softmax in fp32. With ``chunk`` > 0
    and seq > chunk, queries go in blocks of ``chunk``, each recomputed in the backward
    pass, so the live score tensor is (chunk x seq) rather than (seq x seq): at seq 4096 the
    70B's full scores are 4 GiB per sample. ``impl="cudnn"`` uses cuDNN's fused kernel instead (GPU only).
    """
    b, s, nh, hd = q.shape
    nkv = k.shape[2]
    if impl == "cudnn":  # fused flash attention on NVIDIA GPUs (bf16/fp16 only); GQA handled by cuDNN
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn").reshape(b, s, nh * hd)
    q = q.reshape(b, s, nkv, nh // nkv, hd)  # (batch, seq, kv_heads, group, head_dim)
    if chunk <= 0 or s <= chunk or s % chunk:
        out = _attend(q, k, v, 0)
    else:
        # query block i sees keys 0 .. (i+1)*chunk - 1 only: the blocks above the causal diagonal are never
        # computed (the (n+1)/2n of the score work that is left for n blocks), each block's probabilities
        # are recomputed in the backward pass (live scores: chunk x seq at most)
        one = jax.checkpoint(_attend, prevent_cse=False, static_argnums=(3,))
        out = jnp.concatenate([one(q[:, i:i + chunk], k[:, :i + chunk], v[:, :i + chunk], i)
                               for i in range(0, s, chunk)], axis=1)
    return out.reshape(b, s, nh * hd)  # (batch, seq, heads*head_dim)


def _kept(v: jax.Array, group: str) -> jax.Array:
    """v named as kept for the backward by the save_matmuls policy (both groups) or save_mlp (``KEPT_MLP``): the
    inputs of every matmul, of attention and of the norms, and the gate/up projections SiLU reads."""
    return checkpoint_name(v, group)


_BETWEEN = ("batch", "act_seq", "act_embed")  # activations between the blocks (sequence-parallel over tensor)


def block(opts: ModelOptions, cos: jax.Array, sin: jax.Array, x: jax.Array, p: dict) -> jax.Array:
    """One pre-norm transformer layer. x (batch, seq, hidden) in the compute dtype; ``p``: one layer's
    (stored) weights."""
    cfg, dtype, constrain = opts.cfg, opts.dtype, opts.constrain
    h, nh, nkv, hd, f = cfg.hidden, cfg.n_heads, cfg.n_kv_heads, cfg.dim_head, cfg.ffn_hidden
    b, s, _ = x.shape
    # named: a remat policy that leaves WEIGHTS out saves no copy of them for the backward (jax_impl.pipeline)
    shapes = {"attn_norm": (h,), "wq": (h, nh * hd), "wk": (h, nkv * hd), "wv": (h, nkv * hd), "wo": (nh * hd, h),
              "mlp_norm": (h,), "w_gate": (h, f), "w_up": (h, f), "w_down": (f, h)}
    w = {k: checkpoint_name(opts.gather(p[k], PARAM_AXES[k][1:], shape, stacked=True), WEIGHTS)
         for k, shape in shapes.items()}

    def gathered_seq(y):  # a norm's output with its whole sequence, as the projections read it (SP's all-gather)
        return constrain(y, ("batch", "seq", "act_embed"))

    out_dtype = dtype if opts.matmul_out == "compute" else jnp.float32

    def mm(inp, name):  # inp @ w[name], its weight gradient formed as the plan wants it
        return matmul(inp, w[name], out_dtype, opts.weight_grad(PARAM_AXES[name][1:], shapes[name], stacked=True))

    y = gathered_seq(_kept(constrain(rms_norm(x, w["attn_norm"], cfg.norm_eps, dtype), _BETWEEN), KEPT_ATTN))
    q = mm(y, "wq").astype(dtype).reshape(b, s, nh, hd)  # (batch, seq, heads, head_dim)
    k = mm(y, "wk").astype(dtype).reshape(b, s, nkv, hd)  # (batch, seq, kv_heads, head_dim)
    v = mm(y, "wv").astype(dtype).reshape(b, s, nkv, hd)
    q = _kept(constrain(apply_rope(q, cos, sin), ("batch", "seq", "act_heads", None)), KEPT_ATTN)
    k = _kept(constrain(apply_rope(k, cos, sin), ("batch", "seq", "act_kv_heads", None)), KEPT_ATTN)
    v = _kept(v, KEPT_ATTN)
    a = attention(q, k, v, opts.attn_chunk, opts.attn_impl)  # (batch, seq, heads*head_dim)
    a = _kept(checkpoint_name(a, "attn_out"), KEPT_ATTN)
    x = _kept(x + constrain(mm(a, "wo").astype(dtype), _BETWEEN), KEPT_MLP)

    y = gathered_seq(_kept(constrain(rms_norm(x, w["mlp_norm"], cfg.norm_eps, dtype), _BETWEEN), KEPT_MLP))
    g = _kept(mm(y, "w_gate"), KEPT_MLP)  # (batch, seq, ffn)
    u = _kept(mm(y, "w_up"), KEPT_MLP)
    m = constrain((jax.nn.silu(g.astype(jnp.float32)) * u).astype(dtype), ("batch", "seq", "act_mlp"))
    m = _kept(m, KEPT_MLP)
    return x + constrain(mm(m, "w_down").astype(dtype), _BETWEEN)


class Layers(nnx.Module):
    """All transformer layers' weights, stacked on a leading ``layers`` axis."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        L, h, f = cfg.n_layers, cfg.hidden, cfg.ffn_hidden
        qd, kvd = cfg.n_heads * cfg.dim_head, cfg.n_kv_heads * cfg.dim_head
        self.attn_norm = _ones((L, h), "attn_norm")
        self.wq = _param(rngs, cfg.std, (L, h, qd), "wq")
        self.wk = _param(rngs, cfg.std, (L, h, kvd), "wk")
        self.wv = _param(rngs, cfg.std, (L, h, kvd), "wv")
        self.wo = _param(rngs, cfg.out_std, (L, qd, h), "wo")
        self.mlp_norm = _ones((L, h), "mlp_norm")
        self.w_gate = _param(rngs, cfg.std, (L, h, f), "w_gate")
        self.w_up = _param(rngs, cfg.std, (L, h, f), "w_up")
        self.w_down = _param(rngs, cfg.out_std, (L, f, h), "w_down")


class Llama(nnx.Module):
    """Parameter container and initializer; the math is the pure function ``forward``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        V, h = cfg.padded_vocab, cfg.hidden
        self.embed = _param(rngs, cfg.embed_init_std, (V, h), "embed")
        self.layers = Layers(cfg, rngs)
        self.final_norm = _ones((h,), "final_norm")
        self.head = _param(rngs, cfg.std, (h, V), "head")

    def __call__(self, tokens: jax.Array, **kw: Any) -> jax.Array:
        return forward(self.cfg, nnx.to_pure_dict(nnx.state(self, nnx.Param)), tokens, **kw)


def init_params(cfg: ModelConfig, seed: int) -> dict:
    """Initial parameters as a plain nested dict (same seed -> same weights on any mesh)."""
    return nnx.to_pure_dict(nnx.state(Llama(cfg, rngs=nnx.Rngs(seed)), nnx.Param))


# ------------------------------------------------------------------ the model as functions of explicit arguments
def embed(opts: ModelOptions, table: jax.Array, tokens: jax.Array, *, whole_seq: bool = False) -> jax.Array:
    """tokens (batch, seq) -> (batch, seq, hidden) in the compute dtype; ``table`` the (stored) embedding.
    ``whole_seq``: not split along the sequence even when sequence-parallel (a pipeline stage's carry)."""
    V, h = opts.cfg.padded_vocab, opts.cfg.hidden
    x = jnp.take(opts.gather(table, PARAM_AXES["embed"], (V, h)), tokens, axis=0).astype(opts.dtype)
    return opts.constrain(x, ("batch", "seq", "act_embed") if whole_seq else _BETWEEN)


def layers(opts: ModelOptions, stack: dict, x: jax.Array, *, start: jax.Array | None = None,
           count: int = 0) -> jax.Array:
    """x (batch, seq, hidden) through the decoder layers of ``stack`` ({name: (n, ...)}, stored weights), one
    ``lax.scan`` step per layer, each under ``jax.checkpoint`` with ``opts.policy``. With ``start`` (traced) and
    ``count``: through layers start .. start+count-1 of the stack only (a circular pipeline schedule's chunk)."""
    cos, sin = rope_tables(x.shape[1], opts.cfg.dim_head, opts.cfg.rope_theta)
    block_fn = partial(block, opts, cos, sin)
    if start is None:
        # without remat every intermediate is still saved, but not the weights: the backward reads them from the
        # stored stack instead of a stacked copy the scan would keep (see all_but_weights)
        # not inside a pipeline stage (a shard_map over `pipeline`: its schedules save and replay layers themselves)
        if (CARRY_BITS and opts.remat and opts.policy is None and x.dtype == jnp.bfloat16
                and not jax.sharding.get_abstract_mesh().manual_axes):
            layer = partial(_layer_saving_bits, block_fn)
        else:
            layer = jax.checkpoint(block_fn, policy=opts.policy, prevent_cse=False)
        # ZeRO by layer: the stack's gradient is reduce-scattered once, after every layer's backward
        stack = {k: scatter_layer_grads(v, PARAM_AXES[k], opts.plan) for k, v in stack.items()}
        x, _ = jax.lax.scan(lambda carry, p: (layer(carry, p), None), x, stack, unroll=opts.unroll)
        return x

    def layer_at(x, stack, i):
        # the weights indexed *inside* the (checkpointed) layer: indexed outside, autodiff would save them per
        # step as residuals (the 70B plan, pp8 x v2: 647 GiB temp); recomputing an index costs nothing
        w = jax.tree.map(lambda a: checkpoint_name(jax.lax.dynamic_index_in_dim(a, i, keepdims=False), "pipe_w"),
                         stack)
        return block_fn(x, w)

    layer_at = jax.checkpoint(layer_at, prevent_cse=False, policy=opts.policy)
    x, _ = jax.lax.scan(lambda c, j: (layer_at(c, stack, start + j), None), x, jnp.arange(count))
    return x


CARRY_BITS = True


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _layer_saving_bits(fn: Callable, x: jax.Array, p: Any) -> jax.Array:
    """``jax.checkpoint(fn)`` with nothing saved (full remat), but the layer input it keeps for the backward kept as
    its uint16 bits. XLA:CPU's float-normalization-bf16 pass runs the backward loop's bf16 dynamic-slice of the
    stacked inputs in fp32, through an fp32 convert of the whole stack hoisted out of the loop (70B, MBS 2:
    f32[80,2,4096,8192], 20 GiB beside the 10 GiB of bf16); an integer stack is sliced as it is. The carry itself
    stays bf16 (an integer carry would get no gradient)."""
    return fn(x, p)


def _layer_saving_bits_fwd(fn, x, p):
    return fn(x, p), (jax.lax.bitcast_convert_type(x, jnp.uint16), p)


def _layer_saving_bits_bwd(fn, res, ct):
    bits, p = res
    _, vjp = jax.vjp(fn, jax.lax.bitcast_convert_type(bits, jnp.bfloat16), p)
    return vjp(ct)


_layer_saving_bits.defvjp(_layer_saving_bits_fwd, _layer_saving_bits_bwd)


def logits(opts: ModelOptions, x: jax.Array, final_norm: jax.Array, head: jax.Array, *,
           head_gathered: bool = False) -> jax.Array:
    """Final norm + head: x (batch, seq, hidden) -> fp32 logits (batch, seq, vocab). ``head_gathered``: ``head``
    is already in compute layout (e.g. a slice of its vocabulary columns), used as it is."""
    V, h = opts.cfg.padded_vocab, opts.cfg.hidden
    x = rms_norm(x, opts.gather(final_norm, PARAM_AXES["final_norm"], (h,)), opts.cfg.norm_eps, opts.dtype)
    if head_gathered:
        w, dw = head, None
    else:
        w, dw = opts.gather(head, PARAM_AXES["head"], (h, V)), opts.weight_grad(PARAM_AXES["head"], (h, V))
    return opts.constrain(matmul(x, w, dw=dw), ("batch", "seq", "act_vocab"))


class VocabSplit(Protocol):
    """The head's vocabulary columns split over devices (a pipeline's head on every stage): how the per-shard
    log-partition, label columns and gold logits combine into the whole vocabulary's."""

    def logz(self, logz: jax.Array) -> jax.Array: ...
    def columns(self, labels: jax.Array) -> jax.Array: ...  # local column of each label, -1 where not here
    def gold(self, gold: jax.Array) -> jax.Array: ...


def head_loss(opts: ModelOptions, x: jax.Array, final_norm: jax.Array, head: jax.Array, labels: jax.Array,
              split: VocabSplit | None = None) -> jax.Array:
    """Final norm + head + mean next-token cross-entropy; x (batch, seq, hidden), labels (batch, seq).
    With ``split``, ``head`` is this device's share of the vocabulary columns (in compute layout)."""
    z = logits(opts, x, final_norm, head, head_gathered=split is not None)  # (batch, seq, V or a share)
    logz = jax.nn.logsumexp(z, axis=-1)  # (batch, seq)
    cols = labels
    if split is not None:
        logz, cols = split.logz(logz), split.columns(labels)
    # cross_entropy picks the gold logit with take_along_axis; inside a pipeline's loop, with vocab over
    # `tensor` and batch over `data`, that gather aborts XLA's SPMD partitioner (jax 0.10.2, CPU). A
    # one-hot sum is the same number (one nonzero term) and partitions as a plain reduction.
    gold = jnp.sum(jnp.where(jax.nn.one_hot(cols, z.shape[-1], dtype=jnp.bool_), z, 0.0), axis=-1)
    if split is not None:
        gold = split.gold(gold)
    return jnp.mean(logz - gold)


def forward(model: ModelConfig | ModelOptions, params: dict, tokens: jax.Array, **options: Any) -> jax.Array:
    """tokens (batch, seq) int32 -> logits (batch, seq, padded_vocab) fp32.

    ``model``: the options (``ModelOptions``), or a ModelConfig and the options' fields as keywords.
    ``params`` may hold padded storage arrays (see ``jax_impl.sharding``); every weight is
    brought to its logical shape and compute layout by ``opts.gather`` where it is used,
    which inside the layer scan means one layer at a time (ZeRO-3's just-in-time all-gather).
    """
    opts = model if isinstance(model, ModelOptions) else ModelOptions(model, **options)
    x = embed(opts, params["embed"], tokens)
    x = layers(opts, params["layers"], x)
    return logits(opts, x, params["final_norm"], params["head"])  # (batch, seq, vocab) fp32


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over all positions; logits fp32 (batch, seq, vocab)."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    gold = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return jnp.mean(logz - gold)
