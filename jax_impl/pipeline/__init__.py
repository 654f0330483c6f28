"""Pipeline parallelism over the ``pipeline`` mesh axis: GPipe (plain or circular) and 1F1B schedules.

Stage ``s`` of ``p`` stores only its contiguous slice of the stacked ``layers`` (``sharding.RULES``). The step
runs inside ``jax.shard_map`` with only ``pipeline`` manual, so stages hand activations on with ``lax.ppermute``
while the compiler keeps splitting each microbatch over ``data``/``fsdp`` and each weight over ``tensor``.
Stage 0 embeds; the head + loss run on the last stage or, GPipe's default, split over all stages by vocabulary
columns. Every stage stores the embedding and head (``report_placement``). The stages run the model's own
functions (``model.embed``, ``model.layers``, ``model.head_loss``) under the trainer's ``ModelOptions``.

    common.py        stage plumbing: checks, the stage's layers and vjp, sends between stages, the head split
    gpipe.py         GPipe: ``jax.grad`` of a tick loop (``ModelOptions.ticks_as_scan``: the benchmark lever)
    one_f_one_b.py   1F1B: written out with ``jax.vjp`` and a ring of ``p`` residual slots

Schedules, memory and the measurements behind each choice: docs/pipeline.md and docs/performance.md.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from configs import Config, Layout
from jax_impl.model import ModelOptions
from jax_impl.pipeline import gpipe, one_f_one_b
from jax_impl.pipeline.common import OUTER, PIPE, check, chunks, stages

__all__ = ["OUTER", "PIPE", "check", "gpipe", "loss_and_grads", "one_f_one_b", "report_placement", "stages"]


def _specs(params: dict) -> dict:
    return {k: (jax.tree.map(lambda _: P(PIPE), v) if k == "layers" else P()) for k, v in params.items()}


def loss_and_grads(cfg: Config, mesh: Mesh, params: dict, batch: jax.Array,
                   opts: ModelOptions | None = None) -> tuple[jax.Array, dict]:
    """Mean loss and mean gradients over the ``gas`` microbatches of ``batch`` (gas, dp*mbs, seq+1).

    ``params`` are the stored (maybe padded) trees with ``layers`` sharded over ``pipeline``; the
    result equals ``jax.value_and_grad`` of the non-pipelined loss averaged over the microbatches.
    ``opts``: how the model runs (the trainer's, with its ZeRO plan); default ``ModelOptions.from_config(cfg)``.
    """
    opts = ModelOptions.from_config(cfg) if opts is None else opts
    p = stages(mesh.shape)
    check(cfg, mesh.shape)
    specs = _specs(params)
    if cfg.parallel.pipeline_schedule == "gpipe":
        v = cfg.jax.pipeline_repeats
        if v > 1:  # the layers as v chunks (circular schedule), each sharded over the stages
            specs = dict(specs, layers=[specs["layers"]] * v)
        staged = jax.shard_map(partial(gpipe.schedule, cfg, opts, p), mesh=mesh, in_specs=(specs, P()),
                               out_specs=(P(), P()), axis_names={PIPE})

        def fn(params, batch):
            return staged(dict(params, layers=chunks(params["layers"], v)) if v > 1 else params, batch)

        (_, loss), grads = jax.value_and_grad(fn, has_aux=True)(params, batch)
        return loss, grads
    fn = jax.shard_map(partial(one_f_one_b.schedule, opts, p), mesh=mesh, in_specs=(specs, P()), out_specs=(P(), specs),
                       axis_names={PIPE})
    return fn(params, batch)


def report_placement(cfg: Config, mesh_shape: Any) -> dict[str, int]:
    """Parameter counts per device of the stage's layers and of the embedding/head copy every stage keeps."""
    m, p, tp = cfg.model, stages(mesh_shape), Layout.from_shape(dict(mesh_shape)).tensor
    layer_params = (m.n_params() - 2 * m.padded_vocab * m.hidden - m.hidden) // m.n_layers
    return {"layers_per_stage": m.n_layers // p, "stage_layer_params": m.n_layers // p * layer_params // tp,
            "embed_head_params": 2 * m.padded_vocab * m.hidden // tp + m.hidden}
