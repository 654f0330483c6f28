"""JAX's compiled memory of a layout: the train step AOT-compiled on fake CPU devices in a subprocess (the device
count is fixed per process), cached as JSON by config hash; and compiled vs measured (RSS) memory on one device."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from compare.plan.assumptions import GB, SEQ
from compare.plan.layout import Layout
from configs import Config, load_config, validate_config
from runtime.rundir import replace_text

JAX_WORKER_VERSION = 7  # bump to invalidate cached compile results (and whenever the step's memory changes)


def _cache_dir() -> Path:
    return Path(os.environ.get("AURORAGPT_PLAN_CACHE", Path.home() / ".cache" / "auroragpt-plan"))


def jax_compile_key(cfg: Config, n_devices: int) -> str:
    import jax

    blob = json.dumps({"cfg": cfg.to_dict(), "n": n_devices, "jax": jax.__version__, "v": JAX_WORKER_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def jax_memory(model: str, layout: Layout, seq: int = SEQ, timeout: float = 600, cache: Path | None = None,
               refresh: bool = False) -> dict[str, Any]:
    """Compiled per-device memory of ``layout`` on fake CPU devices: {"ok", "memory", "peak_bytes", ...}.

    One subprocess per layout (the device count is fixed per process); results cached by config hash.
    """
    cfg = layout.jax_config(model, seq)
    cache = cache or _cache_dir()
    key = jax_compile_key(cfg, layout.ngpu)
    path = cache / f"{key}.json"
    if path.is_file() and not refresh:
        return json.loads(path.read_text()) | {"cached": True}
    cmd = [sys.executable, "-m", "compare.plan", "--jax-worker", json.dumps({"cfg": cfg.to_dict(),
                                                                              "n": layout.ngpu})]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=Path(__file__).resolve().parents[2])
    except subprocess.TimeoutExpired:
        return {"ok": False, "reason": f"compile timed out after {timeout:.0f}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        res: dict[str, Any] = {"ok": False, "reason": err[:300]}
    else:
        res = json.loads(lines[-1])
    res["wall_s"] = time.perf_counter() - t0
    if res.get("ok") or "Error" in str(res.get("reason", "")):  # deterministic outcomes only
        cache.mkdir(parents=True, exist_ok=True)
        replace_text(path, json.dumps(res, indent=1) + "\n")  # whole or absent for a concurrent reader
    return res


def jax_verdict(res: dict[str, Any], usable: float, err: float) -> dict[str, Any]:
    """``jax_memory``'s result judged against ``usable`` bytes per device with a relative error ``err``:
    jax_verdict fits | OOM | uncertain (the margin within the error) | not compiled, with the figures in GB."""
    if not res.get("ok"):
        return {"jax_verdict": "not compiled", "jax_reason": str(res.get("reason", "?"))[:200],
                "jax_margin_gb": float("nan")}
    peak = float(res["peak_bytes"])
    margin, e = usable - peak, err * peak
    verdict = "uncertain" if abs(margin) <= e else "fits" if margin > 0 else "OOM"
    return {"jax_verdict": verdict, "jax_peak_gb": round(peak / GB, 3), "jax_margin_gb": round(margin / GB, 3),
            "jax_err_gb": round(e / GB, 3), "jax_cached": bool(res.get("cached")), "jax_memory": res["memory"]}


def _jax_worker(spec: str) -> int:
    """Inside the subprocess: N fake CPU devices, build the Trainer, AOT compile, print one JSON line."""
    import resource

    from configs import config_from_dict

    d = json.loads(spec)
    cfg, n = config_from_dict(d["cfg"]), int(d["n"])
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)
    try:
        from jax_impl.sharding import make_mesh
        from jax_impl.trainer import Trainer

        validate_config(cfg, n)
        trainer = Trainer.build(cfg, make_mesh(cfg.mesh_shape(n)))
        t0 = time.perf_counter()
        ma = trainer.compile_step().memory_analysis()
        compile_s = time.perf_counter() - t0
    except Exception as e:  # any failure is reported as "JAX: not available (reason)"
        print(json.dumps({"ok": False, "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:240]}"}))
        return 0
    mem = {k: int(getattr(ma, k + "_size_in_bytes", 0) or 0) for k in ("argument", "output", "alias", "temp")}
    print(json.dumps({"ok": True, "memory": mem, "peak_bytes": mem["argument"] + mem["output"] - mem["alias"]
                      + mem["temp"], "state_bytes": trainer.state_bytes_per_device(), "compile_s": compile_s,
                      "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    return 0


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith(key):
                return int(ln.split()[1]) * 1024
    raise KeyError(key)


def _jax_measure_worker(spec: str) -> int:
    """Inside a subprocess (1 CPU device): compiled memory vs the resident memory the step really uses.

    CPU devices report no ``memory_stats()``, so the process's RSS is the measurement: the baseline is taken
    after a warm-up step (code, thread pools resident), then fresh state is created and the peak RSS
    (VmHWM, reset through /proc/self/clear_refs) of one step is compared to arguments + outputs - aliased + temp.
    """
    import jax
    import numpy as np

    d = json.loads(spec)
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 1)
    from jax_impl.sharding import activate, batch_sharding, make_mesh
    from jax_impl.trainer import Trainer

    cfg = load_config(d["preset"], d.get("overrides", {}))
    tr = Trainer.build(cfg, make_mesh(cfg.mesh_shape(1)))
    comp = tr.compile_step()
    ma = comp.memory_analysis()
    mem = {k: int(getattr(ma, k + "_size_in_bytes", 0) or 0) for k in ("argument", "output", "alias", "temp")}
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, tr.batch_abstract().shape, dtype=np.int32)
    with activate(tr.mesh):
        batch = jax.device_put(tokens, batch_sharding(tr.mesh))
        warm = comp(*tr.init_state(), batch)  # warm-up: code, thread pools and allocator arenas resident
        jax.block_until_ready(warm)
        del warm
        gc.collect()
        time.sleep(0.3)  # buffers are released asynchronously
        base = _proc_status("VmRSS")
        state = tr.init_state()
        jax.block_until_ready(state)
        after_init = _proc_status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter
        jax.block_until_ready(comp(*state, batch))
        hwm = _proc_status("VmHWM")
    # creating the state also leaves the init computation's temporaries resident (random bits, pad copies)
    init_temp = int(tr._init_jit.lower().compile().memory_analysis().temp_size_in_bytes or 0)
    print(json.dumps({"memory": mem, "compiled_peak": mem["argument"] + mem["output"] - mem["alias"] + mem["temp"],
                      "measured_args": after_init - base, "measured_peak": hwm - base, "init_temp": init_temp}))
    return 0


def measure_jax_memory(preset: str, overrides: dict[str, Any] | None = None, timeout: float = 300) -> dict[str, Any]:
    """Compiled vs measured (RSS) memory of one train step on one CPU device, in a fresh subprocess."""
    spec = json.dumps({"preset": preset, "overrides": overrides or {}})
    proc = subprocess.run([sys.executable, "-m", "compare.plan", "--jax-measure", spec], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          cwd=Path(__file__).resolve().parents[2])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measurement failed: {proc.stderr.strip()[-500:]}")
    return json.loads(lines[-1])
