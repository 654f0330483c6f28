"""Layout planner: which parallel layouts fit in memory, and which is fastest, before a job is queued.

    python -m compare.plan --model llama2-70b --nodes 8 [--jax] [--cluster h100-node] [--cluster.mem_gb=80]
    python -m compare.plan --model llama2-70b --nodes 8 --mesh pipeline=8,data=6,tensor=2 --zero 1 --gas 32
    python -m compare.plan --model llama2-70b --nodes 16 --gbs 768 [--seq 4096]   # only layouts running GBS 768
    python -m compare.plan --validate          # every reference row: predicted vs measured; ranking check

``choose(cfg, nodes=, cluster=, framework=, devices=)`` is the same ranking as an API: the layout a trainer's
``--mesh auto`` runs (the pick, the runner-up, what was weighed and why).

Two memory figures per tile:

* DeepSpeed (modelled): the reference's bf16 params/grads, fp32 master weights + Adam moments split
  per ZeRO stage, hpZ/MiCS copies, pipeline activations in flight by schedule (DeepSpeed's 1F1B), the
  recompute working set, logits, communication buckets from ``torch_ref.ds_config``, plus runtime/allocator
  overhead; every term printed, every verdict with the model's error (docs/planner.md).
* JAX (``--jax``): XLA's ``memory_analysis()`` of the AOT-compiled train step on fake CPU devices, one
  subprocess per layout, cached as JSON by config hash. It is the *CPU* compiler's buffer assignment,
  not the Intel GPU compiler's; JAX keeps fp32 params (bf16 compute), unlike DeepSpeed's bf16 params.

A layout DeepSpeed does not run (ZeRO-3 with tensor > 1: DeepSpeed runs tensor parallelism under ZeRO-1/2 only)
has no DeepSpeed figure: it is listed, unranked ("–"), after the ranked layouts of its GBS, and its memory verdict
is JAX's compiled peak once ``--jax`` compiles it. The JSON output lists it under "jax_only"; every layout there
carries "runs_on" (deepspeed, torch_ref, jax).

Step time = compute (FLOPs incl. recompute / (peak x eta)) + collectives (sized per layout, costed on
the link they cross) not hidden by overlap, with the pipeline's (m + p - 1) schedule, + per-step collectives
(ZeRO-3's partition exchange falls as 1/DP). ``Assumptions.FITTED`` are fitted to the reference CSV (least
squares on log samples/s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compare.cluster import Cluster, load_cluster
from compare.plan.assumptions import GB, SEQ, Assumptions, apply_assumptions
from compare.plan.fit import calibrate
from compare.plan.jax_probe import _jax_measure_worker, _jax_worker, jax_memory
from compare.plan.layout import Layout
from compare.plan.rank import (
    GAS_CHOICES,
    Planned,
    best_per_gbs,
    best_per_mesh,
    check_gbs,
    plan,
    structural_summary,
    unprobed_per_mesh,
)
from compare.plan.render import (
    PLAN_HEAD,
    _md_table,
    _print_rich,
    assumptions_md,
    jax_only_note,
    memory_breakdown,
    plan_rows,
    plot_plan,
    time_breakdown,
)
from compare.plan.timing import tflops_per_tile
from compare.plan.validation import (
    RANK_HEAD,
    VALID_HEAD,
    _validation_md,
    plot_validation,
    ranking_check,
    ranking_rows,
    validate,
    zero3_trend,
)
from compare.reference import DEFAULT_REFERENCE, load_reference
from configs import ConfigError, load_config

DEFAULT_OUT = Path("reports") / "plan"


def _split_overrides(rest: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    cluster, assume = {}, {}
    it = iter(rest)
    for arg in it:
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"unrecognised argument {arg!r}; overrides look like --cluster.mem_gb=80 or "
                              "--assume.eta=0.3")
        key, _, val = arg[2:].partition("=")
        if not _:
            val = next(it, None)  # type: ignore[assignment]
            if val is None:
                raise ConfigError(f"{arg} has no value; write {arg}=VALUE")
        section, _, name = key.partition(".")
        if section == "cluster":
            cluster[name] = val
        elif section == "assume":
            assume[name] = val
        else:
            raise ConfigError(f"unknown override section {section!r} in {arg!r}; use --cluster.KEY or --assume.KEY")
    return cluster, assume


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m compare.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama2-70b", help="a configs/presets name (llama2-70b, auroragpt-42b-tp6)")
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--cluster", default="aurora", help="compare/clusters/<name>.toml or a path")
    ap.add_argument("--seq", type=int, default=SEQ, help="sequence length (default: the study's 4096)")
    ap.add_argument("--gbs", type=int, default=None,
                    help="rank only layouts with mbs x gas x dp == GBS (default: the best per global batch)")
    ap.add_argument("--mesh", help="plan one layout only, e.g. pipeline=8,data=6,tensor=2")
    ap.add_argument("--zero", type=int, default=None, help="with --mesh (default 1 with a pipeline, else 3)")
    ap.add_argument("--hpz", action="store_true", help="with --mesh: ZeRO-3 hpZ over the fsdp axis")
    ap.add_argument("--mics", action="store_true", help="with --mesh: ZeRO-3 MiCS over the fsdp axis")
    ap.add_argument("--mbs", type=int, default=1)
    ap.add_argument("--gas", type=int, default=None, help="with --mesh (default: every choice)")
    ap.add_argument("--no-remat", action="store_true", help="with --mesh: no activation checkpointing")
    ap.add_argument("--schedule", choices=("1f1b", "gpipe"), default="1f1b",
                    help="with --mesh: pipeline schedule (DeepSpeed runs 1f1b; gpipe holds every microbatch)")
    ap.add_argument("--jax", action="store_true", help="also AOT-compile the top layouts on fake CPU devices")
    ap.add_argument("--jax-top", type=int, default=3, help="how many of the ranked layouts to compile with --jax")
    ap.add_argument("--all", action="store_true", help="list every fitting variant, not the best per layout")
    ap.add_argument("--no-fit", action="store_true", help="use the --assume values as they are")
    ap.add_argument("--validate", action="store_true", help="predicted vs measured for the reference CSV")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--jax-worker", help=argparse.SUPPRESS)
    ap.add_argument("--jax-measure", help=argparse.SUPPRESS)
    return ap


def _single_layouts(args: argparse.Namespace, nodes: int, cluster: Cluster) -> list[Layout]:
    from configs import Layout as MeshLayout

    shape = MeshLayout.from_spec(args.mesh, nodes * cluster.tiles_per_node)
    n = shape.world
    if n != nodes * cluster.tiles_per_node:
        raise ConfigError(f"mesh {args.mesh!r} needs {n} tiles but {nodes} nodes x {cluster.tiles_per_node} tiles "
                          f"= {nodes * cluster.tiles_per_node}; change --nodes or the mesh so they match")
    zero = args.zero if args.zero is not None else (1 if shape.pipeline > 1 else 3)
    base = Layout.on("--mesh", shape.replace(zero=zero, hpz=args.hpz, mics=args.mics), mbs=args.mbs,
                     remat=not args.no_remat, schedule=args.schedule)
    if args.gbs and not args.gas:  # the batch is given: the GAS that makes it, if there is one
        per = args.mbs * base.dp
        if args.gbs % per:
            raise ConfigError(f"--gbs {args.gbs} is not a multiple of mbs x dp = {args.mbs} x {base.dp} = {per} for "
                              f"mesh {args.mesh!r}; use a multiple of {per} or another --mbs/--mesh")
        return [dataclasses.replace(base, gas=args.gbs // per)]
    return [dataclasses.replace(base, gas=g) for g in ((args.gas,) if args.gas else GAS_CHOICES)]


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.jax_worker:
        return _jax_worker(args.jax_worker)
    if args.jax_measure:
        return _jax_measure_worker(args.jax_measure)
    try:
        c_over, a_over = _split_overrides(rest)
        cluster = load_cluster(args.cluster, c_over)
        a = apply_assumptions(Assumptions(), a_over)
        if args.validate:
            return _main_validate(args, cluster, a)
        load_config(args.model)  # unknown preset -> ConfigError with the list
        if args.nodes < 1:
            raise ConfigError(f"--nodes {args.nodes} must be >= 1")
        if args.seq < 1:
            raise ConfigError(f"--seq {args.seq} must be >= 1 (tokens per sample)")
        if args.gbs is not None:
            check_gbs(args.model, args.nodes, cluster, args.gbs)
        fit = None
        if not args.no_fit:
            fit = calibrate(cluster=cluster, a=a, loo=False)
            a = dataclasses.replace(a, **{k: v for k, v in fit.params.items() if k not in a_over})
        layouts = _single_layouts(args, args.nodes, cluster) if args.mesh else None
        planned = plan(args.model, args.nodes, cluster, a, args.seq, layouts, args.gbs)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    impossible = "" if args.mesh else structural_summary(planned)
    if not args.mesh:  # summarised in one line; a layout asked for by --mesh keeps its reason in the list
        planned = [p for p in planned if not p.structural]
    grouped = args.gbs is None and not args.mesh and not args.all
    ok, rejected = (([p for p in planned if p.fits], [p for p in planned if not p.fits and not p.unprobed])
                    if args.all or args.mesh else best_per_mesh(planned))
    if grouped:  # one ranking per global batch: a larger batch is not a faster layout
        ok = best_per_gbs(planned)
    # layouts DeepSpeed does not run: no DeepSpeed figure ranks them; listed after the ranked ones until JAX judges
    jax_rows = (sorted((p for p in planned if p.unprobed), key=lambda p: -p.step.sps)  # type: ignore[union-attr]
                if args.all or args.mesh else unprobed_per_mesh(planned, top=3 if grouped else None))
    if args.jax:
        for p in ok[: args.jax_top] + ([p for p in rejected if p.memory][:1] if args.mesh else []):
            print(f"JAX AOT compile {p.layout.label} ({p.layout.variant}) on {p.layout.ngpu} fake CPU devices ...",
                  file=sys.stderr)
            p.jax = jax_memory(args.model, p.layout, args.seq)
        for p in jax_rows[: args.jax_top]:
            print(f"JAX AOT compile {p.layout.label} ({p.layout.variant}) on {p.layout.ngpu} fake CPU devices "
                  "(DeepSpeed does not run it) ...", file=sys.stderr)
            p.judge_jax(jax_memory(args.model, p.layout, args.seq), cluster.usable_bytes, a.mem_err_jax)
        rejected += [p for p in jax_rows if p.reason]  # JAX's verdict: OOM, uncertain or not compiled
        jax_rows = [p for p in jax_rows if not p.reason]
    title = (f"{args.model} on {args.nodes} x {cluster.name} nodes ({args.nodes * cluster.tiles_per_node} tiles), "
             f"seq {args.seq}, " + (f"GBS {args.gbs}" if args.gbs else "best 3 layouts per GBS"))
    rows = plan_rows(ok, per_gbs=grouped, jax_only=jax_rows)
    uncertain = [p for p in rejected if p.uncertain]  # within the memory model's error: neither picks nor rejections
    rejected = [p for p in rejected if not p.uncertain]
    unc_rows = [[p.layout.family, p.layout.label, p.layout.variant, str(p.layout.gbs), p.reason] for p in uncertain]
    rej_rows = [[p.layout.family, p.layout.label, p.layout.variant, str(p.layout.gbs), p.reason] for p in rejected]
    rej_head = ("family", "layout", "variant", "GBS", "reason")
    notes = ["Memory: DeepSpeed = analytic model of the reference; JAX = XLA:CPU memory_analysis of the AOT-compiled "
             "step on fake CPU devices (a CPU-compiler estimate, not the Intel GPU compiler's; JAX keeps fp32 params).",
             "TFLOPS/tile: Megatron-LM model FLOPs (no recompute term). Fitted: "
             + ", ".join(f"{k}={getattr(a, k):.3f}" for k in Assumptions.FITTED)] + ([impossible] if impossible else [])
    if jax_rows:
        notes.append(jax_only_note(jax_rows))
    shown_n = 40 if grouped else 25  # the terminal's share; the Markdown and JSON hold every row
    _print_rich(title, PLAN_HEAD, plan_rows(ok[:shown_n], per_gbs=grouped, jax_only=jax_rows[:shown_n]), notes)
    if unc_rows:
        _print_rich("uncertain: the memory verdict is within the model's error (not picks)",
                    rej_head, unc_rows[:30])
    _print_rich("rejected (could be built; do not fit)", rej_head, rej_rows[:30])
    args.out.mkdir(parents=True, exist_ok=True)
    md = [f"# Layout plan: {title}\n", _md_table(PLAN_HEAD, rows),
          "\n## Uncertain (memory verdict within the model's error; not picks)\n",
          _md_table(rej_head, unc_rows), "\n## Rejected\n",
          _md_table(rej_head, rej_rows), "\n" + "\n\n".join(notes) + "\n"]
    if ok:
        md += [f"\n## Breakdown of #1: {ok[0].layout.label} ({ok[0].layout.variant})\n", memory_breakdown(ok[0]),
               "\n", time_breakdown(ok[0])]
    md += ["\n## Assumptions\n", assumptions_md(a, cluster, fit)]
    stem = f"plan_{args.model}_{args.nodes}n_{cluster.name}" + (f"_gbs{args.gbs}" if args.gbs else "")
    (args.out / f"{stem}.md").write_text("".join(md))
    (args.out / f"{stem}.json").write_text(json.dumps({
        "model": args.model, "nodes": args.nodes, "gbs": args.gbs, "seq": args.seq,
        "cluster": dataclasses.asdict(cluster), "impossible": impossible,
        "assumptions": dataclasses.asdict(a),
        "ranked": [_ranked_json(p) for p in ok],
        "jax_only": [_ranked_json(p) for p in jax_rows],
        "uncertain": [{"layout": p.layout.label, "variant": p.layout.variant, "gbs": p.layout.gbs,
                       "runs_on": p.runs_on, "reason": p.reason} for p in uncertain],
        "rejected": [{"layout": p.layout.label, "variant": p.layout.variant, "gbs": p.layout.gbs,
                      "runs_on": p.runs_on, "reason": p.reason} for p in rejected],
    }, indent=1, default=str) + "\n")
    # grouped: the best of each GBS, so the plot reaches the large batches
    shown = [p for i, p in enumerate(ok) if not grouped or i == 0 or ok[i - 1].layout.gbs != p.layout.gbs]
    png = plot_plan(shown, uncertain + rejected, cluster, args.out / f"{stem}.png",
                    title.replace("best 3 layouts per GBS", "best layout per GBS") if grouped else title)
    if ok:
        print(memory_breakdown(ok[0]))
        print(time_breakdown(ok[0]))
    elif not rejected and not uncertain and not jax_rows:
        print("error: no layout to plan", file=sys.stderr)
        return 2
    print(f"wrote {args.out / (stem + '.md')}, {stem}.json, {png.name}")
    return 0


def _ranked_json(p: Planned) -> dict[str, Any]:
    """A listed layout in the JSON output; a JAX-only one says why it has no DeepSpeed figure."""
    d: dict[str, Any] = {
        "layout": p.layout.label, "variant": p.layout.variant, "gbs": p.layout.gbs, "runs_on": p.runs_on,
        "ds_mem_gb": p.memory.total / GB if p.memory else None,
        "memory_verdict": p.memory.verdict() if p.memory else None, "sps": p.step.sps if p.step else None,
        "tflops": tflops_per_tile(p.step, p.layout) if p.step else None, "jax": p.jax}
    if p.jax_only:
        d["ds_memory"] = f"not run by DeepSpeed: {p.ds_refusal}"
        v = p.jax_judged
        d["memory_verdict"] = ("not probed (--jax)" if v is None else
                               f"JAX compiled peak {v['jax_peak_gb']:.1f} GB: {v['jax_verdict']} with "
                               f"{v['jax_margin_gb']:+.1f} GB margin, error ±{v['jax_err_gb']:.1f} GB")
    return d


def _main_validate(args: argparse.Namespace, cluster: Cluster, a: Assumptions) -> int:
    rows, fit, fitted = validate(cluster, a)
    notes = ["fitted: " + ", ".join(f"{k}={v:.3f}" for k, v in fit.params.items()),
             f"per-row |err| max {fit.max_err:.1%}; leave-one-out |err| mean {fit.loo_mean:.1%}, max {fit.loo_max:.1%}",
             f"memory model error ±{fitted.mem_err_states:.0%} of model states and buckets, ±{fitted.mem_err_act:.0%} "
             "of activations (benchmarks/ds_memory_check.py)",
             "ZeRO-3+hpZ fixed per-step part against DP (study rows at GAS 1, then the model):",
             *(f"  {ln}" for ln in zero3_trend(load_reference(DEFAULT_REFERENCE), cluster, fitted))]
    _print_rich("planner vs the study (reference CSV)", VALID_HEAD, rows, notes)
    checks = ranking_check(cluster, fitted)
    _print_rich("ranking at a fixed global batch: measured vs planner order", RANK_HEAD, ranking_rows(checks),
                [f"{sum(g['agree'] for g in checks)} of {len(checks)} groups in the same order"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "validation.md").write_text(_validation_md(rows, fit, fitted, cluster))
    png = plot_validation(fit, args.out / "validation.png")
    print(f"wrote {args.out / 'validation.md'}, {png.name}")
    return 0
