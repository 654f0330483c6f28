"""Several one-GPU benchmark variants, each in its own process, and one table: for a short time on a GPU.

    python benchmarks/gpu_sweep.py [--out-dir DIR] [--steps 10] [--variants jax,jax:mm=fp32,torch,...]

Each variant runs ``bench_gpu.py --only <section>`` in a fresh process (so JAX's and torch's allocators
never share the card) and writes its JSON to ``DIR/<name>.json``. The table at the end gives, per variant,
step time, model TFLOP/s, MFU against the card's dense bf16 peak, the fraction of that process's own
bf16 matmul rate, compile time and peak memory, and every JAX variant's speed relative to torch eager and
torch.compile measured in the same sweep. A variant that fails shows its error and the rest still run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (bench_gpu section, config overrides, extra XLA flags)
VARIANTS: dict[str, tuple[str, list[str], str]] = {
    "jax": ("jax", [], ""),
    "jax:mm=fp32": ("jax", ["jax.matmul_out=fp32"], ""),
    "torch": ("torch", [], ""),
    "torch.compile": ("torch.compile", [], ""),
    "jax:scan": ("jax", ["jax.scan_unroll=1"], ""),
    "jax:no-triton-gemm": ("jax", [], "--xla_gpu_enable_triton_gemm=false"),
}


def run_variant(name: str, args: argparse.Namespace, out_dir: Path) -> dict:
    section, sets, flags = VARIANTS[name]
    out = out_dir / (name.replace(":", "_").replace("=", "-") + ".json")
    cmd = [sys.executable, str(HERE / "bench_gpu.py"), "--preset", args.preset, "--only", section,
           "--steps", str(args.steps), "--out", str(out)] + [f"--set={s}" for s in sets]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
    t = time.perf_counter()
    print(f"== {name}: {' '.join(cmd[1:])}" + (f"  XLA_FLAGS={env['XLA_FLAGS']}" if flags else ""), flush=True)
    proc = subprocess.run(cmd, env=env, timeout=args.timeout)
    wall = time.perf_counter() - t
    if proc.returncode or not out.exists():
        return {"error": f"exit {proc.returncode} after {wall:.0f} s"}
    res = json.loads(out.read_text())
    r = res.get(section, {})
    r["wall_s"] = wall
    r["device"] = res.get("device")
    return r


def table(results: dict[str, dict]) -> str:
    rows = ["| variant | step ms | model TFLOP/s | MFU (peak) | vs matmul | compile s | peak GiB | vs torch | "
            "vs torch.compile |", "|---|---|---|---|---|---|---|---|---|"]
    base = {k: results.get(k, {}).get("step_s") for k in ("torch", "torch.compile")}
    for name, r in results.items():
        if "step_s" not in r:
            rows.append(f"| {name} | {r.get('error', '?')[:80]} |||||||")
            continue
        rel = [f"{base[k] / r['step_s']:.2f}×" if base[k] and name.startswith("jax") else "" for k in base]
        mfu = f"{100 * r['mfu_vs_peak']:.1f} %" if r.get("mfu_vs_peak") else "?"
        comp = f"{r['compile_s']:.1f}" if r.get("compile_s") else "—"
        peak = f"{r['peak_bytes'] / 2**30:.1f}" if r.get("peak_bytes") else "?"
        mm = f"{100 * r['mfu_vs_matmul']:.1f} % ({r['matmul_tflops']:.0f})"
        rows.append(f"| {name} | {1e3 * r['step_s']:.0f} | {r['model_tflops']:.0f} | {mfu} | {mm} | {comp} | {peak} | "
                    f"{rel[0]} | {rel[1]} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpu-1b")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list from: {', '.join(VARIANTS)}")
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "gpu_sweep"))
    ap.add_argument("--timeout", type=float, default=300, help="seconds per variant")
    args = ap.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for n in names:
        try:
            results[n] = run_variant(n, args, out_dir)
        except subprocess.TimeoutExpired:
            results[n] = {"error": f"timed out after {args.timeout:.0f} s"}
        print(f"   {n}: {json.dumps(results[n], default=str)[:400]}", flush=True)
    text = table(results)
    (out_dir / "sweep.md").write_text(text + "\n")
    print(text, flush=True)
    return results


if __name__ == "__main__":
    main()
