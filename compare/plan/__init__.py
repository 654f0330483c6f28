"""Layout planner: which parallel layouts fit in memory, and which is fastest, before a job is queued.

``python -m compare.plan --help`` (``cli``) for the command. The modules, each importing only those above it:

* ``assumptions``: the modelling constants (``Assumptions``) and units;
* ``layout``: ``Layout`` (mesh, ZeRO, batch split) and the Config it is; the layout a study row ran;
* ``topology``: the ranks and links a collective spans;
* ``memory``: the DeepSpeed memory model per tile, and DeepSpeed's own estimator beside it;
* ``timing``: the step-time model (compute + collectives, pipeline slots);
* ``fit``: the step-time model fitted to the study's runs;
* ``jax_probe``: JAX's compiled memory (AOT on fake CPU devices, in a subprocess, cached);
* ``rank``: candidate layouts, which frameworks run each, evaluated and ranked;
* ``render``: tables, Markdown, plots;
* ``validation``: the planner against the study's CSV;
* ``choice``: ``choose`` / ``auto_layout`` for ``--mesh auto``;
* ``cli``: ``main``.

Everything public is re-exported here: ``from compare.plan import choose, Layout, ...``.
"""

from compare.plan.assumptions import GB, SEQ, Assumptions, apply_assumptions
from compare.plan.choice import Decision, NothingFits, auto_layout, choose, host_cluster
from compare.plan.cli import DEFAULT_OUT, build_parser, main
from compare.plan.fit import Fit, calibrate
from compare.plan.jax_probe import JAX_WORKER_VERSION, jax_compile_key, jax_memory, jax_verdict, measure_jax_memory
from compare.plan.layout import Layout, layout_from_row, register_config
from compare.plan.memory import (
    ACTIVATION_TERMS,
    DS_DEFAULT_ALLGATHER_BUCKET,
    DS_DEFAULT_REDUCE_BUCKET,
    UNCHECKED_TERMS,
    MemoryEstimate,
    Term,
    deepspeed_estimate,
    ds_memory,
    inflight_microbatches,
    largest_module_params,
    layer_activation_bytes,
    model_config,
    stage_params,
)
from compare.plan.rank import (
    FRAMEWORKS,
    GAS_CHOICES,
    MBS_CHOICES,
    Planned,
    batch_splits,
    best_per_gbs,
    best_per_mesh,
    candidates,
    check_gbs,
    check_layout,
    evaluate,
    mesh_candidates,
    mics_shard_sizes,
    nearest_gbs,
    plan,
    runs_on,
    structural_summary,
    unprobed_per_mesh,
    working_gbs,
)
from compare.plan.render import (
    PLAN_HEAD,
    assumptions_md,
    jax_only_note,
    jax_split,
    memory_breakdown,
    plan_rows,
    plot_plan,
    time_breakdown,
)
from compare.plan.timing import Comm, StepEstimate, collective_seconds, step_time, tflops_per_tile
from compare.plan.topology import Group, group_of
from compare.plan.validation import (
    RANK_HEAD,
    VALID_HEAD,
    mics_fits,
    plot_validation,
    ranking_check,
    ranking_groups,
    ranking_rows,
    step_terms,
    validate,
    validation_markdown,
    zero3_trend,
)

__all__ = [
    "ACTIVATION_TERMS", "DEFAULT_OUT", "DS_DEFAULT_ALLGATHER_BUCKET", "DS_DEFAULT_REDUCE_BUCKET", "FRAMEWORKS",
    "GAS_CHOICES",
    "GB", "JAX_WORKER_VERSION", "MBS_CHOICES", "PLAN_HEAD", "RANK_HEAD", "SEQ", "UNCHECKED_TERMS", "VALID_HEAD",
    "Assumptions", "Comm", "Decision", "Fit", "Group", "Layout", "MemoryEstimate", "NothingFits", "Planned",
    "StepEstimate", "Term", "apply_assumptions", "assumptions_md", "auto_layout", "batch_splits", "best_per_gbs",
    "best_per_mesh", "build_parser", "calibrate", "candidates", "check_gbs", "check_layout", "choose",
    "collective_seconds", "deepspeed_estimate", "ds_memory", "evaluate", "group_of", "host_cluster",
    "inflight_microbatches", "jax_compile_key", "jax_memory", "jax_only_note", "jax_split", "jax_verdict",
    "largest_module_params", "layer_activation_bytes", "layout_from_row", "main", "measure_jax_memory",
    "memory_breakdown",
    "mesh_candidates", "mics_fits", "mics_shard_sizes", "model_config", "nearest_gbs", "plan", "plan_rows",
    "plot_plan", "plot_validation", "ranking_check", "ranking_groups", "ranking_rows", "register_config",
    "runs_on", "stage_params", "step_terms", "step_time", "structural_summary", "tflops_per_tile", "time_breakdown",
    "unprobed_per_mesh", "validate", "validation_markdown", "working_gbs", "zero3_trend",
]
