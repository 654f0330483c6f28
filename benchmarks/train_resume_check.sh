#!/usr/bin/env bash
# The real trainer CLI end to end on one device: 30 steps with a checkpoint at 20, then a resume from step 20;
# prints whether steps 21-30 repeat bit for bit, and the run's step time. Used on one GPU (gpu-1b preset):
#   bash benchmarks/train_resume_check.sh            RUNS=/tmp/r PRESET=tiny bash benchmarks/train_resume_check.sh
set -euo pipefail
R=${RUNS:-/tmp/r}; P=${PRESET:-gpu-1b}; extra="$*"  # more CLI arguments, given to both runs
python3 -m jax_impl.train --preset $P --steps 30 --wandb disabled --name full --out-dir $R --ckpt-every 20 --quiet $extra
rm -rf $R/full/checkpoints/30
python3 -m jax_impl.train --preset $P --steps 30 --wandb disabled --name resumed --out-dir $R --resume $R/full/checkpoints --quiet $extra
python3 - "$R" <<'PY'
import json, sys, statistics
r = sys.argv[1]
load = lambda n: {m["step"]: m for m in map(json.loads, open(f"{r}/{n}/metrics.jsonl"))}
a, b = load("full"), load("resumed")
common = sorted(set(a) & set(b))
same = [s for s in common if a[s]["loss"] == b[s]["loss"]]
print("resumed steps", common, "bit-identical losses:", len(same), "of", len(common))
t = statistics.median(a[s]["step_time_s"] for s in a if s > 3)
print("full run: loss", a[1]["loss"], "->", a[max(a)]["loss"], f"median step {1e3*t:.1f} ms", "tflops/dev", round(statistics.median(a[s]["tflops_per_device"] for s in a if s > 3), 1), "peak GiB", round(max(m.get("peak_mem_bytes") or 0 for m in a.values())/2**30, 1))
print("meta", {k: v for k, v in json.load(open(f"{r}/full/meta.json")).items() if k in ("platform", "devices", "device_kind", "jax")})
PY
