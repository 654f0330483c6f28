"""Pipeline parallelism: equals the non-pipelined step, stores stages apart, 1F1B bounds memory, 70B plans."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from _util import assert_tree_close

from aurora_data import SyntheticSource, global_batch
from configs import ConfigError, load_config
from jax_impl import pipeline
from jax_impl.model import ModelOptions
from jax_impl.pipeline import common
from jax_impl.sharding import activate, batch_sharding, make_mesh
from jax_impl.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
GAS, MBS = 4, 2
BASE = {"model.n_layers": 4, "model.n_heads": 8, "model.n_kv_heads": 4, "data.seq_len": 16, "parallel.gas": GAS,
        "parallel.mbs": MBS, "parallel.zero": 0}


def _batch(cfg, dp: int = 1) -> jax.Array:
    src = SyntheticSource(cfg.model.vocab_size, cfg.data.seq_len)
    return jnp.asarray(global_batch(src, 0, MBS // dp, GAS, dp))  # (gas, mbs, seq+1): same samples for any dp


@pytest.fixture(scope="module")
def reference():
    """Loss and gradients of the non-pipelined model on one device, averaged over the GAS microbatches."""
    cfg = load_config("tiny", {**BASE, "parallel.mesh": "data=1"})
    tr = Trainer.build(cfg, make_mesh(cfg.mesh_shape()))
    params, _ = tr.init_state()
    batch = _batch(cfg)

    def loss(p):
        return sum(tr.loss_fn(p, batch[i]) for i in range(GAS)) / GAS

    with activate(tr.mesh):
        value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), grads, batch


def _pipelined(cfg, batch) -> tuple[float, dict, dict]:
    """Loss, logical and stored gradients of pipeline.loss_and_grads for cfg on batch (over the mesh's data axes)."""
    mesh = make_mesh(cfg.mesh_shape())
    tr = Trainer.build(cfg, mesh)
    params, _ = tr.init_state()
    with activate(mesh):
        b = jax.device_put(batch, batch_sharding(mesh))
        loss, grads = jax.jit(lambda p, b: pipeline.loss_and_grads(cfg, mesh, p, b))(params, b)
    return float(loss), tr.logical_params(grads), grads


CASES = [(p, sched, remat) for p in (2, 4) for sched in ("gpipe", "1f1b") for remat in (False, True)]
FAST = {(2, "gpipe", False), (4, "1f1b", False)}  # + pp2 1F1B remat on data x tensor below; the rest: slow tier


@pytest.mark.parametrize("stages,schedule,remat", [
    pytest.param(*c, marks=[] if c in FAST else [pytest.mark.slow]) for c in CASES],
    ids=[f"pp{p}-{s}{'-remat' if r else ''}" for p, s, r in CASES])
def test_pipeline_loss_and_grads_equal_single_device(reference, stages, schedule, remat):
    ref_loss, ref_grads, batch = reference
    cfg = load_config("tiny", {**BASE, "parallel.mesh": f"pipeline={stages}", "parallel.remat": remat,
                               "parallel.pipeline_schedule": schedule})
    loss, grads, stored = _pipelined(cfg, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert_tree_close(grads, ref_grads, rtol=1e-5)
    assert stored["layers"]["w_up"].sharding.spec[0] == "pipeline"  # gradients stay with their stage


@pytest.mark.parametrize("schedule,head", [("1f1b", "last"), ("gpipe", "split"),
                                           pytest.param("gpipe", "last", marks=pytest.mark.slow)])
def test_pipeline_data_tensor_equals_single_device(reference, schedule, head):
    """GPipe's split head takes every stage's vocabulary columns s, s+p, ... out of a tensor-sharded head."""
    ref_loss, ref_grads, batch = reference
    cfg = load_config("tiny", {**BASE, "parallel.mesh": "pipeline=2,data=2,tensor=2", "parallel.zero": 1,
                               "parallel.pipeline_schedule": schedule, "parallel.remat": schedule == "1f1b",
                               "jax.pipeline_head": head})
    loss, grads, _ = _pipelined(cfg, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert_tree_close(grads, ref_grads, rtol=1e-5)


def test_split_head_step_has_no_reduce_scatter():
    """The split head combines its log-partition by a psum whose transpose is local, not by an all-gather, whose
    transpose is a reduce-scatter: with it the stages' sends stalled over gloo when they ran as processes (6.7x
    the step time)."""
    cfg = load_config("tiny", {**BASE, "parallel.mesh": "pipeline=2", "jax.pipeline_head": "split"})
    mesh = make_mesh(cfg.mesh_shape())
    tr = Trainer.build(cfg, mesh)
    params, _ = tr.init_state()
    with activate(mesh):
        b = jax.device_put(_batch(cfg), batch_sharding(mesh))
        hlo = jax.jit(lambda p, b: pipeline.loss_and_grads(cfg, mesh, p, b)).lower(params, b).compile().as_text()
    assert "collective-permute" in hlo and "all-reduce" in hlo
    assert "reduce-scatter" not in hlo


@pytest.mark.parametrize("over", [
    {"parallel.mesh": "pipeline=2"},  # unrolled ticks: each tick's chunk is static, a select where stages straddle
    pytest.param({"parallel.mesh": "pipeline=2", "jax.scan_unroll": 1},  # lax.scan ticks: chunk indexed per layer
                 marks=pytest.mark.slow),
    pytest.param({"parallel.mesh": "pipeline=2", "jax.scan_unroll": 1, "parallel.remat": True},
                 marks=pytest.mark.slow),
    pytest.param({"parallel.mesh": "pipeline=2", "jax.pipeline_head": "last"}, marks=pytest.mark.slow),
    pytest.param({"parallel.mesh": "pipeline=2,data=2,tensor=2", "parallel.zero": 1}, marks=pytest.mark.slow)],
    ids=["unrolled", "scanned", "scanned-remat", "head-last", "data-tensor"])
def test_circular_pipeline_equals_single_device(reference, over):
    """pipeline_repeats=2: 4 layers on 2 stages in 4 chunks of 1; stage 0 runs layers 0 and 2, stage 1 layers 1, 3."""
    ref_loss, ref_grads, batch = reference
    loss, grads, _ = _pipelined(load_config("tiny", {**BASE, "jax.pipeline_repeats": 2, **over}), batch)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert_tree_close(grads, ref_grads, rtol=1e-5)  # in stored layer order


def _conds_running_layers(jaxpr, ffn: int) -> int:
    """How many ``cond``s (at any depth) have a branch with an FFN matmul, i.e. run a stage's layers conditionally."""
    def has_ffn_dot(jx) -> bool:
        return any((e.primitive.name == "dot_general" and any(ffn in v.aval.shape for v in e.invars))
                   or any(has_ffn_dot(sub) for sub in jax.extend.core.jaxprs_in_params(e.params)) for e in jx.eqns)

    n = 0
    for e in jaxpr.eqns:
        if e.primitive.name == "cond" and any(has_ffn_dot(b.jaxpr) for b in e.params["branches"]):
            n += 1
        n += sum(_conds_running_layers(sub, ffn) for sub in jax.extend.core.jaxprs_in_params(e.params))
    return n


@pytest.mark.parametrize("stages", [2, 4])
def test_gpipe_fill_and_drain_ticks_skip_idle_stages(stages):
    """The p - 1 fill and p - 1 drain ticks run the layers under a cond on the stage (forward and backward), so a
    stage without a microbatch computes nothing; the m - p + 1 full ticks run them unconditionally."""
    cfg = load_config("tiny", {**BASE, "parallel.mesh": f"pipeline={stages}"})
    mesh = make_mesh(cfg.mesh_shape())
    params, _ = Trainer.build(cfg, mesh).init_state()
    batch = jax.ShapeDtypeStruct((GAS, MBS, cfg.data.seq_len + 1), jnp.int32)
    with activate(mesh):
        jaxpr = jax.make_jaxpr(lambda p, b: pipeline.loss_and_grads(cfg, mesh, p, b))(params, batch)
    # forward: one cond per fill/drain tick; backward: their transposes
    assert _conds_running_layers(jaxpr.jaxpr, cfg.model.ffn_hidden) == 2 * 2 * (stages - 1)


def _count(jaxpr, primitive: str) -> int:
    """How many equations of ``primitive`` ``jaxpr`` holds, at any depth."""
    return sum((e.primitive.name == primitive) + sum(_count(sub, primitive)
                                                      for sub in jax.extend.core.jaxprs_in_params(e.params))
               for e in jaxpr.eqns)


def test_gpipe_ticks_as_scan_option_equals_unrolled_ticks(reference):
    """``ModelOptions.ticks_as_scan`` (benchmarks/ab_step.py's lever:ticks=scan, passed as an option) runs the
    ticks as a lax.scan -- a different program -- with the same loss and gradients."""
    import dataclasses

    cfg = load_config("tiny", {**BASE, "parallel.mesh": "pipeline=2"})
    mesh = make_mesh(cfg.mesh_shape())
    tr = Trainer.build(cfg, mesh)
    params, _ = tr.init_state()
    scan = dataclasses.replace(tr.model_opts, ticks_as_scan=True)

    def matmuls(opts) -> int:
        with activate(mesh):
            jx = jax.make_jaxpr(lambda p, b: pipeline.loss_and_grads(cfg, mesh, p, b, opts))(params, reference[2])
        return _count(jx.jaxpr, "dot_general")

    # the m + p - 1 = 5 ticks traced once (a scan body) instead of one copy each
    assert matmuls(scan) * 3 < matmuls(tr.model_opts)
    with activate(mesh):
        b = jax.device_put(reference[2], batch_sharding(mesh))
        loss, grads = jax.jit(lambda p, b: pipeline.loss_and_grads(cfg, mesh, p, b, scan))(params, b)
    assert float(loss) == pytest.approx(reference[0], rel=1e-5)
    assert_tree_close(tr.logical_params(grads), reference[1], rtol=1e-5)


@pytest.mark.parametrize("remat", [False, True])
def test_stage_residuals_hold_no_copy_of_the_weights(remat):
    """What a schedule keeps between a stage's forward and its backward (1F1B's ring, a skippable fill/drain
    tick's cond outputs) is the activations: every weight among the stage's vjp residuals is the stage's own
    weight array, none a copy (a stacked copy per fill/drain tick was 44 MiB of a bench pp2 bf16 step's 209 MiB
    temp; 1F1B's ring held one per slot)."""
    cfg = load_config("tiny", {**BASE, "parallel.mesh": "tensor=2", "parallel.remat": remat, "train.dtype": "bf16"})
    mesh = make_mesh(cfg.mesh_shape())  # weights constrained to their tensor shards, as inside the pipeline
    layers = Trainer.build(cfg, mesh).init_state()[0]["layers"]
    x = jax.ShapeDtypeStruct((MBS, cfg.data.seq_len, cfg.model.hidden), jnp.bfloat16)
    stage = common.StageVjp(common.stage_fn(ModelOptions.from_config(cfg)))
    with activate(mesh):
        acts = jax.eval_shape(lambda w, x: stage.forward(w, x)[1], layers, x)
    weights = jax.tree.leaves(layers)
    matrices = [j for j, w in enumerate(weights) if w.ndim == 3]  # (the norms' backward reads their broadcasts)
    assert set(matrices) <= set(stage.where) and len(matrices) == 7, stage.where
    assert not {a.shape for a in acts} & {w.shape for w in weights}, [a.shape for a in acts]


@pytest.mark.slow
def test_circular_pipeline_with_gas_equal_to_stages():
    """m = p: the last stage's output re-enters stage 0 in the very next tick (written and read in one tick)."""
    over = {**BASE, "parallel.gas": 2, "model.n_layers": 8}
    cfg1 = load_config("tiny", {**over, "parallel.mesh": "data=1"})
    tr1 = Trainer.build(cfg1, make_mesh(cfg1.mesh_shape()))
    params, _ = tr1.init_state()
    batch = _batch(cfg1)[:2]
    with activate(tr1.mesh):
        ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p: (tr1.loss_fn(p, batch[0])
                                                                    + tr1.loss_fn(p, batch[1])) / 2))(params)
    cfg = load_config("tiny", {**over, "parallel.mesh": "pipeline=2", "jax.pipeline_repeats": 4})
    loss, grads, _ = _pipelined(cfg, batch)
    assert loss == pytest.approx(float(ref_loss), rel=1e-5)
    assert_tree_close(grads, ref_grads, rtol=1e-5)


def test_stages_store_only_their_layers():
    cfg = load_config("tiny", {**BASE, "model.n_layers": 8, "parallel.mesh": "pipeline=4,data=2", "parallel.zero": 1})
    mesh = make_mesh(cfg.mesh_shape())
    tr = Trainer.build(cfg, mesh)
    params, _ = tr.init_state()
    rank = {d: int(np.argwhere(mesh.devices == d)[0][0]) for d in mesh.devices.flat}  # device -> pipeline rank
    for name, w in params["layers"].items():
        assert w.sharding.spec[0] == "pipeline", name
        for shard in w.addressable_shards:
            r = rank[shard.device]
            assert shard.index[0] == slice(2 * r, 2 * r + 2), (name, r, shard.index)  # layers 2r, 2r+1 only
            assert shard.data.shape[0] == 2
    # the jitted step takes and returns params in these shardings (in_shardings = out_shardings, donated)
    assert all(s.spec[0] == "pipeline" for s in jax.tree.leaves(tr.param_sh["layers"]))
    assert tr.param_sh["head"].spec[0] != "pipeline"  # embedding/head: stored on every stage (see jax_impl/pipeline)
    # AdamW's mu and nu of every layer weight follow their stage too (and ZeRO-1 shards them over data)
    staged = [s for s in jax.tree.leaves(tr.opt_sh) if len(s.spec) and s.spec[0] == "pipeline"]
    assert len(staged) == 2 * len(params["layers"]) and all("data" in s.spec for s in staged)


def _temp_bytes(schedule: str, gas: int) -> int:
    cfg = load_config("tiny", {**BASE, "data.seq_len": 32, "parallel.gas": gas, "parallel.mbs": 1,
                               "parallel.mesh": "pipeline=2", "parallel.pipeline_schedule": schedule})
    tr = Trainer.build(cfg, make_mesh(cfg.mesh_shape()))
    return tr.compile_step().memory_analysis().temp_size_in_bytes


def test_1f1b_peak_activation_memory_below_gpipe():
    # GAS >= 2 x stages: GPipe keeps m + p - 1 ticks of residuals, 1F1B a ring of p microbatches. GAS 16:
    # at this tiny size the fixed temporaries (weights, gradients) are a large share at GAS 8 already
    gpipe, ofob = _temp_bytes("gpipe", 16), _temp_bytes("1f1b", 16)
    assert ofob < 0.6 * gpipe, (ofob, gpipe)


@pytest.mark.slow
def test_1f1b_activation_memory_does_not_grow_with_gas():
    ofob8, ofob16, gpipe16 = _temp_bytes("1f1b", 8), _temp_bytes("1f1b", 16), _temp_bytes("gpipe", 16)
    assert ofob16 <= ofob8 * 1.05 and gpipe16 > 1.3 * _temp_bytes("gpipe", 8), (ofob8, ofob16, gpipe16)


def test_pipeline_data_tensor_trains_with_falling_loss(tmp_path):
    from jax_impl.train import main

    # the small preset (indexed stdlib corpus, vocab 4096) shrunk to hidden 128, 4 layers, seq 64 for the fast tier
    out = main(["--preset", "small", "--mesh", "pipeline=2,data=2,tensor=2", "--zero", "1", "--gas", "4", "--steps",
                "12", "--out-dir", str(tmp_path), "--wandb", "disabled", "--quiet", "--model.n_layers=4",
                "--model.hidden=128", "--model.ffn_hidden=256", "--data.seq_len=64",
                "--parallel.pipeline_schedule=1f1b", "--optim.lr=3e-3"])
    losses = out["losses"]
    assert all(np.isfinite(losses)) and sum(losses[-3:]) / 3 < losses[0] - 1.0, losses
    assert out["params"]["layers"]["wq"].sharding.spec[0] == "pipeline"


@pytest.mark.slow
def test_small_preset_pipeline_data_tensor_trains(tmp_path):
    from jax_impl.train import main

    out = main(["--preset", "small", "--mesh", "pipeline=2,data=2,tensor=2", "--zero", "1", "--gas", "4",
                "--steps", "10", "--out-dir", str(tmp_path), "--wandb", "disabled", "--quiet"])
    losses = out["losses"]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses


def test_bad_pipeline_configs_raise_before_compile():
    def cfg_for(pp: int, **over):
        return load_config("tiny", {"parallel.mesh": f"pipeline={pp}", **over}, validate=False)

    with pytest.raises(ConfigError, match=r"n_layers=6 does not split into pipeline=4.*\[1, 2, 3, 6\]"):
        pipeline.check(cfg_for(4, **{"model.n_layers": 6, "parallel.zero": 1}), {"pipeline": 4})
    cfg = cfg_for(4, **{"model.n_layers": 4, "parallel.pipeline_schedule": "1f1b", "parallel.gas": 2,
                        "parallel.zero": 1})
    with pytest.raises(ConfigError, match=r"gas=2 < pipeline=4; set --gas 4"):
        pipeline.check(cfg, {"pipeline": 4})
    pipeline.check(cfg_for(4, **{"model.n_layers": 4, "parallel.gas": 2, "parallel.zero": 1}),
                   {"pipeline": 4})  # GPipe runs any GAS (with a bubble of (p-1)/(m+p-1))
    with pytest.raises(ConfigError, match=r"padded vocab 258 is not divisible by pipeline x tensor = 4; use "
                       r"jax.pipeline_head=last"):
        pipeline.check(cfg_for(4, **{"model.n_layers": 4, "model.vocab_size": 258, "model.vocab_pad_to": 2,
                                     "parallel.zero": 1}), {"pipeline": 4})
    pipeline.check(cfg_for(4, **{"model.n_layers": 4, "model.vocab_size": 258, "model.vocab_pad_to": 2,
                                 "parallel.zero": 1, "jax.pipeline_head": "last"}), {"pipeline": 4})
    with pytest.raises(ConfigError, match=r"pipeline_repeats=3: model.n_layers=4 does not split into pipeline x "
                       r"repeats = 6 equal chunks; pick repeats from \[1, 2\]"):
        pipeline.check(cfg_for(2, **{"model.n_layers": 4, "parallel.zero": 1, "parallel.gas": 4,
                                     "jax.pipeline_repeats": 3}), {"pipeline": 2})
    with pytest.raises(ConfigError, match=r"gas=1 < pipeline=2; set --gas 2 or more, or jax.pipeline_repeats=1"):
        pipeline.check(cfg_for(2, **{"model.n_layers": 4, "parallel.zero": 1, "jax.pipeline_repeats": 2}),
                       {"pipeline": 2})
    with pytest.raises(ConfigError, match=r"pipeline_repeats=2 runs with parallel.pipeline_schedule=gpipe only"):
        pipeline.check(cfg_for(2, **{"model.n_layers": 4, "parallel.zero": 1, "parallel.gas": 4,
                                     "jax.pipeline_repeats": 2, "parallel.pipeline_schedule": "1f1b"}),
                       {"pipeline": 2})
    with pytest.raises(ConfigError, match=r"pipeline_repeats=0 must be >= 1"):
        pipeline.check(cfg_for(2, **{"model.n_layers": 4, "parallel.zero": 1, "jax.pipeline_repeats": 0}),
                       {"pipeline": 2})
    with pytest.raises(ConfigError, match="ZeRO 0 or 1"):
        pipeline.check(cfg_for(2, **{"model.n_layers": 4, "parallel.zero": 3}), {"pipeline": 2})
    # and the trainer refuses before building anything
    cfg = load_config("tiny", {"model.n_layers": 4, "parallel.pipeline_schedule": "1f1b", "parallel.gas": 1,
                               "parallel.mesh": "pipeline=2", "parallel.zero": 0}, validate=False)
    with pytest.raises(ConfigError, match="set --gas 2"):
        Trainer.build(cfg, make_mesh(cfg.mesh_shape()))


def _dry_run(mesh: str, *extra: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "jax_impl.train", "--preset", "llama2-70b", "--mesh", mesh,
                           "--zero", "1", "--dry-run", *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _gib(out: str, key: str) -> float:
    line = next(x for x in out.splitlines() if x.strip().startswith(key))
    return float(line.split()[1].replace(",", ""))


@pytest.mark.parametrize("mesh,devices,stage_layers,tp", [  # 8-25 s each on 2 shared cores, 0.6 GB RSS
    ("pipeline=8,data=6,tensor=2", 96, 10, 2), pytest.param("pipeline=16,data=12", 192, 5, 1, marks=pytest.mark.slow)])
def test_70b_pipeline_dry_run(mesh, devices, stage_layers, tp):
    out = _dry_run(mesh)
    assert f"= {devices} devices, ZeRO-1" in out
    cfg = load_config("llama2-70b")
    place = pipeline.report_placement(cfg, {"pipeline": 80 // stage_layers, "tensor": tp})
    # params per device = the stage's layers / TP + the embedding/head copy, fp32 (+ hidden padded to DP)
    expect = (place["stage_layer_params"] + place["embed_head_params"]) * 4 / 2**30
    assert expect <= _gib(out, "params") <= 1.002 * expect
    assert _gib(out, "opt_state") <= 2 * _gib(out, "params") / (96 // 8 // tp) * 1.01  # ZeRO-1 over data
    assert _gib(out, "temp") > 0
