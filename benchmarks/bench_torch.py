"""Throughput of the torch/DeepSpeed reference on the ``bench`` preset, every layout that runs on 2 ranks.

    .venv/bin/python benchmarks/bench_torch.py [--steps 10] [--layouts zero1,pp2+zero1] [--json out.json]

Per layout: median tokens/s/device and TFLOPS/device over the steps after the first two
(warm-up), peak RSS (max over ranks), and the start-up split into DeepSpeed's
``init_distributed`` (process group + its shm op) and the engine's construction. CPU, gloo,
one thread per rank; on a shared machine the figures are noisy -- compare within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch_ref import train as torch_train

LAYOUTS: dict[str, list[str]] = {  # label -> flags; world size 2 each
    "zero1": ["--mesh", "data=2", "--zero", "1"],
    "zero2": ["--mesh", "data=2", "--zero", "2"],
    "zero3": ["--mesh", "data=2", "--zero", "3"],
    "zero3+hpz": ["--mesh", "data=1,fsdp=2", "--zero", "3", "--parallel.hpz=true"],
    "pp2+zero1": ["--mesh", "pipeline=2", "--zero", "1", "--gas", "4"],
    "zero1+tp2": ["--mesh", "data=1,tensor=2", "--zero", "1"],
    "zero2+tp2": ["--mesh", "data=1,tensor=2", "--zero", "2"],
    "zero3+mics": ["--mesh", "data=1,fsdp=2", "--zero", "3", "--parallel.mics=true"],
}


def bench(label: str, flags: list[str], steps: int, out_dir: Path) -> dict:
    res = torch_train.main(["--preset", "bench", "--steps", str(steps), "--init", "torch", "--wandb", "disabled",
                            "--quiet", "--out-dir", str(out_dir), "--name", label.replace("+", "_"), *flags])
    rows = res["metrics"][2:] or res["metrics"]
    return {
        "layout": label, "impl": res["layout_impl"], "world_size": res["world_size"],
        "tokens_per_s_per_device": statistics.median(r["tokens_per_s_per_device"] for r in rows),
        "tflops_per_device": statistics.median(r["tflops_per_device"] for r in rows),
        "step_time_s": statistics.median(r["step_time_s"] for r in rows),
        "peak_mem_mib": max(r["peak_mem_bytes"] for r in res["metrics"]) / 2**20,
        "dist_init_s": res["dist_init_s"], "engine_init_s": res["engine_init_s"],
        "final_loss": res["losses"][-1],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated subset of " + ", ".join(LAYOUTS))
    ap.add_argument("--out-dir", help="run directories (default: a temporary directory)")
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args(argv)
    wanted = [s.strip() for s in args.layouts.split(",") if s.strip()]
    unknown = set(wanted) - set(LAYOUTS)
    if unknown:
        ap.error(f"unknown layouts {sorted(unknown)}; choose from {', '.join(LAYOUTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out_dir or tmp)
        results = [bench(label, LAYOUTS[label], args.steps, out) for label in wanted]
    print(f"\nbench preset, {args.steps} steps, 2 ranks x 1 thread (CPU, gloo); medians over steps 3..{args.steps}")
    head = (f"{'layout':<12} {'tok/s/dev':>10} {'TFLOPS/dev':>11} {'step s':>8} {'peak MiB/rank':>14} "
            f"{'dist init s':>12} {'engine init s':>14}  implementation")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['layout']:<12} {r['tokens_per_s_per_device']:>10.0f} {r['tflops_per_device']:>11.4f} "
              f"{r['step_time_s']:>8.3f} {r['peak_mem_mib']:>14.0f} {r['dist_init_s']:>12.1f} "
              f"{r['engine_init_s']:>14.1f}  {r['impl']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    from runtime.hostmem import reexec_with_allocator

    reexec_with_allocator()  # the trainers' host allocator (runtime/hostmem.py)
    main()
