"""The optimizer chain: clipping with the norm the step already computed is optax's clipping (to the last bits),
and the step's gradient norm and clipping add no gradient-sized buffer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import load_config
from jax_impl import trainer


@pytest.mark.parametrize("scale", [0.01, 10.0])  # under and over the clip threshold
def test_clip_with_given_norm_is_optax_clip_to_the_last_bits(scale):
    """Over the threshold each gradient is scaled by max_norm / norm (one scalar, as torch's clip_grad_norm_
    does), where optax divides by the norm and multiplies: the two differ in the last bits.
    Under it the gradients pass through bit for bit."""
    r = np.random.default_rng(0)
    g = {"a": jnp.asarray(r.standard_normal((64, 32)) * scale, jnp.float32),
         "b": {"c": jnp.asarray(r.standard_normal((7,)) * scale, jnp.float32)}}
    max_norm = 0.7
    ref, _ = optax.clip_by_global_norm(max_norm).update(g, optax.EmptyState())
    ours = trainer.clip_by_global_norm(max_norm)
    state = ours.init(g)
    assert state == optax.clip_by_global_norm(max_norm).init(g)  # same (empty) state: checkpoints unchanged
    norm = optax.tree.norm(g)
    given, _ = ours.update(g, state, grad_norm=norm)
    computed, _ = ours.update(g, state)
    for out in (given, computed):
        for a, b, x in zip(jax.tree.leaves(out), jax.tree.leaves(ref), jax.tree.leaves(g), strict=True):
            if scale < 1:
                np.testing.assert_array_equal(a, x)
            else:
                np.testing.assert_array_equal(a, x * (max_norm / norm))
                np.testing.assert_allclose(a, b, rtol=2 ** -22, atol=0)  # two roundings apart
    assert (scale > 1) == (float(optax.tree.norm(given)) < float(norm))


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
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)


def test_global_norm_equals_optax_tree_norm():
    """trainer.global_norm (one full-contraction dot per leaf) is optax.tree.norm up to summation order."""
    r = np.random.default_rng(3)
    tree = {"w": jnp.asarray(r.standard_normal((4, 64, 96), np.float32)),
            "b": jnp.asarray(r.standard_normal(7, np.float32)), "s": jnp.asarray(np.float32(-2.5))}
    got, want = float(trainer.global_norm(tree)), float(optax.tree.norm(tree))
    assert got == pytest.approx(want, rel=1e-6)
    assert float(trainer.global_norm({"z": jnp.zeros((3, 3))})) == 0.0


def test_global_norm_layer_by_layer_equals_whole_leaves():
    r = np.random.default_rng(4)
    tree = {"w": jnp.asarray(r.standard_normal((5, 32, 48), np.float32)),
            "b": jnp.asarray(r.standard_normal(9, np.float32))}
    whole = float(trainer.global_norm(tree))
    assert float(trainer.global_norm(tree, {"w": True, "b": False})) == pytest.approx(whole, rel=1e-6)
    assert float(trainer.global_norm(tree, {"w": True, "b": True})) == pytest.approx(whole, rel=1e-6)


BIG = {"model.n_layers": 4, "model.hidden": 2048, "model.ffn_hidden": 8192, "model.n_heads": 16,
       "model.n_kv_heads": 16, "model.vocab_size": 256, "data.seq_len": 16, "parallel.mbs": 1}  # 1.07 GB of fp32 grads


def _trainer(mesh: str, **over) -> "trainer.Trainer":
    from jax_impl.sharding import make_mesh

    cfg = load_config("tiny", {**over, "parallel.mesh": mesh})
    return trainer.Trainer.build(cfg, make_mesh(cfg.mesh_shape()))  # abstract: allocates nothing


def test_norm_goes_layer_by_layer_for_large_gradients_and_an_unsharded_layer_axis():
    f = _trainer("data=2", **BIG, **{"parallel.zero": 1}).norm_per_layer()  # 537 MB of gradients per device
    assert f["layers"]["wq"] and f["layers"]["w_down"]
    assert not f["layers"]["attn_norm"] and not f["embed"] and not f["head"] and not f["final_norm"]
    # the pipeline shards the layer axis
    assert _trainer("pipeline=2", **BIG, **{"parallel.zero": 1}).norm_per_layer() is None
    assert _trainer("data=1").norm_per_layer() is None  # small gradients: whole leaves


def test_step_holds_one_gradient_sized_buffer():
    """The step's temporaries are the fp32 gradients (here almost all of them: large weights, 16 tokens) and
    little more. XLA:CPU turns a whole-leaf gradient norm into a product buffer per leaf, all live at once,
    and a divide in the clipping into a clipped copy of the gradients that the Adam update reads: either
    was a second gradient-sized buffer (+19 GiB on a 7B model on one device)."""
    tr = _trainer("data=1", **BIG, **{"jax.scan_unroll": 1})  # the layer scan, as the large presets run
    grad_bytes = 4 * tr.cfg.model.n_params()
    for guard in (False, True):
        temp = tr.compile_step(guard=guard).memory_analysis().temp_size_in_bytes
        assert temp < 1.5 * grad_bytes, (guard, temp / grad_bytes)  # 1.27 here; either buffer back: 2.0
