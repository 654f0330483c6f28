"""The planner's DeepSpeed memory model against real DeepSpeed runs on CPU (torch_ref, 2 ranks, small sizes).

    .venv/bin/python benchmarks/ds_memory_check.py [--json out.json] [--only zero1,pp2-gas]

Each case is a pair of ``torch_ref.train`` runs (2 steps, bf16, 2 ranks on gloo) that differ in one thing, so
the interpreter + torch + DeepSpeed baseline and the runtime cancel: the change in
peak RSS (max over ranks, ``peak_mem_bytes`` of metrics.jsonl) is compared with the change in the planner's
``compare.plan.ds_memory`` total for the same two configs (at these sizes a communication bucket holds all of
the rank's parameters, so it grows with them).

* zero1 / zero2 / zero3: 2 vs 10 layers (hidden 512, ffn 1408, vocab 4096, seq 128): the per-layer model states.
* pp2-gas: pipeline=2 ZeRO-1, 10 layers, seq 512, mbs 4, no checkpointing, GAS 1 vs 4: the microbatches a stage
  holds (DeepSpeed's 1F1B: stage 0 holds min(2, GAS); GPipe would hold GAS).

The peak is that of the training steps (``TORCH_REF_PEAK_FROM_STEPS=1``: torch_ref.train resets the high-water
mark after the engine is built); ``--with-construction`` keeps the whole run's, the engine's construction
included, which the planner does not model. Peak
RSS also counts allocator caching; the error is that of the model and of the measurement together. One run
takes ~1 minute on 2 shared cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compare import plan  # noqa: E402
from compare.cluster import load_cluster  # noqa: E402

BASE = {"hidden": 512, "n_heads": 8, "n_kv_heads": 4, "ffn_hidden": 1408, "vocab_size": 4096}
# name -> (layout kwargs, seq, [(overrides of run a), (overrides of run b)])
CASES = {
    "zero1": (dict(data=2, zero=1), 128, [{"n_layers": 2}, {"n_layers": 10}]),
    "zero2": (dict(data=2, zero=2), 128, [{"n_layers": 2}, {"n_layers": 10}]),
    "zero3": (dict(fsdp=2, zero=3), 128, [{"n_layers": 2}, {"n_layers": 10}]),
    "pp2-gas": (dict(pp=2, zero=1, mbs=4), 512, [{"n_layers": 10, "gas": 1}, {"n_layers": 10, "gas": 4}]),
}


def _preset(tmp: Path, name: str, layers: int) -> Path:
    p = tmp / f"{name}.toml"
    lines = ["[model]", f'name = "{name}"', f"n_layers = {layers}", *(f"{k} = {v}" for k, v in BASE.items()),
             "[data]", 'source = "synthetic"', "[train]", 'dtype = "bf16"']
    p.write_text("\n".join(lines) + "\n")
    return p


def run_case(name: str, tmp: Path, from_steps: bool = True) -> dict:
    lay_kw, seq, variants = CASES[name]
    cluster, a = load_cluster("aurora"), plan.Assumptions()
    out = {"case": name, "runs": []}
    for i, v in enumerate(variants):
        gas = v.get("gas", 1)
        preset = _preset(tmp, f"m{name.replace('-', '')}{i}", v["n_layers"])
        lay = plan.Layout(name, gas=gas, remat=False, **lay_kw)
        mesh = lay.mesh
        argv = [sys.executable, "-m", "torch_ref.train", "--preset", str(preset), "--mesh", mesh, "--zero",
                str(lay.zero), "--mbs", str(lay.mbs), "--gas", str(gas), "--steps", "2", "--dtype", "bf16",
                "--init", "torch", "--wandb", "disabled", "--quiet", "--out-dir", str(tmp / "runs"),
                "--name", f"{name}-{i}", f"--data.seq_len={seq}", "--parallel.remat=false"]
        env = dict(os.environ, TORCH_REF_PEAK_FROM_STEPS="1" if from_steps else "0")
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{name}: {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
        rows = [json.loads(x) for x in (tmp / "runs" / f"{name}-{i}" / "metrics.jsonl").read_text().splitlines()]
        measured = max(r["peak_mem_bytes"] for r in rows)
        model = plan.ds_memory(str(preset), lay, cluster, a, seq).total
        out["runs"].append({"variant": v, "measured_peak_bytes": measured, "model_bytes": model})
    (r0, r1) = out["runs"]
    out["measured_delta"] = r1["measured_peak_bytes"] - r0["measured_peak_bytes"]
    out["model_delta"] = r1["model_bytes"] - r0["model_bytes"]
    out["error"] = out["model_delta"] / out["measured_delta"] - 1 if out["measured_delta"] else None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", help="comma-separated cases: " + ",".join(CASES))
    ap.add_argument("--with-construction", action="store_true",
                    help="peak RSS over the whole run (engine construction included), not the training steps only")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"error: unknown case(s) {unknown}; known: {', '.join(CASES)}", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory() as d:
        for n in names:
            r = run_case(n, Path(d), from_steps=not args.with_construction)
            results.append(r)
            print(f"{n:<8} measured +{r['measured_delta'] / 2**20:7.1f} MiB  model +{r['model_delta'] / 2**20:7.1f} MiB"
                  f"  error {r['error']:+.1%}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
