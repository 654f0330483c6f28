"""Run directories, the interface between trainers and the report.

Each run writes ``config.json`` (resolved config + hashes), ``meta.json`` (framework,
versions, layout, devices, dtype) and ``metrics.jsonl`` (one line per step, the schema
below, shared by jax_impl and torch_ref). wandb logging is optional and never fatal.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from configs.schema import Config

# every metrics.jsonl line has these keys (None where a framework cannot measure one)
METRIC_KEYS = (
    "step", "loss", "lr", "grad_norm", "step_time_s", "samples_per_s", "tokens_per_s_per_device",
    "tflops_per_device", "consumed_samples", "peak_mem_bytes", "val_loss", "val_ppl",
)
CONFIG_SECTIONS = ("model", "parallel", "optim", "data", "train")


def make_run_dir(cfg: Config, framework: str) -> Path:
    name = cfg.train.name or (
        f"{cfg.preset}-{framework}-{cfg.parallel.mesh.replace('=', '').replace(',', '-')}-"
        f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    )
    run_dir = Path(cfg.train.out_dir) / name
    if (run_dir / "metrics.jsonl").exists():
        raise FileExistsError(f"run directory {run_dir} already holds a run; pick another --name or remove it")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def write_config(run_dir: Path, cfg: Config) -> None:
    doc = {
        "hash": cfg.hash(),
        "section_hashes": {s: cfg.hash((s,)) for s in CONFIG_SECTIONS},
        "config": cfg.to_dict(),
    }
    (run_dir / "config.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def host_cpu() -> str:
    """The host CPU as one line: model, logical CPUs and the vector/matrix extensions that decide bf16 speed on
    CPU (with AMX or AVX512-BF16, bf16 dots are native; without them torch's bf16 CPU step was ~9x its fp32 one)."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and not model:
                model = value
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model}, {os.cpu_count()} CPUs" + (f", {' '.join(isa)}" if isa else "")


def write_meta(run_dir: Path, meta: dict[str, Any]) -> None:
    base = {"python": sys.version.split()[0], "host": platform.node(), "cpu": host_cpu(), "argv": sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (run_dir / "meta.json").write_text(json.dumps({**base, **meta}, indent=2, sort_keys=True, default=str) + "\n")


class MetricsLog:
    """Appends one JSON line per step; unknown keys are refused so both sides stay in step."""

    def __init__(self, run_dir: Path, cfg: Config, framework: str):
        self.path = run_dir / "metrics.jsonl"
        self._f = self.path.open("a")
        self._wandb = _open_wandb(cfg, run_dir, framework)

    def write(self, row: dict[str, Any]) -> None:
        extra = set(row) - set(METRIC_KEYS)
        if extra:
            raise KeyError(f"metrics keys {sorted(extra)} are not in the shared schema {METRIC_KEYS}")
        full = {k: row.get(k) for k in METRIC_KEYS}
        self._f.write(json.dumps(full) + "\n")
        self._f.flush()
        if self._wandb is not None:
            try:
                self._wandb.log({k: v for k, v in full.items() if v is not None and k != "step"}, step=row["step"])
            except Exception as e:
                warnings.warn(f"wandb logging failed, continuing without it: {e}", stacklevel=2)
                self._wandb = None

    def close(self) -> None:
        self._f.close()
        if self._wandb is not None:
            try:
                self._wandb.finish(quiet=True)
            except Exception:
                pass


def _open_wandb(cfg: Config, run_dir: Path, framework: str):
    if cfg.train.wandb == "disabled":
        return None
    try:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        return wandb.init(project="auroragpt-jax-vs-deepspeed", name=run_dir.name, dir=str(run_dir),
                          mode=cfg.train.wandb, config=cfg.to_dict(), tags=[framework], reinit="finish_previous")
    except Exception as e:
        warnings.warn(f"wandb unavailable ({type(e).__name__}: {e}); metrics.jsonl still has everything",
                      stacklevel=2)
        return None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate((Path(run_dir) / "metrics.jsonl").read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{run_dir}/metrics.jsonl line {i} is not valid JSON ({e.msg})") from None
    return rows
