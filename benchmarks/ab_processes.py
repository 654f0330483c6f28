"""A/B of two source trees on the multi-process pipeline step: each stage in its own process, over gloo.

    python benchmarks/ab_processes.py --a /tmp/before --b .                  # pp2 fp32, head last, 3 rounds
    python benchmarks/ab_processes.py --a /tmp/before --b . --dtype bf16 --set jax.pipeline_repeats=2
    python benchmarks/ab_processes.py --a . --b . --set-b jax.pipeline_head=split   # one tree, two settings

``benchmarks/ab_step.py`` compares variants inside one process; a pipeline whose stages run as separate
processes (how ``compare.report`` runs ``pp2-zero1``) needs separate processes per variant. Each round runs
A then B with ``compare.report.execute``: ``--processes`` trainer processes (``python -m jax_impl.train`` of
that tree, ``jax.distributed`` over gloo), all waited for, a failed one stopping the others. Per round it
prints each tree's median step time after 2 warm-up steps (the report's figure) and B/A. Make tree A with e.g.
``git worktree add /tmp/before HEAD~1``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compare import report
from configs import load_config


def run_variant(tree: Path, name: str, args: argparse.Namespace, out: Path,
                extra: list[str] = ()) -> tuple[float, float, float]:
    """Median step ms, last loss and peak RSS MiB (the largest process's) of one multi-process run of ``tree``
    (``extra``: this variant's own SECTION.KEY=VALUE settings, after ``--set``)."""
    cfg = load_config(args.preset, {
        "parallel.mesh": args.mesh, "parallel.zero": 1, "parallel.gas": args.gas, "jax.pipeline_head": "last",
        **dict(kv.split("=", 1) for kv in [*args.set, *extra]), "train.dtype": args.dtype, "train.steps": args.steps,
        "train.wandb": "disabled", "train.out_dir": str(out), "train.name": name})
    report.execute("jax", cfg, out / f"{name}.log", args.timeout, args.processes, root=tree)
    run = report.load_run(out / name)
    tp = report.throughput(run)
    return tp["step_time_s"] * 1e3, run.metrics[-1]["loss"], (tp["peak_rss_bytes"] or 0) / 2**20


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="source tree A (the project root of the baseline)")
    ap.add_argument("--b", required=True, help="source tree B")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--mesh", default="pipeline=2,data=1")
    ap.add_argument("--gas", type=int, default=4)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run")
    ap.add_argument("--set", action="append", default=[], help="extra SECTION.KEY=VALUE (repeatable)")
    ap.add_argument("--set-a", action="append", default=[], help="SECTION.KEY=VALUE for A only (repeatable)")
    ap.add_argument("--set-b", action="append", default=[], help="SECTION.KEY=VALUE for B only (repeatable)")
    args = ap.parse_args(argv)
    trees = [Path(t).resolve() for t in (args.a, args.b)]
    for tree in trees:
        if not ((tree / "jax_impl" / "pipeline.py").is_file() or (tree / "jax_impl" / "pipeline").is_dir()):
            ap.error(f"--a/--b {str(tree)!r} is not a project tree (no jax_impl/pipeline); make one with "
                     "`git worktree add DIR REV`")
    for flag, settings in (("--set", args.set), ("--set-a", args.set_a), ("--set-b", args.set_b)):
        for kv in settings:
            if kv.split(".", 1)[0] not in report.ARGV_SECTIONS or "=" not in kv:
                ap.error(f"{flag} {kv!r}: only SECTION.KEY=VALUE settings of {', '.join(report.ARGV_SECTIONS)} "
                         "reach the trainers (compare.report.trainer_argv)")
    print(f"{args.mesh} {args.dtype} GAS {args.gas}, {args.processes} processes, median of {args.steps - 2} steps")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            (a_ms, a_loss, a_rss), (b_ms, b_loss, b_rss) = (
                run_variant(tree, f"{ab}{r}", args, Path(tmp), extra)
                for ab, tree, extra in zip("ab", trees, (args.set_a, args.set_b), strict=True))
            ratios.append(b_ms / a_ms)
            print(f"round {r + 1}: A {a_ms:7.1f} ms  B {b_ms:7.1f} ms  B/A {b_ms / a_ms:.3f}   "
                  f"(last loss A {a_loss:.6f}, B {b_loss:.6f}; peak RSS A {a_rss:.0f} MiB, B {b_rss:.0f} MiB)",
                  flush=True)
    print(f"B/A median {statistics.median(ratios):.3f}  (< 1: B faster)")


if __name__ == "__main__":
    main()
