"""Run directories, the interface between trainers and the report.

Each run writes ``config.json`` (resolved config + hashes), ``meta.json`` (framework,
versions, layout, devices, dtype) and ``metrics.jsonl`` (one line per step, the schema
below, shared by jax_impl and torch_ref). wandb logging is optional and never fatal.

Both trainers also share the run directory's failure handling here (docs/checkpoints.md):

- ``lock_run_dir``: one run per directory, an exclusive ``flock`` on ``<run dir>/run.lock`` taken before
  anything is compiled; a second run is refused naming the holder's pid and host.
- ``metrics.jsonl`` is strict JSON: a non-finite float is written as the string ``"NaN"``, ``"Infinity"`` or
  ``"-Infinity"`` and read back as the float; a torn last line (what a crash mid-write leaves) is dropped
  with a warning when a run is resumed.
- ``truncate_metrics`` / ``set_aside``: resuming from step k starts a new branch; the old branch's rows
  after k and its checkpoints after k are moved into ``abandoned-<time>`` names, never deleted.
"""

from __future__ import annotations

import fcntl
import json
import math
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
# hashed one by one in config.json; the run options (checkpoint, nonfinite, watchdog) are recorded there but hashed
# nowhere, since a resume may change them
CONFIG_SECTIONS = ("model", "parallel", "optim", "data", "train", "jax")
LOCK_FILE = "run.lock"
NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}  # strict-JSON spellings


class RunDirBusy(RuntimeError):
    """Another live process holds the run directory's lock (the message names it)."""


def run_dir_path(cfg: Config, framework: str) -> Path:
    """Where a run of ``cfg`` writes: ``<out_dir>/<name>``, or a fresh time+pid name when none is given."""
    name = cfg.train.name or (
        f"{cfg.preset}-{framework}-{cfg.parallel.mesh.replace('=', '').replace(',', '-')}-"
        f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    )
    return Path(cfg.train.out_dir) / name


def make_run_dir(cfg: Config, framework: str, run_dir: Path | None = None) -> Path:
    run_dir = run_dir or run_dir_path(cfg, framework)
    if (run_dir / "metrics.jsonl").exists():
        raise FileExistsError(f"run directory {run_dir} already holds a run; pick another --name or remove it "
                              "(or continue it: --resume auto)")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


class RunDirLock:
    """An exclusive ``flock`` on ``<run dir>/run.lock``, held until ``release()`` or the process ends.

    flock, not a pid file: the kernel drops the lock when its holder dies (kill -9 included), so a crashed
    run never blocks its requeue, while two live runs can never both hold it. The file records the holder
    (pid, host, time) only to name it in the refusal.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.created = not self.path.parent.exists()  # a run stopped before it wrote anything leaves no directory
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            self._fd = None
            holder = self._holder()
            who = (f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}"
                   if holder.get("pid") else "a process that did not record its pid")
            raise RunDirBusy(f"run directory {run_dir} is in use by another run ({who}); wait for it to end, "
                             "stop it, or pick another --name") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, json.dumps({"pid": os.getpid(), "host": platform.node(),
                                       "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())

    def _holder(self, wait_s: float = 2.0) -> dict:
        """The holder's record. A holder that has just taken the lock writes it a moment later: wait for it briefly
        rather than name no one."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                holder = json.loads(self.path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):  # empty, or caught between truncate and write
                holder = {}
            if holder.get("pid") or time.monotonic() >= deadline:
                return holder
            time.sleep(0.05)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def abandon(self) -> None:
        """Release; and if this lock made the directory and nothing else was written there, remove both."""
        self.release()
        d = self.path.parent
        if self.created and d.is_dir() and [p.name for p in d.iterdir()] == [LOCK_FILE]:
            self.path.unlink(missing_ok=True)
            d.rmdir()


def out_dir_error(e: BaseException, out_dir: str) -> str:
    """The message for a run directory that could not be made or locked: the file system's errors name --out-dir."""
    if isinstance(e, OSError) and e.errno is not None:
        return f"--out-dir {out_dir}: cannot make the run directory there ({e}); pick a writable directory"
    return str(e)


def lock_run_dir(run_dir: Path) -> RunDirLock:
    """Take the run directory's exclusive lock (creating the directory); ``RunDirBusy`` if a live run has it."""
    return RunDirLock(run_dir)


def replace_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader, or a crash, sees the old file
    or the new one, never a part (the temporary name carries the pid, so concurrent writers do not share it)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def abandoned_name() -> str:
    """``abandoned-<UTC time>-<pid>``: where a resume from an older step puts the old branch's later files."""
    return f"abandoned-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"


def set_aside(directory: Path, names: list[str], into: str | None = None) -> Path | None:
    """Move ``directory/<name>`` for each name into ``directory/<into>/`` (one rename each: atomic, same file
    system, nothing copied or deleted). Returns the folder, or None when there was nothing to move."""
    names = [n for n in names if (Path(directory) / n).exists()]
    if not names:
        return None
    dest = Path(directory) / (into or abandoned_name())
    dest.mkdir(parents=True, exist_ok=True)
    for n in names:
        os.replace(Path(directory) / n, dest / n)
    return dest


def _strict(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else "Infinity" if v > 0 else "-Infinity"
    return v


def _loose(row: dict[str, Any]) -> dict[str, Any]:
    return {k: NONFINITE[v] if isinstance(v, str) and v in NONFINITE else v for k, v in row.items()}


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


def recorded_layout(run_dir: Path) -> dict[str, Any] | None:
    """The parallel section a run recorded (config.json) and its ``--mesh auto`` decision (meta.json), or None."""
    try:
        par = json.loads((run_dir / "config.json").read_text())["config"]["parallel"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        dec = json.loads((run_dir / "meta.json").read_text()).get("layout_decision")
    except (OSError, ValueError, AttributeError):
        dec = None
    return {"parallel": par, "decision": dec}


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
        # strict JSON (bare NaN is not JSON): non-finite floats as their strings, read back by read_metrics
        self._f.write(json.dumps({k: _strict(v) for k, v in full.items()}, allow_nan=False) + "\n")
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


def _parse_metrics(path: Path, allow_torn: bool = True) -> tuple[list[dict[str, Any]], list[str], bool]:
    """(rows, their lines, whether a torn last line was dropped); a bad line elsewhere is an error."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows, torn = [], False
    for i, line in enumerate(lines, 1):
        try:
            rows.append(_loose(json.loads(line)))
        except json.JSONDecodeError as e:
            if allow_torn and i == len(lines):  # a crash mid-write cuts the last line short: a step not logged
                warnings.warn(f"{path}: dropping the torn last line {i} ({e.msg}): {line[:80]!r}", stacklevel=3)
                torn = True
                break
            raise ValueError(f"{path} line {i} is not valid JSON ({e.msg})") from None
    return rows, lines[:len(rows)], torn


def read_metrics(run_dir: Path, allow_torn: bool = False) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``, non-finite values as floats. A bad line is an error naming it, except with
    ``allow_torn`` a torn last line (a run still going, or one to resume), which is dropped with a warning;
    resuming a run drops it for good (``truncate_metrics``). Reports of finished runs read strictly."""
    return _parse_metrics(Path(run_dir) / "metrics.jsonl", allow_torn)[0]


def truncate_metrics(run_dir: Path, step: int) -> Path | None:
    """Continuing in place from step ``step``: keep rows 1..step in ``metrics.jsonl``; the rows of the old
    branch after it go to ``metrics.<abandoned-time>.jsonl`` beside it (returned, None if there were none).
    A torn last line is dropped. The aside file is written before ``metrics.jsonl`` is atomically replaced,
    so a crash in between duplicates rows, never loses them."""
    f = Path(run_dir) / "metrics.jsonl"
    if not f.exists():
        return None
    rows, lines, torn = _parse_metrics(f)
    keep = [line for row, line in zip(rows, lines, strict=True) if row.get("step", 0) <= step]
    later = [line for row, line in zip(rows, lines, strict=True) if row.get("step", 0) > step]
    aside = None
    if later:
        aside = f.with_name(f"metrics.{abandoned_name()}.jsonl")
        aside.write_text("".join(line + "\n" for line in later))
    if later or torn:
        replace_text(f, "".join(line + "\n" for line in keep))
    return aside
