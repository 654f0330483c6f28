"""torch_ref.model vs jax_impl.model on the same weights (fp32, 1e-5 relative), and the converter."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from configs import ModelConfig, list_presets, load_config, rope
from jax_impl import devices

try:  # as tests/conftest.py may do; a no-op once JAX has started with enough devices
    devices.configure("cpu", 8)
except Exception:
    pass

import jax
import jax.numpy as jnp

from jax_impl import model as jm
from torch_ref import model as tm
from torch_ref.convert import jax_to_torch, torch_to_jax
from weightmap.npz import load_npz, save_npz

RTOL = 1e-5


def rel_err(got, want) -> float:
    got = got.detach().numpy() if torch.is_tensor(got) else got
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def small_cfg(n_kv_heads: int = 2, **kw) -> ModelConfig:
    base = dict(name="t", vocab_size=96, vocab_pad_to=64, hidden=64, n_layers=2, n_heads=8, n_kv_heads=n_kv_heads,
                ffn_hidden=96, embed_init_std=0.5, init_std=0.1)
    return ModelConfig(**{**base, **kw})


def jax_init_params(cfg: ModelConfig, seed: int) -> dict:
    """The JAX initial weights as numpy (what ``python -m jax_impl.init_weights`` writes)."""
    return jax.tree.map(np.asarray, jm.init_params(cfg, seed))


def layer_params(params: dict, i: int) -> dict:
    return {k: v[i] for k, v in params["layers"].items()}


@pytest.fixture(scope="module")
def tiny_pair():
    cfg = small_cfg()
    params = jax_init_params(cfg, seed=3)
    model = tm.Llama(cfg)
    model.load_state_dict(jax_to_torch(params))
    return cfg, params, model


PRESET_ROPE = sorted({(load_config(p, validate=False).model.dim_head, load_config(p, validate=False).model.rope_theta)
                      for p in list_presets()})


@pytest.mark.parametrize("seq", [4096, 8192])
@pytest.mark.parametrize("dim,theta", PRESET_ROPE)
def test_rope_tables_equal_in_both_models_and_within_one_ulp_of_torchs_own_arithmetic(seq, dim, theta):
    """Both models rotate by the same fp32 tables at every preset's head_dim and theta (one definition,
    configs.rope). torch's own fp32 pow/cos/sin (what Hugging Face's Llama computes) is within one ulp of them:
    inv_freq differs at theta 50000 only, by one ulp, and the tables by at most one ulp plus that angle."""
    j, t = jm.rope_tables(seq, dim, theta), tm.rope_tables(seq, dim, theta)
    for a, b in zip(j, t, strict=True):
        assert a.dtype == np.float32 and np.array_equal(a, b.numpy())
    native = (1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))).numpy()
    ours = rope.inv_freq(dim, theta)
    ulps = np.abs(native.view(np.int32) - ours.view(np.int32))
    assert ulps.max() <= 1
    if (dim, theta) == (128, 50000.0):  # llama2-70b: the two frequencies where torch's pow is off by one ulp
        assert np.flatnonzero(ulps).tolist() == [10, 47]
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), torch.from_numpy(native))
    emb = torch.cat([freqs, freqs], dim=-1)
    # one ulp of inv_freq at position seq-1 moves the angle by at most seq * ulp(inv_freq)
    bound = 2.0**-23 + (seq - 1) * float(np.max(np.spacing(native)[ulps > 0], initial=0.0))
    assert float(np.abs(emb.cos().numpy() - j[0]).max()) <= bound
    assert float(np.abs(emb.sin().numpy() - j[1]).max()) <= bound


def test_rms_norm_and_rope_match_jax():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 16, 64)).astype(np.float32) * 3
    w = rng.normal(size=(64,)).astype(np.float32)
    got = tm.rms_norm(torch.from_numpy(x), torch.from_numpy(w), 1e-5, torch.float32)
    assert rel_err(got, jm.rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-5, jnp.float32)) < RTOL
    cos_j, sin_j = jm.rope_tables(16, 8, 10000.0)
    cos_t, sin_t = tm.rope_tables(16, 8, 10000.0)
    assert rel_err(cos_t, cos_j) < RTOL and rel_err(sin_t, sin_j) < RTOL
    q = rng.normal(size=(2, 16, 4, 8)).astype(np.float32)
    got = tm.apply_rope(torch.from_numpy(q), cos_t, sin_t)
    assert rel_err(got, jm.apply_rope(jnp.asarray(q), cos_j, sin_j)) < RTOL


@pytest.mark.parametrize("n_kv", [1, 2, 4, 8])
def test_attention_gqa_matches_jax(n_kv):
    rng = np.random.default_rng(n_kv)
    q = rng.normal(size=(2, 24, 8, 16)).astype(np.float32)
    k = rng.normal(size=(2, 24, n_kv, 16)).astype(np.float32)
    v = rng.normal(size=(2, 24, n_kv, 16)).astype(np.float32)
    got = tm.attention(*(torch.from_numpy(a) for a in (q, k, v)))
    want = jm.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    assert got.shape == want.shape == (2, 24, 8 * 16)
    assert rel_err(got, want) < RTOL


def test_embedding_matches_jax(tiny_pair):
    cfg, params, model = tiny_pair
    tokens = np.random.default_rng(1).integers(0, cfg.padded_vocab, (3, 17))
    got = model.embed(torch.from_numpy(tokens))
    assert rel_err(got, jnp.take(jnp.asarray(params["embed"]), jnp.asarray(tokens), axis=0)) == 0.0


@pytest.mark.parametrize("n_kv", [1, 2, 4, 8])
def test_block_matches_jax(n_kv):
    cfg = small_cfg(n_kv)
    params = jax_init_params(cfg, seed=n_kv)
    model = tm.Llama(cfg)
    model.load_state_dict(jax_to_torch(params))
    x = np.random.default_rng(2).normal(size=(2, 20, cfg.hidden)).astype(np.float32)
    cos, sin = jm.rope_tables(20, cfg.dim_head, cfg.rope_theta)
    for i in range(cfg.n_layers):
        want = jm.block(jm.ModelOptions(cfg), cos, sin, jnp.asarray(x), layer_params(params, i))
        got = model.layers[i](torch.from_numpy(x))
        assert rel_err(got.detach(), want) < RTOL, f"layer {i}, n_kv_heads={n_kv}"


def test_mlp_matches_jax(tiny_pair):
    """The SwiGLU half alone: with wo = 0 the attention adds nothing, so block(x) = x + mlp(norm(x))."""
    cfg, params, _ = tiny_pair
    p = {k: np.array(v) for k, v in layer_params(params, 0).items()}
    p["wo"][:] = 0.0
    block = tm.Block(cfg)
    block.load_state_dict({f"{k}.weight": torch.from_numpy(np.ascontiguousarray(v.T if v.ndim == 2 else v))
                           for k, v in p.items()})
    x = np.random.default_rng(4).normal(size=(2, 12, cfg.hidden)).astype(np.float32)
    cos, sin = jm.rope_tables(12, cfg.dim_head, cfg.rope_theta)
    want = np.asarray(jm.block(jm.ModelOptions(cfg), cos, sin, jnp.asarray(x), p)) - x
    got = block(torch.from_numpy(x)).detach().numpy() - x
    assert np.abs(want).max() > 1e-3  # the MLP really contributes
    assert rel_err(got, want) < RTOL


def test_full_logits_match_jax(tiny_pair):
    cfg, params, model = tiny_pair
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 32)).astype(np.int32)
    want = jm.forward(cfg, params, jnp.asarray(tokens))
    got = model(torch.from_numpy(tokens).long())
    assert got.dtype == torch.float32 and got.shape == (2, 32, cfg.padded_vocab)
    assert rel_err(got.detach(), want) < RTOL
    labels = np.roll(tokens, -1, axis=1)
    loss_t = tm.cross_entropy(got, torch.from_numpy(labels))
    loss_j = jm.cross_entropy(want, jnp.asarray(labels))
    assert abs(loss_t.item() - float(loss_j)) / float(loss_j) < RTOL


def test_converter_round_trip_is_bitwise(tiny_pair, tmp_path):
    cfg, params, _ = tiny_pair
    sd = jax_to_torch(params)
    assert set(sd) == set(tm.Llama(cfg).state_dict())
    assert sd["head.weight"].shape == (cfg.padded_vocab, cfg.hidden)
    assert sd["layers.1.wq.weight"].shape == (cfg.n_heads * cfg.dim_head, cfg.hidden)
    np.testing.assert_array_equal(sd["layers.1.wq.weight"].numpy(), np.asarray(params["layers"]["wq"][1]).T)
    back = torch_to_jax(sd)
    for key in ("embed", "head", "final_norm"):
        assert back[key].dtype == np.float32 and np.array_equal(back[key], np.asarray(params[key]))
    for key, v in params["layers"].items():
        assert np.array_equal(back["layers"][key], np.asarray(v)), key
    # torch -> jax -> torch, from a torch-initialised model, through the launcher's .npz hand-off
    model = tm.init_torch(tm.Llama(cfg), seed=7)
    path = save_npz(tmp_path / "w.npz", torch_to_jax(model.state_dict()))
    again = jax_to_torch(load_npz(path))
    for k, v in model.state_dict().items():
        assert torch.equal(again[k], v), k


def test_same_seed_gives_the_jax_initial_weights():
    cfg = load_config("tiny").model
    want = jm.init_params(cfg, 0)
    got = jax_to_torch(jax_init_params(cfg, 0))
    np.testing.assert_array_equal(got["layers.0.w_down.weight"].numpy(), np.asarray(want["layers"]["w_down"][0]).T)
    np.testing.assert_array_equal(got["embed.weight"].numpy(), np.asarray(want["embed"]))
    other = jax_to_torch(jax_init_params(cfg, 1))
    assert not torch.equal(other["embed.weight"], got["embed.weight"])


def test_torch_init_uses_the_jax_stds():
    cfg = dataclasses.replace(small_cfg(), hidden=256, ffn_hidden=512, n_layers=4, vocab_size=512, init_std=0.0)
    sd = tm.init_torch(tm.Llama(cfg), seed=0).state_dict()
    assert abs(sd["layers.0.wq.weight"].std().item() - cfg.std) / cfg.std < 0.05
    assert abs(sd["layers.0.w_down.weight"].std().item() - cfg.out_std) / cfg.out_std < 0.05
    assert abs(sd["embed.weight"].std().item() - cfg.embed_init_std) / cfg.embed_init_std < 0.05
    assert torch.equal(sd["layers.3.mlp_norm.weight"], torch.ones(cfg.hidden))
