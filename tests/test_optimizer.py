"""The optimizer chain: clipping with a norm the step already computed is optax's clipping, bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import load_config
from jax_impl import trainer


@pytest.mark.parametrize("scale", [0.01, 10.0])  # under and over the clip threshold (1.0)
def test_clip_with_given_norm_equals_optax_clip(scale):
    r = np.random.default_rng(0)
    g = {"a": jnp.asarray(r.standard_normal((64, 32)) * scale, jnp.float32),
         "b": {"c": jnp.asarray(r.standard_normal((7,)) * scale, jnp.float32)}}
    ref, _ = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
    ours = trainer.clip_by_global_norm(1.0)
    state = ours.init(g)
    assert state == optax.clip_by_global_norm(1.0).init(g)  # same (empty) state: checkpoints unchanged
    given, _ = ours.update(g, state, grad_norm=optax.tree.norm(g))
    computed, _ = ours.update(g, state)
    for out in (given, computed):
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
            np.testing.assert_array_equal(a, b)
    assert (scale > 1) == (float(optax.tree.norm(given)) < float(optax.tree.norm(g)))


def test_full_chain_update_equals_the_chain_with_optax_clipping(monkeypatch):
    cfg = load_config("tiny")
    params = {"w": jnp.ones((8, 4)), "attn_norm": jnp.ones((4,))}
    names = {"w": None, "attn_norm": None}
    grads = jax.tree.map(lambda p: p * 3.0, params)  # norm > clip: the clipped branch
    tx = trainer.make_optimizer(cfg, names)
    st = tx.init(params)
    ours = tx.update(grads, st, params, grad_norm=optax.tree.norm(grads))
    monkeypatch.setattr(trainer, "clip_by_global_norm", optax.clip_by_global_norm)  # the reference chain
    ref_tx = trainer.make_optimizer(cfg, names)
    ref = ref_tx.update(grads, ref_tx.init(params), params)
    assert jax.tree.structure(ours) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(a, b)


def test_global_norm_equals_optax_tree_norm():
    """trainer.global_norm (one full-contraction dot per leaf) is optax.tree.norm up to summation order."""
    r = np.random.default_rng(3)
    tree = {"w": jnp.asarray(r.standard_normal((4, 64, 96), np.float32)),
            "b": jnp.asarray(r.standard_normal(7, np.float32)), "s": jnp.asarray(np.float32(-2.5))}
    got, want = float(trainer.global_norm(tree)), float(optax.tree.norm(tree))
    assert got == pytest.approx(want, rel=1e-6)
    assert float(trainer.global_norm({"z": jnp.zeros((3, 3))})) == 0.0
