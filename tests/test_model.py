"""The Flax Llama: exact shapes, attention math against a plain reference, remat, bf16 dots."""

import ast
import dataclasses
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import assert_tree_close

from configs import MESH_AXES, load_config
from jax_impl import model as M


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("preset,count", [("llama2-70b", 68_976_648_192), ("auroragpt-42b-tp6", 41_404_500_960)])
def test_exact_counts_from_abstract_shapes(preset, count):
    cfg = load_config(preset)
    abstract = jax.eval_shape(lambda: M.init_params(cfg.model, 0))  # allocates nothing
    assert _count(abstract) == count == cfg.model.n_params()
    assert abstract["layers"]["wk"].shape == (cfg.model.n_layers, cfg.model.hidden, cfg.model.n_kv_heads * 128 if
                                               preset == "llama2-70b" else 6 * 170)


def test_model_names_no_mesh_axis():
    src = Path(M.__file__).read_text()
    strings = {n.value for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not strings & set(MESH_AXES), "the model must use logical axis names only"


def _reference_attention(q, k, v):
    """Plain numpy GQA: repeat each KV head over its query group, causal softmax."""
    b, s, nh, hd = q.shape
    k = np.repeat(k, nh // k.shape[2], axis=2)
    v = np.repeat(v, nh // v.shape[2], axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
    scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, s, nh * hd)


@pytest.mark.parametrize("n_kv", [1, 2, 4, 8])
def test_gqa_attention_matches_reference(n_kv):
    r = np.random.default_rng(n_kv)
    q = r.standard_normal((2, 16, 8, 8), np.float32)
    k, v = (r.standard_normal((2, 16, n_kv, 8), np.float32) for _ in range(2))
    out = M.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    np.testing.assert_allclose(out, _reference_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_chunked_attention_equals_full_values_and_grads():
    r = np.random.default_rng(0)
    q = jnp.asarray(r.standard_normal((1, 64, 4, 8), np.float32))
    k, v = (jnp.asarray(r.standard_normal((1, 64, 2, 8), np.float32)) for _ in range(2))

    def f(chunk):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(M.attention(q, k, v, chunk))), (0, 1, 2))(q, k, v)

    (l0, g0), (l1, g1) = f(0), f(16)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(g1, g0, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_attention_vjp_equals_autodiff_of_the_math():
    """model._attend's written-out backward (head-major einsums) against JAX's gradient of plain attention."""
    r = np.random.default_rng(1)
    q = jnp.asarray(r.standard_normal((2, 16, 8, 8), np.float32))
    k, v = (jnp.asarray(r.standard_normal((2, 16, 2, 8), np.float32)) for _ in range(2))

    def plain(q, k, v):
        s, nh = q.shape[1], q.shape[2]
        kk, vv = (jnp.repeat(t, nh // t.shape[2], axis=2) for t in (k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, kk) / jnp.sqrt(q.shape[-1])
        p = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, -jnp.inf), axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", p, vv).reshape(q.shape[0], s, -1)

    w = jnp.asarray(r.standard_normal((2, 16, 64), np.float32))
    got = jax.grad(lambda *a: jnp.sum(w * M.attention(*a)), (0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: jnp.sum(w * plain(*a)), (0, 1, 2))(q, k, v)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_attention_skips_the_blocks_above_the_diagonal():
    q = jnp.ones((1, 64, 4, 8), jnp.float32)
    k = jnp.ones((1, 64, 2, 8), jnp.float32)

    def flops(chunk):
        return jax.jit(lambda q, k, v: M.attention(q, k, v, chunk)).lower(q, k, k).compile().cost_analysis()["flops"]

    # 4 query blocks see 1, 2, 3, 4 key blocks: 10/16 of the score and probability-times-value work
    assert flops(16) < 0.7 * flops(0)


def test_rope_rotates_pairs_half_apart():
    cos, sin = M.rope_tables(4, 8, 10000.0)
    x = jnp.arange(2 * 4 * 1 * 8, dtype=jnp.float32).reshape(2, 4, 1, 8)
    y = M.apply_rope(x, cos, sin)
    np.testing.assert_allclose(y[:, 0], x[:, 0])  # position 0: identity
    # rotation preserves the norm of each (i, i + D/2) pair
    pair = lambda t: t[..., :4] ** 2 + t[..., 4:] ** 2  # noqa: E731
    np.testing.assert_allclose(pair(y), pair(x), rtol=1e-5)
    # the first pair at position 1 rotates by angle 1 rad (inv_freq[0] = 1)
    a, b = x[0, 1, 0, 0], x[0, 1, 0, 4]
    np.testing.assert_allclose(y[0, 1, 0, 0], a * np.cos(1) - b * np.sin(1), rtol=1e-5)


def test_rope_tables_are_constants_of_the_step(tiny):
    """sin/cos are evaluated once, when the step is traced: inside it XLA fused them into every consumer
    and evaluated them per element of q and k, in every layer, forward and backward (4.5 % of CPU time)."""
    cfg, params, tokens = tiny

    def loss(p):
        return M.cross_entropy(M.forward(cfg.model, p, tokens[:, :-1]), tokens[:, 1:])

    hlo = jax.jit(jax.value_and_grad(loss)).lower(params).compile().as_text()
    assert not re.search(r"\b(sine|cosine)\(", hlo)
    cos, sin = M.rope_tables(4, 8, 10000.0)
    assert isinstance(cos, np.ndarray) and cos.dtype == sin.dtype == np.float32


def _loss_and_grads(cfg, params, tokens, **kw):
    def loss(p):
        return M.cross_entropy(M.forward(cfg.model, p, tokens[:, :-1], **kw), tokens[:, 1:])
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny")
    params = M.init_params(cfg.model, 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 33)), jnp.int32)
    return cfg, params, tokens


def test_initial_loss_is_near_log_vocab(tiny):
    cfg, params, tokens = tiny
    loss, _ = _loss_and_grads(cfg, params, tokens)
    assert abs(float(loss) - math.log(cfg.model.vocab_size)) < 0.5


@pytest.mark.parametrize("policy", ["full", "save_dots", "save_attn_out", "save_matmuls", "save_mlp"])
def test_remat_gives_identical_loss_and_grads(tiny, policy):
    cfg, params, tokens = tiny
    l0, g0 = _loss_and_grads(cfg, params, tokens)
    l1, g1 = _loss_and_grads(cfg, params, tokens, remat=True, remat_policy=policy)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    assert_tree_close(g1, g0, rtol=1e-5)


def _dots_in_grad(model_cfg, params, tokens, dtype, **kw) -> int:
    """dot_general equations in the jaxpr of the loss gradient, nested jaxprs included."""
    def loss(p):
        return M.cross_entropy(M.forward(model_cfg, p, tokens[:, :-1], dtype=dtype, **kw), tokens[:, 1:])

    return len(re.findall(r"\bdot_general\[", str(jax.make_jaxpr(jax.grad(loss))(params))))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_save_matmuls_recomputes_no_matmul_save_mlp_the_attention_block(tiny, dtype):
    """save_matmuls traces one dot more than no remat at all -- the attention scores, whose probabilities it
    recomputes rather than keeps (chunked attention recomputes them in any case); full remat traces every
    forward dot again."""
    cfg, params, tokens = tiny
    scanned = dataclasses.replace(cfg.model, n_layers=10)  # > 8 layers: a lax.scan
    params = M.init_params(scanned, 0)
    plain = _dots_in_grad(scanned, params, tokens, dtype)
    saved = _dots_in_grad(scanned, params, tokens, dtype, remat=True, remat_policy="save_matmuls")
    mlp = _dots_in_grad(scanned, params, tokens, dtype, remat=True, remat_policy="save_mlp")
    full = _dots_in_grad(scanned, params, tokens, dtype, remat=True, remat_policy="full")
    # save_mlp recomputes the attention block's inputs only: q, k, v and the attention's two dots
    assert saved == plain + 1 < mlp == plain + 5 < full


def test_no_remat_saves_no_copy_of_the_layer_weights(tiny, capsys):
    """Without remat the layer scan keeps activations only: its weights reach the backward as the stacked
    parameters themselves, never as a saved stacked copy (a weight-sized residual)."""
    cfg, params, tokens = tiny
    scanned = dataclasses.replace(cfg.model, n_layers=10)
    params = M.init_params(scanned, 0)
    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(
        lambda p: M.cross_entropy(M.forward(scanned, p, tokens[:, :-1]), tokens[:, 1:]), params)
    saved = capsys.readouterr().out.splitlines()
    weight_shapes = {f"f32[{','.join(map(str, w.shape))}]" for w in jax.tree.leaves(params["layers"])}
    copies = [s for s in saved if s.split()[0] in weight_shapes and "from the argument" not in s]
    assert len(saved) > 20 and not copies, copies


def test_matmul_vjp_equals_autodiff_in_fp32():
    r = np.random.default_rng(1)
    x, w = jnp.asarray(r.standard_normal((3, 5, 7), np.float32)), jnp.asarray(r.standard_normal((7, 4), np.float32))
    g_custom = jax.grad(lambda x, w: jnp.sum(jnp.tanh(M.matmul(x, w))), (0, 1))(x, w)
    g_plain = jax.grad(lambda x, w: jnp.sum(jnp.tanh(x @ w)), (0, 1))(x, w)
    for a, b in zip(g_custom, g_plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_tracks_fp32_and_every_dot_accumulates_in_fp32(tiny):
    cfg, params, tokens = tiny
    l32, _ = _loss_and_grads(cfg, params, tokens)
    l16, g16 = _loss_and_grads(cfg, params, tokens, dtype=jnp.bfloat16)
    assert abs(float(l16) - float(l32)) / float(l32) < 1e-2
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))  # fp32 master gradients

    def loss(p):
        return M.cross_entropy(M.forward(cfg.model, p, tokens[:, :-1], dtype=jnp.bfloat16), tokens[:, 1:])
    hlo = jax.jit(jax.value_and_grad(loss)).lower(params).as_text()
    dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]
    assert len(dots) >= 20  # forward and backward dots of 2 layers + head
    bf16_out = [d for d in dots if d.rstrip().endswith("bf16>")]
    assert not bf16_out, f"bf16->bf16 dots (slow on XLA:CPU): {bf16_out[:2]}"


def test_matmul_out_compute_is_fp32_accumulated_bf16_and_exact_in_fp32(tiny):
    """jax.matmul_out=compute: projections write the compute dtype (half the bytes on a GPU). In fp32 it
    is the same program's numbers; in bf16 its dots are bf16-out, the weight gradients and loss stay fp32."""
    cfg, params, tokens = tiny
    l0, g0 = _loss_and_grads(cfg, params, tokens)
    l1, g1 = _loss_and_grads(cfg, params, tokens, matmul_out="compute")
    assert float(l1) == float(l0)
    assert_tree_close(g1, g0, rtol=0)

    l32, g32 = _loss_and_grads(cfg, params, tokens, dtype=jnp.bfloat16)
    l16, g16 = _loss_and_grads(cfg, params, tokens, dtype=jnp.bfloat16, matmul_out="compute")
    assert float(l16) != float(l32)  # the FFN's gate/up outputs are rounded to bf16 now
    assert abs(float(l16) - float(l32)) / float(l32) < 1e-3
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))
    assert_tree_close(g16, g32, rtol=2e-2)

    def loss(p):
        return M.cross_entropy(M.forward(cfg.model, p, tokens[:, :-1], dtype=jnp.bfloat16, matmul_out="compute"),
                               tokens[:, 1:])
    dots = [ln for ln in jax.jit(jax.value_and_grad(loss)).lower(params).as_text().splitlines()
            if "stablehlo.dot_general" in ln]
    bf16_out = [d for d in dots if d.rstrip().endswith("bf16>")]
    # 7 projections x (forward + input gradient) per layer, in the scan's one body; weight-gradient and
    # head dots stay fp32-out
    assert len(bf16_out) == 14, len(bf16_out)


def test_matmul_out_dtype_and_vjp():
    r = np.random.default_rng(2)
    x = jnp.asarray(r.standard_normal((3, 5, 16)), jnp.bfloat16)
    w = jnp.asarray(r.standard_normal((16, 8)), jnp.float32)
    y, vjp = jax.vjp(lambda x, w: M.matmul(x, w, out_dtype=jnp.bfloat16), x, w)
    assert y.dtype == jnp.bfloat16
    dx, dw = vjp(jnp.ones_like(y))
    assert (dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.float32)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(M.matmul(x, w), np.float32), rtol=1e-2,
                               atol=1e-2)
    ref = np.einsum("bsk,bsn->kn", np.asarray(x, np.float32), np.ones((3, 5, 8), np.float32))
    np.testing.assert_allclose(np.asarray(dw), ref, rtol=1e-6)


def test_full_remat_keeps_bf16_layer_inputs_as_bits_same_numbers(tiny, monkeypatch):
    """Full remat in bf16 keeps each layer's input for the backward as its uint16 bits (M.CARRY_BITS): the same
    loss and gradients bit for bit, and less temp memory than the bf16 stack's size (XLA:CPU's bf16 normalization
    made an fp32 copy of the whole stack)."""
    cfg, _, tokens = tiny
    scanned = dataclasses.replace(cfg.model, n_layers=10, hidden=128, ffn_hidden=256)  # > 8 layers: a lax.scan
    params = M.init_params(scanned, 0)
    tokens = jnp.tile(tokens, (4, 1))

    def run(bits: bool):
        monkeypatch.setattr(M, "CARRY_BITS", bits)

        def loss(p):
            return M.cross_entropy(M.forward(scanned, p, tokens[:, :-1], dtype=jnp.bfloat16, remat=True),
                                   tokens[:, 1:])

        f = jax.jit(jax.value_and_grad(loss))
        return f(params), f.lower(params).compile().memory_analysis().temp_size_in_bytes

    (l0, g0), temp0 = run(False)
    (l1, g1), temp1 = run(True)
    assert float(l1) == float(l0)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True))
    stack = 10 * 8 * 32 * 128  # the saved layer inputs: (layers, batch, seq, hidden)
    assert temp0 - temp1 >= 2 * stack  # the fp32 copy's peak share: more than the bf16 stack's bytes (70B: 10 GiB)
