"""``python -m compare.report``: JAX vs DeepSpeed, layout by layout — same loss? which is faster?

For every layout runnable here it runs (or reuses, when a run directory with the same resolved
config exists) ``jax_impl.train`` and ``torch_ref.train`` from the same initial weights (torch
loads the JAX init of the same seed) and the same token stream, then writes into ``--out``:

    report.md     parity and throughput tables (+ the study's table with ``--reference``)
    report.json   every figure
    loss_<dtype>.png, loss_diff_<dtype>.png, throughput_<dtype>.png

Run directories are the interface: ``config.json``, ``meta.json``, ``metrics.jsonl``. Runs whose
model/data/optimizer config differ are never paired; the message names the differing keys.

    python -m compare.report                                   # every layout, fp32 and bf16, 20 steps
    python -m compare.report --layouts zero1,zero3 --dtype fp32 --steps 10 --assert
    python -m compare.report --runs runs/compare --reference compare/data/aurora_reference_runs.csv
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from configs import RUN_OPTION_SECTIONS, Config, ConfigError, Layout, config_from_dict, load_config
from runtime import procgroup
from runtime.hostmem import allocator_env, child_allocator
from runtime.rundir import host_cpu, read_metrics

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = {"jax": "jax_impl.train", "torch": "torch_ref.train"}
# each trainer's interpreter: the two stacks may live in two environments (e.g. .venv-aurora has no torch)
PYTHONS = {"jax": sys.executable, "torch": sys.executable}
PAIRED_SECTIONS = ("model", "data", "optim")
# keys that name where a run lives or how it logs: they never make two runs different
RUN_LOCAL_KEYS = ("train.name", "train.out_dir", "train.wandb", "train.log_every", "train.platform")

# Thresholds on |loss_jax - loss_torch| / |loss_torch|. fp32: the same arithmetic up to summation order.
# bf16: both round activations to 8 bits of mantissa, but not at the same places. The targets were
# fp32 first <= 1e-6, every <= 1e-4 and bf16 every <= 1e-2, last-10 mean <= 0.5 %; these are tighter, set
# 3-6x above the worst case seen over all 8 layouts x 20 steps on tiny (fp32: 8.3e-8 first, 1.75e-7 any
# step; bf16: 6.5e-4 any step, 8.6e-5 last-10 mean).
THRESHOLDS = {
    "fp32": {"first": 5e-7, "every": 1e-6},
    "bf16": {"every": 2e-3, "last10_mean": 5e-4},
}
THRESHOLD_TEXT = {"first": "first step", "every": "every step", "last10_mean": "mean of the last 10 steps"}


@dataclass(frozen=True)
class LayoutSpec:
    name: str
    mesh: str
    zero: int
    extra: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    default: bool = True  # in the default --layouts (the study's layouts); False: a JAX option, run by name
    # JAX processes (multi-controller, gloo between them, the devices split evenly); DeepSpeed always runs
    # one process per rank
    jax_processes: int = 1

    def overrides(self) -> dict[str, Any]:
        return {"parallel.mesh": self.mesh, "parallel.zero": self.zero, **self.extra}

    @property
    def layout(self) -> Layout:
        """Its mesh sizes and ZeRO settings; ``layout.label`` is what both trainers write to meta.json."""
        return Layout.from_spec(self.mesh, zero=self.zero, hpz=bool(self.extra.get("parallel.hpz", False)),
                                mics=bool(self.extra.get("parallel.mics", False)))


# The study's layouts, scaled to 2-4 ranks of this 2-core machine.
LAYOUTS = {spec.name: spec for spec in (
    LayoutSpec("zero1", "data=2", 1, note="optimizer state sharded over DP"),
    LayoutSpec("zero2", "data=2", 2, note="+ gradients sharded"),
    LayoutSpec("zero3", "fsdp=2", 3, note="+ parameters sharded"),
    LayoutSpec("zero3-hpz", "data=2,fsdp=2", 3, {"parallel.hpz": True}, "hpZ: params inside fsdp groups"),
    LayoutSpec("mics", "data=2,fsdp=2", 3, {"parallel.mics": True},
               "torch side: FSDP2 hybrid shard (DeepSpeed >= 0.19.7 has no MiCS)"),
    LayoutSpec("tp2", "data=1,tensor=2", 1, note="tensor parallel 2 + ZeRO-1"),
    LayoutSpec("tp2-zero2", "data=2,tensor=2", 2, note="the 42B layout's shape: TP + ZeRO-2"),
    # a pipeline stage per JAX process, as DeepSpeed's ranks: in one process the two stages' programs share
    # XLA's intra-op thread pool (memory-bound ops 2-3x slower per call; the step 0-15 % slower in alternating
    # runs, docs/performance.md, "Pipeline + ZeRO-1 on CPU"); the head on the last stage, as DeepSpeed's: in two
    # processes the split head is slower (fp32 11 %, bf16 14 %: gloo's small all-reduces) and its peak is higher
    LayoutSpec("pp2-zero1", "pipeline=2,data=1", 1, {"parallel.gas": 4, "jax.pipeline_head": "last"},
               "Pipeline + ZeRO-1, GAS 4; JAX: 2 processes (a stage each), head on the last stage",
               jax_processes=2),
    LayoutSpec("pp2v2-zero1", "pipeline=2,data=1", 1, {"parallel.gas": 4, "jax.pipeline_repeats": 2,
                                                       "jax.pipeline_head": "last"},
               "the same; JAX: circular schedule, 2 rounds of 1 layer per stage (DeepSpeed: its 1F1B, unchanged)",
               default=False, jax_processes=2),
)}


class ReportError(ValueError):
    """A run or an argument the report cannot use; the message says which and why."""


# ----------------------------------------------------------------------------- runs
# validation loss every N steps over M global batches of the valid split (--eval-interval / --eval-iters)
EVAL_INTERVAL, EVAL_ITERS = 5, 2


def run_config(preset: str, layout: LayoutSpec, dtype: str, steps: int, runs_dir: Path, framework: str,
               repeat: int = 1, evals: tuple[int, int] = (EVAL_INTERVAL, EVAL_ITERS)) -> Config:
    """A layout's run config; repeats after the first are the same runs under the names ``...-r2``, ``-r3``."""
    suffix = f"-r{repeat}" if repeat > 1 else ""
    return load_config(preset, {
        **layout.overrides(), "train.eval_interval": evals[0], "train.eval_iters": evals[1],
        "train.dtype": dtype, "train.steps": steps, "train.wandb": "disabled",
        "train.out_dir": str(runs_dir), "train.name": f"{layout.name}-{dtype}-{framework}{suffix}",
    })


def comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config without the keys that only say where a run lives, nor the run options (checkpoints, watchdog,
    non-finite handling: they change no number); a config.json written before a key moved reads as today's."""
    try:
        out = config_from_dict(cfg).to_dict()  # old key spellings mapped, sections it lacks at their defaults
    except ConfigError:
        out = json.loads(json.dumps(cfg))
    for section in RUN_OPTION_SECTIONS:
        out.pop(section, None)
    for key in RUN_LOCAL_KEYS:
        section, name = key.split(".")
        out.get(section, {}).pop(name, None)
    return out


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_diff(a: dict[str, Any], b: dict[str, Any], sections: tuple[str, ...] | None = None) -> list[str]:
    fa, fb = _flat(comparable(a)), _flat(comparable(b))
    keys = sorted(set(fa) | set(fb))
    if sections:
        keys = [k for k in keys if k.split(".")[0] in sections]
    return [f"{k}: {fa.get(k)!r} vs {fb.get(k)!r}" for k in keys if fa.get(k) != fb.get(k)]


@dataclass
class Run:
    framework: str
    run_dir: Path
    config: dict[str, Any]
    meta: dict[str, Any]
    metrics: list[dict[str, Any]]


def load_run(run_dir: Path) -> Run:
    """A finished run directory, or a ReportError naming what is missing or broken."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    for name in ("config.json", "meta.json", "metrics.jsonl"):
        if not (run_dir / name).is_file():
            raise ReportError(f"{run_dir}: {name} is missing (the run did not finish or was not started)")
    try:
        config = json.loads((run_dir / "config.json").read_text())["config"]
        meta = json.loads((run_dir / "meta.json").read_text())
    except (json.JSONDecodeError, KeyError) as e:
        raise ReportError(f"{run_dir}: config.json/meta.json unreadable ({e})") from None
    try:
        metrics = read_metrics(run_dir)
    except ValueError as e:
        raise ReportError(str(e)) from None
    for i, row in enumerate(metrics, 1):
        if row.get("step") != i or not isinstance(row.get("loss"), int | float):
            raise ReportError(f"{run_dir}/metrics.jsonl line {i}: expected step {i} with a numeric loss, got {row}")
    return Run(meta.get("framework", "?"), run_dir, config, meta, metrics)


def reusable(run_dir: Path, cfg: Config, processes: int | None = None) -> bool:
    """A finished run of exactly this config (and, for JAX, made by ``processes`` processes)."""
    try:
        run = load_run(run_dir)
    except ReportError:
        return False
    if processes is not None and (run.meta.get("processes") or 1) != processes:
        return False
    return not config_diff(run.config, cfg.to_dict()) and len(run.metrics) == cfg.train.steps


ARGV_SECTIONS = ("model", "parallel", "optim", "data", "train", "jax")  # what trainer_argv passes on


def trainer_argv(framework: str, cfg: Config) -> list[str]:
    """The trainer's command line for ``cfg``: the CLI's own flags, and every other config key that differs
    from the preset's as a dotted override (a layout's extras: pipeline_repeats, hpz, ...; seeds, data, evals)."""
    p, preset = cfg.parallel, load_config(cfg.preset)
    argv = [PYTHONS[framework], "-m", FRAMEWORKS[framework], "--preset", cfg.preset, "--quiet",
            "--mesh", p.mesh, "--zero", str(p.zero), "--gas", str(p.gas), "--mbs", str(p.mbs),
            "--steps", str(cfg.train.steps), "--dtype", cfg.train.dtype, "--wandb", "disabled",
            "--out-dir", cfg.train.out_dir, "--name", cfg.train.name]
    given = {"parallel": {"mesh", "zero", "gas", "mbs"}, "train": {"steps", "dtype", "wandb", "out_dir", "name"}}
    for section in ARGV_SECTIONS:
        mine, base = getattr(cfg, section), getattr(preset, section)
        for f in fields(mine):
            value = getattr(mine, f.name)
            if f.name not in given.get(section, ()) and value != getattr(base, f.name):
                argv.append(f"--{section}.{f.name}={str(value).lower() if isinstance(value, bool) else value}")
    return argv


def execute(framework: str, cfg: Config, log: Path, timeout_s: int, processes: int = 1, root: Path = ROOT) -> None:
    """Run one trainer in its own process(es): fresh JAX device count / torch workers. JAX with ``processes``
    > 1 starts them as a launcher would (rank, size and coordinator in the environment; process 0 writes the
    run directory); they are all waited for, and a failed one (or the timeout) stops the others. ``root``: the
    source tree whose trainer runs (benchmarks/ab_processes.py runs two)."""
    run_dir = Path(cfg.train.out_dir) / cfg.train.name
    if run_dir.exists():  # a stale or different run of the same name: replace it
        import shutil

        shutil.rmtree(run_dir)
    from runtime.launcher_env import LOCAL_RANK_VARS, LOCAL_SIZE_VARS, RANK_VARS, SIZE_VARS

    argv = trainer_argv(framework, cfg)
    env = dict(allocator_env(), PYTHONUNBUFFERED="1")  # the trainers start on the policy's allocator
    # the report's own launcher (mpiexec, SLURM, torchrun) is not the trainers': its rank variables would make
    # a one-process trainer wait for peers that never come
    for key in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS", *RANK_VARS, *SIZE_VARS, *LOCAL_RANK_VARS,
                *LOCAL_SIZE_VARS):
        env.pop(key, None)
    logs = [log] + [log.with_name(f"{log.stem}.{i}{log.suffix}") for i in range(1, processes)]
    ranks: list[dict[str, str]] = [{}]
    if processes > 1:
        addr = f"127.0.0.1:{procgroup.free_port()}"
        ranks = [{"PMI_RANK": str(i), "PMI_SIZE": str(processes), "JAX_COORDINATOR_ADDRESS": addr}
                 for i in range(processes)]
    group = procgroup.start([argv] * len(ranks), [{**env, **rank} for rank in ranks], cwd=root, logs=logs,
                            poll_s=0.2)
    # the same waiting as torch_ref.train's launcher: a failed process (or the timeout) stops the others, a
    # SIGTERM/SIGINT to the report reaches every trainer process and is waited out (they save)
    group.wait(deadline=time.monotonic() + timeout_s, failure_grace_s=0.0, kill_on_stop=True)
    if group.received is not None:
        raise SystemExit(128 + group.received)
    first = group.first_failure()
    if first is not None:
        tail = "\n".join(logs[first].read_text().splitlines()[-6:])
        raise ReportError(f"{framework} run {cfg.train.name} failed ({group.describe(first)}); log {logs[first]}:"
                          f"\n{tail}")
    if group.stopped:  # still running at the deadline: stopped here
        raise ReportError(f"{framework} run {cfg.train.name} exceeded {timeout_s}s (log {log})")


# ----------------------------------------------------------------------------- analysis
def pair_check(jax_run: Run, torch_run: Run) -> None:
    diff = config_diff(jax_run.config, torch_run.config, PAIRED_SECTIONS)
    if diff:
        raise ReportError(f"{jax_run.run_dir} and {torch_run.run_dir} differ in model/data/optimizer config: "
                          + "; ".join(diff))
    if len(jax_run.metrics) != len(torch_run.metrics):
        raise ReportError(f"step counts differ: {jax_run.run_dir} has {len(jax_run.metrics)}, "
                          f"{torch_run.run_dir} has {len(torch_run.metrics)}")


def parity(jax_run: Run, torch_run: Run, dtype: str) -> dict[str, Any]:
    lj = [r["loss"] for r in jax_run.metrics]
    lt = [r["loss"] for r in torch_run.metrics]
    rel = [abs(a - b) / abs(b) if b else math.inf for a, b in zip(lj, lt, strict=True)]
    gj = [r.get("grad_norm") for r in jax_run.metrics]
    gt = [r.get("grad_norm") for r in torch_run.metrics]
    grel = [abs(a - b) / abs(b) for a, b in zip(gj, gt, strict=True) if a is not None and b]
    th = THRESHOLDS[dtype]
    if dtype == "fp32":
        checks = {"first": rel[0] <= th["first"], "every": max(rel) <= th["every"]}
    else:
        last = min(10, len(lj))
        mean_rel = abs(statistics.fmean(lj[-last:]) - statistics.fmean(lt[-last:])) / abs(statistics.fmean(lt[-last:]))
        checks = {"every": max(rel) <= th["every"], "last10_mean": mean_rel <= th["last10_mean"]}
    # validation loss: the steps where both evaluated, held to the every-step threshold of the training loss
    val = [(r["step"], r["val_loss"], q.get("val_loss")) for r, q in zip(jax_run.metrics, torch_run.metrics,
                                                                          strict=True) if r.get("val_loss") is not None]
    if any(b is None for _, _, b in val):
        raise ReportError(f"{jax_run.run_dir} has validation losses at steps {[s for s, _, _ in val]} that "
                          f"{torch_run.run_dir} lacks")
    val_rel = [abs(a - b) / abs(b) if b else math.inf for _, a, b in val]
    if val:
        checks["val_every"] = max(val_rel) <= th["every"]
    out = {
        "steps": len(lj), "first_rel": rel[0], "max_rel": max(rel), "rel": rel, "loss_jax": lj, "loss_torch": lt,
        "grad_norm_max_rel": max(grel) if grel else None, "thresholds": th, "checks": checks,
        "val_steps": [s for s, _, _ in val], "val_jax": [a for _, a, _ in val], "val_torch": [b for _, _, b in val],
        "val_rel": val_rel, "val_max_rel": max(val_rel) if val else None,
        "pass": all(checks.values()),
    }
    if dtype == "bf16":
        out["last10_mean_rel"] = mean_rel
    return out


def throughput(run: Run, warmup: int = 2) -> dict[str, Any]:
    rows = run.metrics[warmup:] or run.metrics
    step = statistics.median(r["step_time_s"] for r in rows)
    cfg = config_from_dict(run.config)
    m = run.meta
    devices = m.get("devices") or m.get("world_size") or 1
    seq = cfg.data.seq_len
    gbs = m.get("gbs") or cfg.global_batch()
    sps = gbs / step
    mem = m.get("compiled_memory") or {}
    rss = max((r.get("peak_mem_bytes") or 0) for r in run.metrics) or None
    # a JAX process holds all its local devices (2 fake CPU devices here); a DeepSpeed rank holds one
    local = devices // (m.get("processes") or 1) if m.get("framework") == "jax" else 1
    return {
        "step_time_s": step, "samples_per_s": sps, "tokens_per_s_per_device": sps * seq / devices,
        "tflops_per_device": sps * cfg.model.flops_per_sample(seq) / devices / 1e12,
        "tflops_per_device_legacy": sps * cfg.model.flops_per_sample_legacy(seq, cfg.parallel.remat) / devices / 1e12,
        "startup_s": m.get("compile_s", m.get("init_s")),
        "peak_rss_bytes": rss, "peak_rss_per_device_bytes": rss // local if rss else None,
        "compiled_peak_bytes": (mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]) if mem else None,
        "devices": devices, "label": m.get("layout_label") or m.get("layout"),
    }


# ----------------------------------------------------------------------------- rendering
def _e(x: float | None) -> str:
    return "—" if x is None else f"{x:.1e}"


def _n(x: float | None, nd: int = 2) -> str:
    return "—" if x is None else f"{x:,.{nd}f}"


def _mib(x: int | None) -> str:
    return "—" if not x else f"{x / 2**20:,.0f}"


def render(results: dict[str, Any]) -> str:
    lines = [f"# JAX vs DeepSpeed: parity and throughput ({results['preset']} preset, {results['steps']} steps)", "",
             "Same initial weights (torch loads the JAX init of the seed), same token stream, per layout.", ""]
    if results.get("host"):
        lines += [f"Host: {results['host']}.", ""]
    lines += ["## Loss parity", "",
              "| layout | dtype | steps | first rel Δloss | max rel Δloss | max rel Δgrad-norm | max rel Δval-loss "
              "| verdict |",
              "|---|---|---|---|---|---|---|---|"]
    for _key, r in sorted(results["layouts"].items()):
        if "parity" in r:
            p = r["parity"]
            verdict = "PASS" if p["pass"] else "FAIL (" + ", ".join(k for k, v in p["checks"].items() if not v) + ")"
            lines.append(f"| {r['layout']} | {r['dtype']} | {p['steps']} | {_e(p['first_rel'])} | {_e(p['max_rel'])} "
                         f"| {_e(p['grad_norm_max_rel'])} | {_e(p.get('val_max_rel'))} | {verdict} |")
    lines += ["", "Thresholds on |Δloss| / loss: " + "; ".join(
        f"{dt} — " + ", ".join(f"{THRESHOLD_TEXT[k]} ≤ {v:.0e}" for k, v in th.items()) for dt, th in THRESHOLDS.items()
    ) + "; the validation loss (every evaluation) to the every-step threshold.", ""]
    lines += ["## Throughput", "",
              "TFLOPS/device under the Megatron-LM formula (legacy Megatron-DeepSpeed formula in its own column); "
              "step time is the median after 2 warm-up steps; startup is JAX compile or DeepSpeed init. Peak RSS "
              "is per process (JAX: one process for all its devices; DeepSpeed: the largest rank) and per device "
              "(JAX: divided by the process's devices).", "",
              "| layout | dtype | framework | devices | step ms | samples/s | tok/s/dev | TFLOPS/dev "
              "| TFLOPS/dev (legacy) | startup s | peak RSS MiB | peak RSS MiB/dev | compiled peak MiB | JAX/DS |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for _key, r in sorted(results["layouts"].items()):
        for fw in ("jax", "torch"):
            t = r.get("throughput", {}).get(fw)
            if not t:
                continue
            ratio = ratio_text(r) if fw == "jax" else ""
            label = f" ({t['label']})" if fw == "torch" and t["label"] else ""
            lines.append(
                f"| {r['layout']} | {r['dtype']} | {fw}{label}"
                f" | {t['devices']} | {t['step_time_s'] * 1e3:,.0f} | {_n(t['samples_per_s'])} "
                f"| {_n(t['tokens_per_s_per_device'], 0)} | {_n(t['tflops_per_device'], 4)} "
                f"| {_n(t['tflops_per_device_legacy'], 4)} | {_n(t['startup_s'], 1)} | {_mib(t['peak_rss_bytes'])} "
                f"| {_mib(t.get('peak_rss_per_device_bytes'))} | {_mib(t['compiled_peak_bytes'])} "
                f"| {ratio} |")
    failed = {k: r["error"] for k, r in results["layouts"].items() if "error" in r}
    if failed:
        lines += ["", "## Not compared", ""] + [f"- **{k}**: {v}" for k, v in sorted(failed.items())]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for dtype in results["dtypes"]:
        done = {k: r for k, r in results["layouts"].items() if r["dtype"] == dtype and "parity" in r}
        if not done:
            continue
        n = len(done)
        fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3), squeeze=False)
        for ax, (_, r) in zip(axes[0], sorted(done.items()), strict=True):
            p = r["parity"]
            steps = range(1, p["steps"] + 1)
            ax.plot(steps, p["loss_torch"], "-", lw=2.5, alpha=0.5, label="DeepSpeed")
            ax.plot(steps, p["loss_jax"], "--", lw=1.2, label="JAX")
            if p.get("val_steps"):
                ax.plot(p["val_steps"], p["val_torch"], "o", ms=6, alpha=0.5, label="DeepSpeed val")
                ax.plot(p["val_steps"], p["val_jax"], "x", ms=5, label="JAX val")
            ax.set_title(r["layout"], fontsize=9)
            ax.set_xlabel("step")
        axes[0][0].set_ylabel("loss")
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"loss, {dtype}", fontsize=10)
        fig.tight_layout()
        paths.append(out / f"loss_{dtype}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for _, r in sorted(done.items()):
            rel = [max(x, 1e-12) for x in r["parity"]["rel"]]
            ax.semilogy(range(1, len(rel) + 1), rel, marker=".", label=r["layout"])
        for name, v in THRESHOLDS[dtype].items():
            if name != "first":
                ax.axhline(v, color="grey", ls=":", lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("|Δloss| / loss")
        ax.set_title(f"JAX vs DeepSpeed loss difference, {dtype}", fontsize=10)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        paths.append(out / f"loss_diff_{dtype}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

        tp = {k: r for k, r in results["layouts"].items() if r["dtype"] == dtype and len(r.get("throughput", {})) == 2}
        if tp:
            names = [r["layout"] for _, r in sorted(tp.items())]
            fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names) + 2), 3.5))
            xs = range(len(names))
            for off, fw, lab in ((-0.2, "torch", "DeepSpeed"), (0.2, "jax", "JAX")):
                ax.bar([x + off for x in xs], [r["throughput"][fw]["tokens_per_s_per_device"]
                                               for _, r in sorted(tp.items())], width=0.4, label=lab)
            ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
            ax.set_ylabel("tokens/s/device")
            ax.set_title(f"throughput, {dtype}", fontsize=10)
            ax.legend(fontsize=8)
            fig.tight_layout()
            paths.append(out / f"throughput_{dtype}.png")
            fig.savefig(paths[-1], dpi=110)
            plt.close(fig)
    return paths


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"JAX vs DeepSpeed ({results['preset']}, {results['steps']} steps)")
    for col in ("layout", "dtype", "max rel Δloss", "parity", "JAX tok/s/dev", "DS tok/s/dev", "JAX/DS"):
        t.add_column(col)
    for _, r in sorted(results["layouts"].items()):
        if "error" in r:
            t.add_row(r["layout"], r["dtype"], "—", "[yellow]not compared[/]", "—", "—", "—")
            continue
        p, tp = r["parity"], r["throughput"]
        t.add_row(r["layout"], r["dtype"], _e(p["max_rel"]), "[green]PASS[/]" if p["pass"] else "[red]FAIL[/]",
                  _n(tp["jax"]["tokens_per_s_per_device"], 0), _n(tp["torch"]["tokens_per_s_per_device"], 0),
                  ratio_text(r))
    Console().print(t)


# ----------------------------------------------------------------------------- driver
def compare_layout(preset: str, layout: LayoutSpec, dtype: str, steps: int, runs_dir: Path, rerun: bool,
                   timeout_s: int, progress, run: bool = True, repeats: int = 1,
                   evals: tuple[int, int] = (EVAL_INTERVAL, EVAL_ITERS)) -> dict[str, Any]:
    """Parity and throughput of one layout. With ``repeats`` > 1 the JAX and DeepSpeed runs alternate
    (jax, torch, jax, torch, ...), and the speed ratio is the median of the pairs' ratios: each pair ran
    back to back, so the machine's drift over the whole comparison cancels out of it."""
    pairs: list[dict[str, Run]] = []
    for rep in range(1, repeats + 1):
        runs: dict[str, Run] = {}
        tag = f" (pair {rep}/{repeats})" if repeats > 1 else ""
        for fw in FRAMEWORKS:
            cfg = run_config(preset, layout, dtype, steps, runs_dir, fw, rep, evals)
            run_dir = runs_dir / cfg.train.name
            if not run:
                found = load_run(run_dir)  # names what is missing or corrupt
                diff = config_diff(found.config, cfg.to_dict())
                if diff:
                    raise ReportError(f"{run_dir} was run with another config: " + "; ".join(diff))
            elif rerun or not reusable(run_dir, cfg, layout.jax_processes if fw == "jax" else None):
                nproc = layout.jax_processes if fw == "jax" else 1
                progress(f"{layout.name} {dtype}: running {fw}{tag}" + (f" ({nproc} processes)" if nproc > 1 else ""))
                t = time.perf_counter()
                execute(fw, cfg, runs_dir / f"{cfg.train.name}.log", timeout_s, nproc)
                progress(f"{layout.name} {dtype}: {fw} done in {time.perf_counter() - t:.0f}s")
                diff = config_diff(load_run(run_dir).config, cfg.to_dict())
                if diff:  # the trainer did not take a setting of the layout: its figures would be another layout's
                    raise ReportError(f"{fw} run {run_dir} ran another config than the layout's: " + "; ".join(diff))
            else:
                progress(f"{layout.name} {dtype}: reusing {run_dir}")
            runs[fw] = load_run(run_dir)
        pair_check(runs["jax"], runs["torch"])
        pairs.append(runs)
    verdicts = [parity(r["jax"], r["torch"], dtype) for r in pairs]
    par = dict(verdicts[0], **{"pass": all(v["pass"] for v in verdicts)})  # losses repeat exactly on CPU
    tps = [{fw: throughput(r) for fw, r in runs.items()} for runs in pairs]
    ratios = [t["jax"]["tokens_per_s_per_device"] / t["torch"]["tokens_per_s_per_device"] for t in tps]
    # per framework, the repeat with the median tokens/s (a real run's figures, RSS and startup included)
    tp = {fw: sorted((t[fw] for t in tps), key=lambda x: x["tokens_per_s_per_device"])[(len(tps) - 1) // 2]
          for fw in FRAMEWORKS}
    return {
        "layout": layout.name, "dtype": dtype, "note": layout.note,
        "runs": {fw: str(r.run_dir) for fw, r in pairs[0].items()},
        "parity": par, "throughput": tp,
        "speed_ratio": statistics.median(ratios), "speed_ratios": ratios,
    }


def ratio_text(r: dict[str, Any]) -> str:
    """``1.23×``, or with repeats ``1.23× (1.10–1.31, 3 pairs)``."""
    ratios = r["speed_ratios"]
    text = _n(r["speed_ratio"]) + "×"
    return text if len(ratios) == 1 else f"{text} ({_n(min(ratios))}–{_n(max(ratios))}, {len(ratios)} pairs)"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m compare.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default=",".join(n for n, spec in LAYOUTS.items() if spec.default),
                    help=f"comma list of {', '.join(LAYOUTS)} (default: all but "
                         f"{', '.join(n for n, spec in LAYOUTS.items() if not spec.default)})")
    ap.add_argument("--dtype", default="fp32,bf16", help="fp32, bf16 or both (comma list)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--preset", default="tiny", help="the parity preset (default: tiny)")
    ap.add_argument("--runs", default="runs/compare", help="run directories (reused when the config matches)")
    ap.add_argument("--out", default="reports/compare", help="where report.md/json and the plots go")
    ap.add_argument("--rerun", action="store_true", help="ignore matching run directories and run again")
    ap.add_argument("--no-run", dest="run", action="store_false",
                    help="run nothing: report only on the run directories under --runs (e.g. runs made elsewhere)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per trainer run")
    ap.add_argument("--eval-interval", type=int, default=EVAL_INTERVAL,
                    help="validation loss every N steps in both trainers (0: none); checked like the loss")
    ap.add_argument("--eval-iters", type=int, default=EVAL_ITERS,
                    help="global batches of the valid split per evaluation")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run each layout's JAX/DeepSpeed pair N times, alternating; the ratio is the median of "
                         "the pairs' ratios (this machine drifts by tens of %% between minutes)")
    ap.add_argument("--reference", help="also check and render the study's table (CSV, as compare/data/)")
    ap.add_argument("--jax-python", help="the Python that runs jax_impl.train (default: this one)")
    ap.add_argument("--torch-python", help="the Python that runs torch_ref.train (default: this one), e.g. "
                                           ".venv/bin/python when this one is the Intel-GPU stack's")
    ap.add_argument("--assert", dest="strict", action="store_true",
                    help="exit 1 if any compared layout fails parity or any layout could not be compared")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.layouts.split(",") if n.strip()]
    unknown = [n for n in names if n not in LAYOUTS]
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    bad_dtypes = [d for d in dtypes if d not in THRESHOLDS]
    if unknown or bad_dtypes or args.steps < 1 or args.repeats < 1:
        msg = (f"unknown layout(s) {', '.join(unknown)}; choose from {', '.join(LAYOUTS)}" if unknown else
               f"unknown dtype(s) {', '.join(bad_dtypes)}; use fp32, bf16" if bad_dtypes else
               f"--steps {args.steps} must be >= 1" if args.steps < 1 else
               f"--repeats {args.repeats} must be >= 1")
        print(f"error: {msg}", file=sys.stderr)
        return 2
    for fw in FRAMEWORKS:
        py = getattr(args, f"{fw}_python") or sys.executable
        if not (Path(py).exists() and subprocess.run([py, "-c", ""], capture_output=True).returncode == 0):
            print(f"error: --{fw}-python {py}: not a Python that runs; give the interpreter of the environment "
                  f"that has {FRAMEWORKS[fw]}'s framework", file=sys.stderr)
            return 2
        PYTHONS[fw] = py
    try:
        load_config(args.preset)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs_dir, out = Path(args.runs), Path(args.out)
    if not args.run and not runs_dir.is_dir():  # nothing to run and nothing to read: a report of nothing is no report
        print(f"error: --no-run --runs {runs_dir}: no such directory; point --runs at the run directories to "
              "report on, or drop --no-run to make them", file=sys.stderr)
        return 2
    runs_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    def progress(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    results: dict[str, Any] = {"preset": args.preset, "steps": args.steps, "dtypes": dtypes, "layouts": {},
                               "host": f"{host_cpu()}; host allocator {child_allocator()} (runtime/hostmem.py)"}
    for name in names:
        for dtype in dtypes:
            key = f"{name}/{dtype}"
            try:
                results["layouts"][key] = compare_layout(args.preset, LAYOUTS[name], dtype, args.steps, runs_dir,
                                                         args.rerun, args.timeout, progress, args.run,
                                                         args.repeats, (args.eval_interval, args.eval_iters))
            except (ReportError, ConfigError) as e:
                results["layouts"][key] = {"layout": name, "dtype": dtype, "error": str(e)}
                progress(f"{key}: not compared — {str(e).splitlines()[0]}")
    md = render(results)
    if args.reference:
        from compare import reference

        rows = reference.load_reference(args.reference)
        checks = reference.check_all(rows)
        md += "\n## The study's measured runs, recomputed\n\n" + reference.render_markdown(checks)
        md += "\n" + reference.render_normalised_markdown(reference.normalise(rows)) + "\n"
        reference.plot_gas_sweep(rows, out / "reference_gas_sweep.png")
        from compare import plan

        md += "\n" + plan.validation_markdown() + "\n"
        results["reference"] = [{"run": c.row.run, "flags": c.flags} for c in checks]
    (out / "report.md").write_text(md)
    (out / "report.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    plots = plot(results, out)
    print_table(results)
    print(f"wrote {out / 'report.md'}, {out / 'report.json'}, {len(plots)} plots")
    failed = [k for k, r in results["layouts"].items() if "error" in r or not r["parity"]["pass"]]
    if failed:
        print(f"parity failed or not compared: {', '.join(failed)}", file=sys.stderr)
    return 1 if (args.strict and failed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
