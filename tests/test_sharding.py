"""Sharded training equals single-device training; ZeRO stages shard what they claim; 70B plans."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import assert_tree_close
from jax.sharding import PartitionSpec as P

from aurora_data import SyntheticSource, global_batch
from configs import load_config
from jax_impl.sharding import ZeroPlan, activate, batch_sharding, make_abstract_mesh, make_mesh
from jax_impl.trainer import Trainer

GBS = 24  # divides by every data-parallel size below (1, 2, 4, 6, 8)
BASE = {"model.n_heads": 8, "model.n_kv_heads": 4, "data.seq_len": 16, "train.steps": 3, "optim.lr": 1e-2,
        "optim.warmup_frac": 0.0}


@functools.cache  # the padding test reuses the fsdp=6 parity run
def run(mesh_spec: str, zero: int = 3, gas: int = 1, **extra):
    """Initial loss + grads (logical shapes) and the per-step losses/final params of 3 steps."""
    probe = load_config("tiny", {**BASE, "parallel.mesh": mesh_spec})
    dp = probe.dp_size()
    cfg = load_config("tiny", {**BASE, "parallel.mesh": mesh_spec, "parallel.zero": zero, "parallel.gas": gas,
                               "parallel.mbs": GBS // (dp * gas), **extra})
    mesh = make_mesh(cfg.mesh_shape())
    tr = Trainer.build(cfg, mesh)
    params, opt = tr.init_state()
    src = SyntheticSource(cfg.model.vocab_size, cfg.data.seq_len)
    with activate(mesh):
        step, losses, grads = tr.jitted_step(with_grads=True), [], None
        for i in range(3):
            b = jax.device_put(global_batch(src, i * GBS, cfg.parallel.mbs, gas, dp), batch_sharding(mesh))
            params, opt, m = step(params, opt, b)
            losses.append(float(m["loss"]))
            if i == 0:  # gradients at the initial weights, averaged over the global batch
                loss, grads = m["loss"], tr.logical_params(m["grads"])
    return {"loss": float(loss), "grads": grads, "losses": losses, "params": tr.logical_params(params),
            "storage": params, "trainer": tr}


@pytest.fixture(scope="module")
def single():
    return run("data=1")


CASES = [
    ("fsdp=8", 3, {}),
    ("data=2,fsdp=2,tensor=2", 3, {}),
    ("data=2,fsdp=2,tensor=2", 1, {}),
    ("data=2,fsdp=2,tensor=2", 3, {"jax.sequence_parallel": True}),
    ("tensor=4", 0, {}),
    ("data=8", 0, {}),
    ("data=8", 1, {}),
    ("data=8", 2, {}),
    ("data=2,fsdp=4", 2, {}),  # weight gradients reduce-scattered over two axes at once (weight_grad_fn)
    ("data=2,fsdp=4", 3, {"parallel.hpz": True}),
    ("data=2,fsdp=4", 3, {"parallel.mics": True}),
    ("fsdp=6", 3, {}),  # 64 does not divide by 6: padded storage
]


@pytest.mark.parametrize("mesh_spec,zero,extra", CASES, ids=[f"{m}-zero{z}{'-' + ','.join(e) if e else ''}"
                                                             for m, z, e in CASES])
def test_sharded_equals_single_device(single, mesh_spec, zero, extra):
    out = run(mesh_spec, zero, **dict(extra))
    assert out["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert_tree_close(out["grads"], single["grads"], rtol=1e-5)
    np.testing.assert_allclose(out["losses"], single["losses"], rtol=1e-5)
    # AdamW divides each gradient entry by its own RMS, so entries near zero -- whose last bits
    # depend on the summation order of the sharded reduction -- still move by up to lr: parameters
    # after 3 steps agree to ~6e-5 of their scale, not 1e-5.
    assert_tree_close(out["params"], single["params"], rtol=2e-4)


# ZeRO-1: each microbatch's weight gradients reduce-scattered, then summed; on data=2 by layer (whole stacks)
@pytest.mark.parametrize("mesh_spec,zero", [("data=2,fsdp=2", 3), ("data=2,fsdp=2", 1), ("data=2", 1)])
def test_gradient_accumulation_equals_one_big_batch(single, mesh_spec, zero):
    out = run(mesh_spec, zero, gas=3)
    np.testing.assert_allclose(out["losses"], single["losses"], rtol=1e-5)
    assert_tree_close(out["params"], single["params"], rtol=2e-4)


def test_padding_is_stored_zero_and_stays_zero():
    out = run("fsdp=6", 3)  # the same call as the fsdp=6 parity case: served from run's cache
    tr = out["trainer"]
    assert tr.plan.pad_multiple() == 6
    wq = out["storage"]["layers"]["wq"]
    assert wq.shape == (2, 66, 64)  # hidden 64 padded to 66 = 11 x 6
    assert wq.sharding.spec[1] == "fsdp"
    assert float(np.abs(np.asarray(wq)[:, 64:]).max()) == 0.0  # after 3 AdamW steps with weight decay


def test_zero_stages_shard_what_they_claim():
    cfg = load_config("tiny", {"parallel.mesh": "data=2,fsdp=4"})
    mesh = make_abstract_mesh(cfg.mesh_shape())
    names = ("layers", "embed", "mlp")
    specs = {}
    for zero, extra in ((0, {}), (1, {}), (2, {}), (3, {}), (3, {"hpz": True}), (3, {"mics": True})):
        c = load_config("tiny", {"parallel.mesh": "data=2,fsdp=4", "parallel.zero": zero,
                                 **{f"parallel.{k}": v for k, v in extra.items()}})
        plan = ZeroPlan.from_config(c, mesh)
        specs[(zero, *extra)] = tuple(plan.spec(names, t, (2, 64, 176))[1] for t in ("params", "grads", "opt"))
    both = ("data", "fsdp")
    assert specs[(0,)] == (None, None, None)
    assert specs[(1,)] == (None, None, both)
    assert specs[(2,)] == (None, both, both)
    assert specs[(3,)] == (both, both, both)
    assert specs[(3, "hpz")] == ("fsdp", both, both)  # params inside the node, states everywhere
    assert specs[(3, "mics")] == ("fsdp", "fsdp", "fsdp")  # all states inside the group, replicated across


def test_zero_shards_the_most_major_dimension_after_layers():
    """w_down (L, F, h) and embed (V, h) are ZeRO-sharded on F and V, not on their minor h: a minor
    sharded dimension made XLA:CPU run AdamW through a transposed layout. With tensor parallelism a
    dimension that would need padding falls back to embed, so tensor blocks stay aligned."""
    cfg = load_config("tiny", {"parallel.mesh": "fsdp=4", "parallel.zero": 3})
    plan = ZeroPlan.from_config(cfg, make_abstract_mesh(cfg.mesh_shape()))
    assert plan.spec(("layers", "mlp", "embed"), "params", (2, 176, 64)) == P(None, "fsdp", None)
    assert plan.spec(("vocab", "embed"), "params", (512, 64)) == P("fsdp", None)
    assert plan.spec(("embed", "vocab"), "params", (64, 512)) == P("fsdp", None)
    assert plan.storage_shape(("layers", "mlp", "embed"), (2, 174, 64)) == (2, 176, 64)  # padded on F

    cfg = load_config("tiny", {"parallel.mesh": "fsdp=3,tensor=2", "parallel.zero": 3})
    plan = ZeroPlan.from_config(cfg, make_abstract_mesh(cfg.mesh_shape()))
    assert plan.spec(("layers", "mlp", "embed"), "params", (2, 180, 64)) == P(None, ("tensor", "fsdp"), None)
    # 176 % (2 x 3) != 0: padding F would misalign the tensor halves -> shard (and pad) embed instead
    assert plan.spec(("layers", "mlp", "embed"), "params", (2, 176, 64)) == P(None, "tensor", "fsdp")
    assert plan.storage_shape(("layers", "mlp", "embed"), (2, 176, 64)) == (2, 176, 66)


@pytest.mark.parametrize("mesh_spec", ["fsdp=4", "data=2,fsdp=2,tensor=2"])
def test_zero3_gathers_each_layer_weight_as_a_row_major_matrix(mesh_spec):
    """The step's all-gathers produce 1-D/2-D weights in the row-major layout the dots read. Without the
    pin to the stored sharding (sharding.gather_weight) XLA gathered layer slices in a layout with the
    gathered axis major ((1, rows, cols) on the bench preset, column-major here), then copied each one into
    row-major (docs/performance.md, "Levers")."""
    cfg = load_config("tiny", {"parallel.mesh": mesh_spec, "parallel.zero": 3})
    text = Trainer.build(cfg, make_mesh(cfg.mesh_shape())).compile_step().as_text()
    gathers = re.findall(r"= (\w+)\[([\d,]*)\]\{([\d,]*)\}[^=]* all-gather\(", text)
    n_layers, per_layer = cfg.model.n_layers, 9  # 2 norms, wq wk wv wo, gate up down
    assert len(gathers) >= n_layers * per_layer
    for dtype, dims, layout in gathers:
        rank = len(dims.split(","))
        assert rank <= 2, f"all-gather of a rank-{rank} {dtype}[{dims}]"
        assert layout == ",".join(str(i) for i in reversed(range(rank))), f"{dtype}[{dims}]{{{layout}}}"


@pytest.mark.parametrize("mesh_spec,extra", [("fsdp=96", {}), ("data=8,fsdp=12", {"parallel.hpz": True}),
                                             ("fsdp=192", {})])
def test_70b_every_large_leaf_sharded_and_bytes_per_device(mesh_spec, extra):
    cfg = load_config("llama2-70b", {"parallel.mesh": mesh_spec, **extra})
    mesh = make_abstract_mesh(cfg.mesh_shape())
    n = mesh.size
    tr = Trainer.build(cfg, mesh)
    # hpZ in bf16 keeps the fp32 master over all tiles (its bf16 compute copy over the 12 of a node); ZeRO-3 too.
    # Padding costs < 1.6 %.
    param_shards = n
    if cfg.parallel.hpz:
        assert cfg.train.dtype == "bf16"
        for leaf in jax.tree.leaves(tr.copy_abstract):
            if math.prod(leaf.shape) >= 1 << 20:
                shard = leaf.sharding.shard_shape(leaf.shape)
                assert math.prod(shard) * 12 == math.prod(leaf.shape), (leaf.shape, leaf.sharding.spec)
    for tree, shards in ((tr.storage, param_shards), (tr.opt_abstract, n)):
        for leaf in jax.tree.leaves(tree):
            if math.prod(leaf.shape) >= 1 << 20:
                shard = leaf.sharding.shard_shape(leaf.shape)
                assert math.prod(shard) * shards == math.prod(leaf.shape), (leaf.shape, leaf.sharding.spec)
    total = cfg.model.n_params() * 4
    per_dev = tr.state_bytes_per_device()
    assert total / param_shards <= per_dev["params"] <= 1.016 * total / param_shards
    assert total / n <= per_dev["grads"] <= 1.016 * total / n
    assert 2 * total / n <= per_dev["opt_state"] <= 1.016 * 2 * total / n
    if cfg.parallel.hpz:  # bf16, over a node's 12 tiles
        assert total / 2 / 12 <= per_dev["compute_copy"] <= 1.016 * total / 2 / 12


def test_hpz_layer_gradients_are_reduce_scattered_inside_the_backward(monkeypatch):
    """Under hpZ each layer's weight gradient reaches the layer scan's stacked gradients already in the step's
    gradient sharding (data x fsdp), not in the weight's stored one (fsdp only): less temp memory by the
    difference. (Numerics: the hpZ parity case above.)"""
    from jax_impl import sharding

    cfg = load_config("tiny", {**BASE, "model.n_layers": 10, "model.hidden": 128, "model.ffn_hidden": 512,
                               "parallel.mesh": "data=2,fsdp=4", "parallel.zero": 3, "parallel.hpz": True,
                               "parallel.mbs": 1})

    def temp(per_layer: bool) -> int:
        monkeypatch.setattr(sharding, "GRADS_PER_LAYER", per_layer)
        return Trainer.build(cfg, make_mesh(cfg.mesh_shape())).compile_step().memory_analysis().temp_size_in_bytes

    # the stacked fp32 layer gradients: 1/4 - 1/8 of them fewer per device
    layer = sum(math.prod(s) for s in (
        (10, 128, 128), (10, 128, 64), (10, 128, 64), (10, 128, 128), (10, 128, 512), (10, 128, 512), (10, 512, 128)))
    assert temp(False) - temp(True) >= 0.9 * 4 * layer * (1 / 4 - 1 / 8)


def _collectives(compiled) -> dict[str, int]:
    txt = compiled.as_text()
    return {op: len(re.findall(rf" {op}(?:-start)?\(", txt)) for op in ("all-reduce", "reduce-scatter")}


@pytest.mark.parametrize("zero,dtype", [(1, "fp32"), (2, "bf16")])
def test_zero12_weight_gradients_are_reduce_scattered(monkeypatch, zero, dtype):
    """ZeRO-1/2 on a data-parallel mesh: every projection's weight gradient leaves its matmul's backward as a
    reduce-scatter into the optimizer's sharding (7 per layer and the head's). The SPMD partitioner's own
    reduction is, on XLA:CPU, a whole all-reduce and a slice. Both give the same gradients and losses."""
    from jax_impl import sharding

    mesh_spec, layers = "data=2,fsdp=2", 2
    cfg = load_config("tiny", {**BASE, "parallel.mesh": mesh_spec, "parallel.zero": zero, "train.dtype": dtype,
                               "parallel.mbs": GBS // 4})
    ops = _collectives(Trainer.build(cfg, make_mesh(cfg.mesh_shape())).compile_step())
    assert ops["reduce-scatter"] == 7 * layers + 1
    out = run.__wrapped__(mesh_spec, zero, **{"train.dtype": dtype})
    monkeypatch.setattr(sharding, "EXPLICIT_GRAD_SCATTER", False)
    before = _collectives(Trainer.build(cfg, make_mesh(cfg.mesh_shape())).compile_step())
    assert before["reduce-scatter"] == 0 and before["all-reduce"] > ops["all-reduce"]
    ref = run.__wrapped__(mesh_spec, zero, **{"train.dtype": dtype})
    np.testing.assert_allclose(out["losses"], ref["losses"], rtol=1e-6)
    assert_tree_close(out["grads"], ref["grads"], rtol=1e-5)
    assert_tree_close(out["params"], ref["params"], rtol=2e-4)


def _stack_gathers(text: str) -> list[str]:
    """Layouts of the all-gathers of whole (2-layer) projection stacks in a compiled step's HLO."""
    return re.findall(r"= \w+\[2,\d+,\d+\]\{(\d,\d,\d)\} all-gather\(", text)


@pytest.mark.parametrize("zero", [1, 2])
def test_zero12_states_by_layer(monkeypatch, single, zero):
    """ZeRO-1/2 in fp32 where the data-parallel size divides the layer count: every device owns whole layers of each
    projection stack (its optimizer state, ZeRO-2 gradient), each stack's gradient is reduce-scattered
    once after the backward, and the updated stacks are all-gathered in the row-major layout the dots read. With
    a layer's rows sharded instead, each layer's gradient is reduce-scattered in the backward and XLA:CPU
    gathers the stacks with the gathered dimension major. Both train alike; fp32 equals one device."""
    from jax_impl import sharding

    mesh_spec = "data=2"
    cfg = load_config("tiny", {**BASE, "parallel.mesh": mesh_spec, "parallel.zero": zero, "parallel.mbs": GBS // 2})
    mesh = make_mesh(cfg.mesh_shape())
    tr = Trainer.build(cfg, mesh)
    assert tr.plan.by_layer
    assert tr.opt_leaf_sh["layers"]["w_down"].spec == P("data", None, None)
    assert tr.opt_leaf_sh["layers"]["attn_norm"].spec == P(None, "data")  # norms: the partitioner reduces them
    compiled = tr.compile_step()
    assert _collectives(compiled)["reduce-scatter"] == 7 + 1  # the 7 projection stacks and the head
    assert _stack_gathers(compiled.as_text()) == ["2,1,0"] * 7
    out = run.__wrapped__(mesh_spec, zero)

    monkeypatch.setattr(sharding, "STATES_BY_LAYER", False)
    rows = Trainer.build(cfg, mesh)
    assert not rows.plan.by_layer and rows.opt_leaf_sh["layers"]["w_down"].spec == P(None, "data", None)
    compiled = rows.compile_step()
    assert _collectives(compiled)["reduce-scatter"] == 7 * 2 + 1  # per layer
    assert _stack_gathers(compiled.as_text()) == ["2,0,1"] * 7
    ref = run.__wrapped__(mesh_spec, zero)
    np.testing.assert_allclose(out["losses"], ref["losses"], rtol=1e-6)
    assert_tree_close(out["grads"], ref["grads"], rtol=1e-5)
    assert_tree_close(out["params"], ref["params"], rtol=2e-4)
    np.testing.assert_allclose(out["losses"], single["losses"], rtol=1e-5)
    assert_tree_close(out["grads"], single["grads"], rtol=1e-5)
    assert_tree_close(out["params"], single["params"], rtol=2e-4)


def test_zero12_states_by_layer_through_a_rolled_scan_with_remat():
    """Each layer's per-device gradient also survives a rolled layer loop (its stack carried and updated slice by
    slice in the backward) and a recomputed layer."""
    rolled = {"jax.scan_unroll": 1, "parallel.remat": True}
    one = run.__wrapped__("data=1", 1, **rolled)
    out = run.__wrapped__("data=2", 1, **rolled)
    assert out["trainer"].plan.by_layer and out["trainer"].model_opts.unroll == 1
    np.testing.assert_allclose(out["losses"], one["losses"], rtol=1e-5)
    assert_tree_close(out["grads"], one["grads"], rtol=1e-5)
    assert_tree_close(out["params"], one["params"], rtol=2e-4)


def test_zero12_states_by_layer_only_where_whole_layers_divide_and_fit(monkeypatch):
    """By layer needs the state shards to divide the layers, a data-parallel mesh, ZeRO-1/2 in fp32, and a whole-stack
    gradient of at most BY_LAYER_MAX_GRAD_BYTES (each device holds it until the backward ends)."""
    from jax_impl import sharding

    def by_layer(mesh_spec: str, zero: int = 1, dtype: str = "fp32") -> bool:
        cfg = load_config("tiny", {**BASE, "parallel.mesh": mesh_spec, "parallel.zero": zero, "train.dtype": dtype})
        return ZeroPlan.from_config(cfg, make_abstract_mesh(cfg.mesh_shape())).by_layer

    assert by_layer("data=2") and by_layer("fsdp=2", 2)
    assert not by_layer("data=2", 1, "bf16")  # a bf16 compute copy: its stacks gather as bf16 bits, by rows
    assert not by_layer("data=8")  # 2 layers over 8 shards
    assert not by_layer("data=2", 3) and not by_layer("data=2", 0)
    assert not by_layer("data=2,tensor=2")
    monkeypatch.setattr(sharding, "BY_LAYER_MAX_GRAD_BYTES", 4 * load_config("tiny").model.layer_matrix_params() - 1)
    assert not by_layer("data=2")


HPZ_BF16 = {"parallel.hpz": True, "train.dtype": "bf16"}


def _check_copy_values(tr: Trainer, mesh) -> None:
    """The compute copy made from freshly initialised params has the planned dtypes and shardings, and its
    values are the master's rounded to bf16."""
    params, _ = tr.init_state()
    with activate(mesh):
        copy = jax.jit(tr.compute_copy)(params)
    for c, a in zip(jax.tree.leaves(copy), jax.tree.leaves(tr.copy_abstract), strict=True):
        assert c.dtype == a.dtype and c.sharding.is_equivalent_to(a.sharding, c.ndim)
    wq = jax.lax.bitcast_convert_type(copy["layers"]["wq"], jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(wq), np.asarray(params["layers"]["wq"].astype(jnp.bfloat16)))


def test_hpz_bf16_master_over_all_devices_compute_copy_inside_the_node():
    """hpZ with bf16 compute as DeepSpeed runs it: the fp32 master params sharded like the optimizer state
    (fsdp x data), and the step's bf16 compute copy over fsdp only (bf16 as its uint16 bits; norm weights,
    applied in fp32, stay fp32). fp32 compute keeps the plain hpZ layout: params over fsdp, no copy."""

    from jax_impl.sharding import COPY_BITS

    cfg = load_config("tiny", {**BASE, "parallel.mesh": "data=2,fsdp=4", "parallel.zero": 3, **HPZ_BF16})
    mesh = make_mesh(cfg.mesh_shape())
    tr = Trainer.build(cfg, mesh)
    both = ("fsdp", "data")  # fsdp-major: the copy is an all-gather over `data` of the master
    assert (tr.plan.params, tr.plan.grads, tr.plan.opt, tr.plan.compute) == (both, both, both, ("fsdp",))
    assert tr.storage["layers"]["wq"].sharding.spec == P(None, both, None)
    assert tr.storage["layers"]["wq"].dtype == jnp.float32
    for name, c in tr.copy_abstract["layers"].items():
        assert c.sharding.spec == P(None, "fsdp", None) or c.sharding.spec == P(None, "fsdp"), (name, c.sharding)
        assert c.dtype == (jnp.float32 if name.endswith("norm") else COPY_BITS), (name, c.dtype)
    assert tr.copy_abstract["embed"].sharding.spec == P("fsdp", None)
    # the copy is made by gathering bf16 bits over `data`: no fp32 all-gather, no permute before it
    text = tr.compile_step().as_text()
    stacks = re.findall(r"= (\w+)\[2,\d+,\d+\]\S* all-gather\(", text)  # whole (2-layer) weight stacks
    assert stacks and set(stacks) == {"u16"}, stacks
    assert "collective-permute(" not in text

    _check_copy_values(tr, mesh)

    fp32 = Trainer.build(load_config("tiny", {**BASE, "parallel.mesh": "data=2,fsdp=4", "parallel.zero": 3,
                                              "parallel.hpz": True}), mesh)
    assert fp32.copy_abstract is None and fp32.plan.params == ("fsdp",) and fp32.plan.compute == ()


@pytest.mark.parametrize("zero", [1, 2])
def test_zero12_bf16_master_sharded_like_the_states_compute_copy_replicated(zero):
    """ZeRO-1/2 with bf16 compute as DeepSpeed runs it: the fp32 master params sharded like the optimizer state
    (data x fsdp), the step's bf16 copy with the params' plain sharding (replicated over data x fsdp, tensor
    blocks kept). fp32 compute and pipeline stages keep the plain layout: fp32 params replicated, no copy."""

    from jax_impl.sharding import COPY_BITS

    over = {**BASE, "parallel.mesh": "data=2,fsdp=2,tensor=2", "parallel.zero": zero}
    cfg = load_config("tiny", {**over, "train.dtype": "bf16"})
    mesh = make_mesh(cfg.mesh_shape())
    tr = Trainer.build(cfg, mesh)
    states = ("data", "fsdp")
    assert tr.plan.copy and (tr.plan.params, tr.plan.opt, tr.plan.compute) == (states, states, ())
    assert tr.plan.grads == (states if zero == 2 else ())
    for name, s in tr.storage["layers"].items():
        assert s.dtype == jnp.float32
        assert s.sharding.spec == tr.opt_leaf_sh["layers"][name].spec, name
    assert tr.storage["layers"]["wq"].sharding.spec == P(None, states, "tensor")
    plain = Trainer.build(load_config("tiny", over), mesh)  # fp32: the params' sharding the copy keeps
    for name, c in tr.copy_abstract["layers"].items():
        assert c.sharding.spec == plain.param_sh["layers"][name].spec, name
        assert c.dtype == (jnp.float32 if name.endswith("norm") else COPY_BITS), (name, c.dtype)
    assert tr.copy_abstract["layers"]["wq"].sharding.spec == P(None, None, "tensor")

    _check_copy_values(tr, mesh)

    assert plain.copy_abstract is None and not plain.plan.copy and plain.plan.params == ()
    pp = load_config("tiny", {**BASE, "parallel.mesh": "pipeline=2,data=2,fsdp=2", "parallel.zero": 1,
                              "parallel.gas": 2, "train.dtype": "bf16"})
    staged = Trainer.build(pp, make_mesh(pp.mesh_shape()))
    assert staged.copy_abstract is None and staged.plan.params == ()


def _all_gather_bytes(text: str) -> dict[str, int]:
    """Bytes of every all-gather's result in an HLO text, by element type."""
    out: dict[str, int] = {}
    for ty, dims in re.findall(r"= (\w+)\[([\d,]*)\]\S* all-gather\(", text):
        n = math.prod(int(d) for d in dims.split(",") if d)
        out[ty] = out.get(ty, 0) + n * {"f32": 4, "u16": 2, "bf16": 2}.get(ty, 4)
    return out


@pytest.mark.parametrize("mics", [False, True])
def test_zero3_bf16_gathers_bf16(monkeypatch, mics):
    """ZeRO-3 and MiCS with bf16 compute gather bf16, as DeepSpeed gathers its bf16 params: each layer's weight
    is cast where it is stored and all-gathered as bf16 bits (u16), with no copy kept. The step's all-gather
    bytes fall to at most 55 % of gathering the fp32 params (norm weights, applied in fp32, stay fp32); the
    stored trees keep their shardings. fp32 compute gathers fp32; hpZ keeps its compute copy."""
    from jax_impl import sharding

    over = {**BASE, "parallel.mesh": "data=2,fsdp=4", "parallel.zero": 3, "parallel.mics": mics}
    cfg = load_config("tiny", {**over, "train.dtype": "bf16"})
    mesh = make_mesh(cfg.mesh_shape())
    tr = Trainer.build(cfg, mesh)
    states = ("fsdp",) if mics else ("data", "fsdp")
    assert tr.plan.gather_bits and not tr.plan.copy and tr.copy_abstract is None
    assert (tr.plan.params, tr.plan.opt) == (states, states)
    text = tr.compile_step().as_text()
    # a layer's gathered weight: 2-D (scanned or unrolled), in bf16 bits; the 2-layer stacks are never gathered
    layer_gathers = re.findall(r"= (\w+)\[\d+,\d+\]\S* all-gather\(", text)
    assert layer_gathers and set(layer_gathers) == {"u16"}, layer_gathers
    assert not re.search(r"\[2,\d+,\d+\]\S* all-gather\(", text)

    monkeypatch.setattr(sharding, "ZERO3_GATHER_BF16", False)
    plain = Trainer.build(cfg, mesh)
    assert not plain.plan.gather_bits and plain.plan.params == states
    for name, s in tr.storage["layers"].items():
        assert s.dtype == jnp.float32 and s.sharding.spec == plain.storage["layers"][name].sharding.spec, name
    without = _all_gather_bytes(plain.compile_step().as_text())
    assert set(without) == {"f32"}, without
    assert sum(_all_gather_bytes(text).values()) <= 0.55 * without["f32"]

    monkeypatch.setattr(sharding, "ZERO3_GATHER_BF16", True)
    assert not Trainer.build(load_config("tiny", over), mesh).plan.gather_bits
    hpz = Trainer.build(load_config("tiny", {**over, "parallel.mics": False, **HPZ_BF16}), mesh)
    assert hpz.plan.copy and not hpz.plan.gather_bits


# (overrides, the switch of its copy, the fp32 params' share per device without -> with the copy)
COPY_CASES = {"hpz": ({"parallel.zero": 3, **HPZ_BF16}, "HPZ_COMPUTE_COPY", (1 / 4, 1 / 8)),
              "zero2": ({"parallel.zero": 2, "train.dtype": "bf16"}, "ZERO_COMPUTE_COPY", (1, 1 / 8)),
              "zero1": ({"parallel.zero": 1, "train.dtype": "bf16"}, "ZERO_COMPUTE_COPY", (1, 1 / 8)),
              # ZeRO-3 / MiCS keep no copy: the fp32 params are cast to bf16 before each layer's gather
              "zero3": ({"parallel.zero": 3, "train.dtype": "bf16"}, "ZERO3_GATHER_BF16", None),
              "mics": ({"parallel.zero": 3, "parallel.mics": True, "train.dtype": "bf16"}, "ZERO3_GATHER_BF16", None)}


@pytest.mark.parametrize("case", ["hpz", "zero2", "zero1"])
def test_bf16_compute_copy_step_takes_fewer_argument_bytes(monkeypatch, case):
    """The compiled step's arguments hold the fp32 master over data x fsdp instead of over fsdp (hpZ) or
    replicated (ZeRO-1/2): the params' share of them drops by the difference (the copy is the step's own,
    derived from the master)."""
    from jax_impl import sharding

    over, switch, (without, with_copy) = COPY_CASES[case]
    cfg = load_config("tiny", {**BASE, "model.n_layers": 4, "model.hidden": 128, "model.ffn_hidden": 512,
                               "parallel.mesh": "data=2,fsdp=4", "parallel.mbs": 1, **over})

    def argument_bytes(copy: bool) -> int:
        monkeypatch.setattr(sharding, switch, copy)
        tr = Trainer.build(cfg, make_mesh(cfg.mesh_shape()))
        assert (tr.copy_abstract is not None) == copy == tr.plan.copy
        return tr.compile_step().memory_analysis().argument_size_in_bytes

    master = 4 * cfg.model.n_params()  # fp32, unpadded here (every dim divides by 8)
    assert argument_bytes(False) - argument_bytes(True) >= 0.99 * master * (without - with_copy)


@pytest.mark.parametrize("case", ["hpz", "zero2", "zero3", "mics"])
def test_bf16_compute_copy_keeps_the_numbers(monkeypatch, case):
    """The compute copy (or ZeRO-3's bf16 gathers) changes where the bf16 weights come from, not their values, and
    the gradients still reach the master in fp32: hpZ / ZeRO-2 / ZeRO-3 / MiCS bf16 match them without at the parity
    thresholds of test_sharded_equals_single_device (bf16 sharded vs single device differs in the loss's 5th digit
    either way: per-device batch sizes change XLA's bf16 fusions)."""
    from jax_impl import sharding

    over, switch, _ = COPY_CASES[case]
    over = {k: v for k, v in over.items() if k != "parallel.zero"}
    zero = COPY_CASES[case][0]["parallel.zero"]
    out = run.__wrapped__("data=2,fsdp=4", zero, **over)
    monkeypatch.setattr(sharding, switch, False)
    ref = run.__wrapped__("data=2,fsdp=4", zero, **over)
    narrow = [t.plan.copy or t.plan.gather_bits for t in (out["trainer"], ref["trainer"])]
    assert narrow == [True, False]
    assert out["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert_tree_close(out["grads"], ref["grads"], rtol=1e-5)
    np.testing.assert_allclose(out["losses"], ref["losses"], rtol=1e-6)
    assert_tree_close(out["params"], ref["params"], rtol=2e-4)
