"""JAX vs DeepSpeed over a long run on real text: training and validation loss, fp32 and bf16.

    python benchmarks/convergence.py                                    # small preset, 2000 steps, seeds 0,1,2
    python benchmarks/convergence.py --preset tiny --steps 200 --seeds 0,1 --out /tmp/conv

Both trainers run the ZeRO-1 layout on 2 devices/ranks (``compare.report``'s ``zero1``) from the same
initial weights (``--init jax``) and the same token stream: the built-in standard-library corpus as Megatron
indexed data, with the validation loss every ``--eval-interval`` steps on its valid split.

- fp32 (first seed): the first step where the two training losses differ by more than 1e-4 relative, and
  the final differences of the training and validation losses.
- bf16 (every seed): the framework gap, mean |Δloss| over the last 10 % of steps between JAX and DeepSpeed
  at each seed both ran (averaged over them), beside each trainer's seed-to-seed spread (the same statistic
  between its own runs at different seeds). The gap should fall inside the spread: bf16 rounding then matters
  less than the seed.

Runs are reused when a run directory with the same config exists (``--rerun`` to redo them). It writes
``results.json``, ``README.md`` and the plots to ``--out``, and prints the figures and the wall time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compare import report  # noqa: E402
from configs import Config, load_config  # noqa: E402

DIVERGE_REL = 1e-4


def run_cfg(preset: str, dtype: str, seed: int, steps: int, evals: tuple[int, int], runs: Path, fw: str) -> Config:
    return load_config(preset, {
        **report.LAYOUTS["zero1"].overrides(), "data.source": "indexed", "train.seed": seed,
        "train.dtype": dtype, "train.steps": steps, "train.eval_interval": evals[0], "train.eval_iters": evals[1],
        "train.wandb": "disabled", "train.out_dir": str(runs), "train.name": f"{dtype}-s{seed}-{fw}",
    })


def curves(run_dir: Path) -> dict[str, list]:
    rows = report.load_run(run_dir).metrics
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    return {"loss": [r["loss"] for r in rows], "val_steps": [s for s, _ in val], "val": [v for _, v in val]}


def first_divergence(a: list[float], b: list[float], rel: float = DIVERGE_REL) -> int | None:
    """The first step (1-based) where |a - b| / |b| exceeds ``rel``; None if never."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True), 1) if abs(x - y) > rel * abs(y)), None)


def tail_gap(a: list[float], b: list[float], frac: float = 0.1) -> float:
    """Mean |a - b| over the last ``frac`` of the steps (at least one)."""
    n = max(1, round(len(a) * frac))
    return statistics.fmean(abs(x - y) for x, y in zip(a[-n:], b[-n:], strict=True))


def fp32_summary(j: dict[str, list], t: dict[str, list]) -> dict[str, Any]:
    return {
        "first_step_over_1e-4": first_divergence(j["loss"], t["loss"]),
        "final_loss_jax": j["loss"][-1], "final_loss_torch": t["loss"][-1],
        "final_rel": abs(j["loss"][-1] - t["loss"][-1]) / abs(t["loss"][-1]),
        "final_val_rel": abs(j["val"][-1] - t["val"][-1]) / abs(t["val"][-1]) if j["val"] else None,
        "max_val_rel": max((abs(a - b) / abs(b) for a, b in zip(j["val"], t["val"], strict=True)), default=None),
    }


def bf16_summary(by_seed: dict[int, dict[str, dict[str, list]]]) -> dict[str, Any]:
    """The framework gap at every seed both trainers ran (and its mean) beside each trainer's seed spread.

    Both are means of the same statistic between two runs, so the mean gap is compared with the spread; it is
    judged inside when it is no larger than the smaller of the spreads that exist."""
    seeds = sorted(by_seed)
    spread: dict[str, float | None] = {}
    for fw in ("jax", "torch"):
        ran = [s for s in seeds if fw in by_seed[s]]
        spread[fw] = statistics.fmean(tail_gap(by_seed[a][fw]["loss"], by_seed[b][fw]["loss"])
                                      for a, b in itertools.combinations(ran, 2)) if len(ran) > 1 else None
    both = [s for s in seeds if {"jax", "torch"} <= by_seed[s].keys()]
    gaps = {s: tail_gap(by_seed[s]["jax"]["loss"], by_seed[s]["torch"]["loss"]) for s in both}
    val_gaps = [tail_gap(by_seed[s]["jax"]["val"], by_seed[s]["torch"]["val"], frac=0.25)
                for s in both if by_seed[s]["jax"]["val"]]
    gap = statistics.fmean(gaps.values())
    known = [v for v in spread.values() if v is not None]
    inside = gap <= min(known) if known else None
    return {"seeds": seeds, "gap_seeds": both, "gap_by_seed": gaps, "gap_last10pct": gap,
            "val_gap_last25pct": statistics.fmean(val_gaps) if val_gaps else None,
            "seed_spread_last10pct": spread, "gap_inside_spread": inside}


def plot(data: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for dtype, runs in data["curves"].items():
        seed = min(int(s) for s in runs)
        j, t = runs[str(seed)]["jax"], runs[str(seed)]["torch"]
        fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
        steps = range(1, len(j["loss"]) + 1)
        a.plot(steps, t["loss"], lw=2.5, alpha=0.45, label="DeepSpeed train")
        a.plot(steps, j["loss"], lw=1, label="JAX train")
        if j["val"]:
            a.plot(t["val_steps"], t["val"], "o", ms=7, alpha=0.45, label="DeepSpeed val")
            a.plot(j["val_steps"], j["val"], "x", ms=6, label="JAX val")
        for s, other in runs.items():
            if int(s) != seed:
                a.plot(steps, other["jax"]["loss"], lw=0.6, alpha=0.5, label=f"JAX train, seed {s}")
        a.set_ylabel("loss")
        a.set_title(f"{data['preset']} preset, {dtype}, ZeRO-1 on 2 devices/ranks, seed {seed}", fontsize=10)
        a.legend(fontsize=7)
        diff = [max(abs(x - y), 1e-9) for x, y in zip(j["loss"], t["loss"], strict=True)]
        b.semilogy(steps, diff, lw=0.8, label="|JAX − DeepSpeed| train")
        if j["val"]:
            b.semilogy(j["val_steps"], [max(abs(x - y), 1e-9) for x, y in zip(j["val"], t["val"], strict=True)],
                       "o-", ms=3, label="|JAX − DeepSpeed| val")
        b.set_xlabel("step")
        b.set_ylabel("|Δloss|")
        b.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / f"convergence_{dtype}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _fmt(spread: float | None) -> str:
    return "— (one seed)" if spread is None else f"{spread:.4f}"


def render(data: dict[str, Any], argv: list[str]) -> str:
    lines = [f"# JAX vs DeepSpeed convergence: {data['preset']} preset, {data['steps']} steps", "",
             f"Measured {data['date']} on {data['machine']}; commit {data['commit']}; wall time "
             f"{data['wall_s'] / 60:.1f} min.", "",
             f"    python benchmarks/convergence.py {' '.join(argv)}", ""]
    if "fp32" in data["summary"]:
        f = data["summary"]["fp32"]
        lines += ["## fp32", "",
                  f"- first step where the training losses differ by more than 1e-4 relative: "
                  f"{f['first_step_over_1e-4'] or 'none'}",
                  f"- final training loss: JAX {f['final_loss_jax']:.6f}, DeepSpeed {f['final_loss_torch']:.6f} "
                  f"(relative difference {f['final_rel']:.1e})"]
        if f["final_val_rel"] is not None:
            lines.append(f"- validation loss: final relative difference {f['final_val_rel']:.1e}, largest "
                         f"{f['max_val_rel']:.1e}")
        lines.append("")
    if "bf16" in data["summary"]:
        b = data["summary"]["bf16"]
        sp = b["seed_spread_last10pct"]
        lines += ["## bf16", "",
                  f"- framework gap (mean |Δloss|, last 10 % of steps), mean over seeds "
                  f"{', '.join(map(str, b['gap_seeds']))}: {b['gap_last10pct']:.4f} (by seed: "
                  + ", ".join(f"{g:.4f}" for g in b["gap_by_seed"].values()) + ")",
                  f"- seed-to-seed spread (seeds {', '.join(map(str, b['seeds']))}): JAX {_fmt(sp['jax'])}, "
                  f"DeepSpeed {_fmt(sp['torch'])}",
                  f"- gap inside the spread: {b['gap_inside_spread']}", ""]
    lines += [f"![{d}](convergence_{d}.png)" for d in data["curves"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeds", default="0,1,2", help="bf16 runs every seed; fp32 the first")
    ap.add_argument("--torch-seeds", type=int, help="bf16: DeepSpeed runs only the first N seeds (default: all); "
                    "the gap is then checked against JAX's seed spread")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--eval-interval", type=int, help="default: steps / 20")
    ap.add_argument("--eval-iters", type=int, default=4)
    ap.add_argument("--runs", default="runs/convergence")
    ap.add_argument("--out", default="reports/convergence")
    ap.add_argument("--timeout", type=int, default=24 * 3600, help="seconds per trainer run")
    ap.add_argument("--rerun", action="store_true")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not seeds or any(d not in ("fp32", "bf16") for d in dtypes) or args.steps < 1:
        ap.error(f"need seeds, dtypes from fp32,bf16 and steps >= 1 (got {args.seeds!r}, {args.dtypes!r}, "
                 f"{args.steps})")
    evals = (args.eval_interval or max(1, args.steps // 20), args.eval_iters)
    runs, out = Path(args.runs), Path(args.out)
    runs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data: dict[str, Any] = {"preset": args.preset, "steps": args.steps, "evals": evals, "curves": {}, "summary": {},
                            "run_s": {}}
    for dtype in dtypes:
        by_seed: dict[int, dict[str, dict[str, list]]] = {}
        for i, seed in enumerate(seeds if dtype == "bf16" else seeds[:1]):
            for fw in ("jax", "torch") if args.torch_seeds is None or i < args.torch_seeds else ("jax",):
                cfg = run_cfg(args.preset, dtype, seed, args.steps, evals, runs, fw)
                run_dir = runs / cfg.train.name
                if args.rerun or not report.reusable(run_dir, cfg):
                    print(f"[{time.strftime('%H:%M:%S')}] {cfg.train.name}: running", flush=True)
                    t = time.perf_counter()
                    report.execute(fw, cfg, runs / f"{cfg.train.name}.log", args.timeout)
                    data["run_s"][cfg.train.name] = time.perf_counter() - t
                    print(f"[{time.strftime('%H:%M:%S')}] {cfg.train.name}: done in "
                          f"{data['run_s'][cfg.train.name]:.0f}s", flush=True)
                by_seed.setdefault(seed, {})[fw] = curves(run_dir)
        data["curves"][dtype] = {str(s): v for s, v in by_seed.items()}
        first = by_seed[seeds[0]]
        data["summary"][dtype] = fp32_summary(first["jax"], first["torch"]) if dtype == "fp32" else \
            bf16_summary(by_seed)
    data["wall_s"] = time.perf_counter() - t0
    data["date"] = time.strftime("%Y-%m-%d")
    data["machine"] = f"{report.host_cpu()}, {platform.system()}"
    data["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip() or "unknown"
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    plot(data, out)
    (out / "README.md").write_text(render(data, sys.argv[1:] if argv is None else argv))
    print(json.dumps(data["summary"], indent=1))
    print(f"wrote {out / 'README.md'}; wall time {data['wall_s'] / 60:.1f} min")
    return data


if __name__ == "__main__":
    main()
