"""GAS sweep of the JAX pipeline: measured step time against the bubble model (m + p - 1) / m.

    python benchmarks/bench_pipeline.py                       # pipeline 2 and 4, GAS 1 2 4 8, GPipe
    python benchmarks/bench_pipeline.py --stages 2 --schedule 1f1b --out reports/pp_1f1b.png

A step of m microbatches on p stages takes m + p - 1 ticks (1F1B: 2(m + p - 1) half-ticks), and in
this SPMD pipeline every tick costs about the same -- scanned ticks compute bubbles on placeholder data,
unrolled ones (models of <= 8 layers) skip idle stages but wait for the busy ones -- so the
model predicts step time = t_tick (m + p - 1), i.e. time per microbatch proportional to (m + p - 1) / m.
t_tick is fitted (least squares through the origin) over the sweep. On this project's CPU machines the
p "devices" share a few cores, so absolute numbers say nothing about accelerators; the shape does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--gas", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--mbs", type=int, default=1)
    ap.add_argument("--schedule", choices=("gpipe", "1f1b"), default="gpipe")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--layers", type=int, default=4, help="model.n_layers (a multiple of every stage count)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per point after a warm-up; the best is kept")
    ap.add_argument("--out", default="reports/pipeline_sweep.png")
    ap.add_argument("--json", help="also write the measurements here")
    return ap.parse_args(argv)


def measure(args: argparse.Namespace, p: int, m: int) -> dict:
    import jax

    from aurora_data import SyntheticSource, global_batch
    from configs import load_config
    from jax_impl.sharding import activate, batch_sharding, make_mesh
    from jax_impl.trainer import Trainer

    cfg = load_config(args.preset, {
        "parallel.mesh": f"pipeline={p}", "parallel.zero": 1, "parallel.gas": m, "parallel.mbs": args.mbs,
        "parallel.pipeline_schedule": args.schedule, "model.n_layers": args.layers, "data.seq_len": args.seq,
        "data.source": "synthetic"})
    mesh = make_mesh(cfg.mesh_shape())
    tr = Trainer.build(cfg, mesh)
    params, opt = tr.init_state()
    t0 = time.perf_counter()
    step = tr.compile_step()
    compile_s = time.perf_counter() - t0
    src = SyntheticSource(cfg.model.vocab_size, cfg.data.seq_len)
    times = []
    with activate(mesh):
        for i in range(args.steps + 1):
            batch = jax.device_put(global_batch(src, i * m * args.mbs, args.mbs, m, 1), batch_sharding(mesh))
            t = time.perf_counter()
            params, opt, metrics = step(params, opt, batch)
            float(metrics["loss"])  # waits for the step
            if i:  # the first call also pays for the transfers and allocation
                times.append(time.perf_counter() - t)
    # best of the timed steps: on a shared CPU machine other processes only ever add time
    return {"stages": p, "gas": m, "step_s": min(times), "median_s": statistics.median(times), "all_s": times,
            "compile_s": compile_s,
            "ticks": m + p - 1, "temp_bytes": step.memory_analysis().temp_size_in_bytes}


def fit(rows: list[dict]) -> dict[int, float]:
    """t_tick per stage count: least squares of step_s = t_tick * (m + p - 1) through the origin."""
    out = {}
    for p in {r["stages"] for r in rows}:
        rs = [r for r in rows if r["stages"] == p]
        out[p] = sum(r["step_s"] * r["ticks"] for r in rs) / sum(r["ticks"] ** 2 for r in rs)
    return out


def plot(rows: list[dict], t_tick: dict[int, float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for p, color in zip(sorted(t_tick), ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=False):
        rs = sorted((r for r in rows if r["stages"] == p), key=lambda r: r["gas"])
        gas = [r["gas"] for r in rs]
        ax.plot(gas, [r["step_s"] / r["gas"] for r in rs], "o-", color=color, label=f"measured, pipeline={p}")
        ax.plot(gas, [t_tick[p] * (m + p - 1) / m for m in gas], "--", color=color,
                label=f"ideal t_tick (m+{p}-1)/m, t_tick={t_tick[p] * 1e3:.0f} ms")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("GAS = microbatches per step (m)")
    ax.set_ylabel("step time per microbatch (s)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_num_cpu_devices", max(args.stages))
    rows = []
    for p in args.stages:
        for m in args.gas:
            if args.schedule == "1f1b" and m < p:
                print(f"pipeline={p} gas={m}: skipped (1F1B needs gas >= stages)")
                continue
            r = measure(args, p, m)
            rows.append(r)
            print(f"pipeline={p} gas={m:>2}: step {r['step_s'] * 1e3:8.1f} ms | "
                  f"{r['step_s'] / m * 1e3:7.1f} ms/microbatch | compile {r['compile_s']:.1f}s | "
                  f"temp {r['temp_bytes'] / 2**20:.1f} MiB", flush=True)
    t_tick = fit(rows)
    print(f"\n{'p':>2} {'m':>3} {'measured s':>11} {'model s':>9} {'(m+p-1)/m':>10} {'measured/m per t_tick':>22}")
    for r in rows:
        p, m = r["stages"], r["gas"]
        print(f"{p:>2} {m:>3} {r['step_s']:>11.3f} {t_tick[p] * (m + p - 1):>9.3f} {(m + p - 1) / m:>10.3f} "
              f"{r['step_s'] / m / t_tick[p]:>22.3f}")
    title = (f"{args.schedule} pipeline, {args.preset} preset ({args.layers} layers, seq {args.seq}), "
             f"MBS {args.mbs}, CPU")
    plot(rows, t_tick, ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out), title)
    print(f"\nplot: {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "t_tick": t_tick}, indent=1))
    return rows


if __name__ == "__main__":
    from runtime.hostmem import reexec_with_allocator

    reexec_with_allocator()  # the trainers' host allocator (runtime/hostmem.py)
    main()
