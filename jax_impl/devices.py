"""The JAX platform (`--platform auto|cpu|gpu|xpu`), chosen before JAX starts, and fake CPU devices.

``xpu`` is Intel GPUs (Aurora's PVC tiles) through JAX's own plugin, ``jax-oneapi-pjrt`` /
``jax-oneapi-plugin`` (backend ``oneapi``, found as JAX finds it: the ``xla_oneapi`` entry point of the
``jax_plugins`` group); ``gpu`` is CUDA; ``cpu`` fakes as many host devices as the mesh needs. ``auto``
looks for *devices*, not only for an installed plugin: a child process asks the Level Zero loader (or
the CUDA driver) how many GPUs it sees, so a login node with the plugin installed and no GPU gets CPU,
with a note saying why. An explicit ``xpu`` that cannot be had fails with one message per cause: the
plugin is not installed, its library does not load (no or too old Level Zero loader), or no Intel GPU is
visible. The probe runs in a child process so that no GPU driver is initialised in the trainer before
the plugin does it. Nothing here has run on an Intel GPU; on this project's CPU machines the plugin is
installed and each failure case runs for real (tests/aurora_stack).
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from configs import ConfigError
from runtime.hostmem import reuse_host_memory

PLATFORM_NAMES = {"cpu": "cpu", "gpu": "cuda", "xpu": "oneapi"}  # ours -> JAX's platform name
ONEAPI_ENTRY_POINT = "xla_oneapi"  # registered by the jax-oneapi-pjrt wheel
CUDA_ENTRY_POINTS = ("xla_cuda13", "xla_cuda12")

# XLA:CPU compile options for the train step (measured in docs/performance.md). YNNPACK takes only
# single dots: inside a scanned layer loop its fused reductions ran the softmax backward's row sums
# ~10x slower than XLA's own loop emitter (-8 % fp32 / -14 % bf16 step time, bench preset, scan);
# with the layers unrolled the difference is within this machine's noise, and XLA's temp memory -6 %.
# XLA:CPU's default scheduler orders the program for concurrency between independent ops; the memory-optimized
# one keeps fewer buffers live at a time: bench XLA temp -8 to -31 %, the 70B plans 1.6-7.1 GiB lower per device,
# the same step time and bit-identical losses (docs/memory.md, lever 8).
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
                        "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}

# Features of the JAX path the oneapi plugin lacks or that are CUDA-only: refused on xpu with these words.
XPU_UNSUPPORTED = {
    ("jax.attn_impl", "cudnn"): "cuDNN fused attention is NVIDIA-only; use jax.attn_impl=xla on xpu",
}


def compiler_options() -> dict[str, str] | None:
    """Backend-specific XLA options for the train step: CPU's above, none for GPU/XPU."""
    import jax

    return dict(CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else None


@dataclass(frozen=True)
class Plugin:
    """An installed PJRT plugin, as JAX discovers it (a ``jax_plugins`` entry point)."""

    entry_point: str
    distribution: str
    version: str
    library: str | None  # the plugin's shared library, as installed


def find_plugin(*entry_points: str) -> Plugin | None:
    """The first installed plugin among these ``jax_plugins`` entry-point names."""
    for ep in importlib.metadata.entry_points(group="jax_plugins"):
        if ep.name not in entry_points:
            continue
        dist = ep.dist
        lib = next((f for f in (dist.files or []) if f.name.endswith("_plugin.so")), None) if dist else None
        return Plugin(ep.name, dist.name if dist else "?", dist.version if dist else "?",
                      str(dist.locate_file(lib)) if dist and lib else None)
    return None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# The probe runs in a child process: it loads the Level Zero loader / CUDA driver and the plugin library
# with ctypes (RTLD_NOW, so a missing symbol shows), counts GPUs and prints one JSON line.
_PROBE = r"""
import ctypes, json, sys
kind, plugin = sys.argv[1], sys.argv[2]
out = {"loader": None, "loader_version": None, "devices": 0, "error": None, "plugin_error": None}

def loaded_path(stem):
    for line in open("/proc/self/maps"):
        if stem in line and "/" in line:
            return line.split(None, 5)[-1].strip()

if kind == "oneapi":
    try:
        ze = ctypes.CDLL("libze_loader.so.1")
        out["loader"] = loaded_path("libze_loader.so")
    except OSError as e:
        out["error"] = str(e)
    if out["loader"]:
        class Ver(ctypes.Structure):
            _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int)]
        class Comp(ctypes.Structure):
            _fields_ = [("name", ctypes.c_char * 64), ("spec", ctypes.c_uint32), ("lib", Ver)]
        try:
            n = ctypes.c_size_t(0)
            if ze.zelLoaderGetVersions(ctypes.byref(n), None) == 0 and n.value:
                comps = (Comp * n.value)()
                ze.zelLoaderGetVersions(ctypes.byref(n), comps)
                for c in comps:
                    if c.name == b"loader":
                        out["loader_version"] = f"{c.lib.major}.{c.lib.minor}.{c.lib.patch}"
        except AttributeError:
            pass
        rc = ze.zeInit(ctypes.c_uint32(0))
        if rc != 0:
            out["error"] = f"zeInit returned {rc:#x}" + (
                " (no Level Zero driver found: no Intel GPU driver, or no GPU)" if rc == 0x78000001 else "")
        else:
            nd = ctypes.c_uint32(0)
            ze.zeDriverGet(ctypes.byref(nd), None)
            drivers = (ctypes.c_void_p * nd.value)()
            ze.zeDriverGet(ctypes.byref(nd), drivers)
            for d in drivers:
                m = ctypes.c_uint32(0)
                ze.zeDeviceGet(ctypes.c_void_p(d), ctypes.byref(m), None)
                out["devices"] += m.value
elif kind == "cuda":
    try:
        cu = ctypes.CDLL("libcuda.so.1")
        n = ctypes.c_int(0)
        rc = cu.cuInit(0)
        if rc == 0 and cu.cuDeviceGetCount(ctypes.byref(n)) == 0:
            out["devices"] = n.value
        else:
            out["error"] = f"cuInit returned {rc}"
    except OSError as e:
        out["error"] = str(e)
if plugin:
    try:
        ctypes.CDLL(plugin)
    except OSError as e:
        out["plugin_error"] = str(e)
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Probe:
    """What a child process saw: the driver loader, its version, the GPUs, and whether the plugin loads."""

    loader: str | None
    loader_version: str | None
    devices: int
    error: str | None  # why no device was counted
    plugin_error: str | None  # the plugin library's load error (missing library or symbol)


@functools.cache
def probe(kind: str, plugin_library: str | None) -> Probe:
    """Ask a child process (``kind``: oneapi or cuda) how many GPUs it sees and whether the plugin loads."""
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE, kind, plugin_library or ""], capture_output=True,
                           text=True, timeout=120)
        d = json.loads(r.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError) as e:
        d = {"loader": None, "loader_version": None, "devices": 0, "error": f"the device probe failed: {e}",
             "plugin_error": None}
    if d["loader"] and not d["loader_version"]:  # loaders before zelLoaderGetVersions: the file name has it
        m = re.search(r"\.so\.(\d+\.\d+\.\d+)$", d["loader"])
        d["loader_version"] = m.group(1) if m else None
    return Probe(**d)


def _ze_env() -> str:
    names = ("ZE_AFFINITY_MASK", "ZE_FLAT_DEVICE_HIERARCHY", "ONEAPI_DEVICE_SELECTOR")
    return ", ".join(f"{n}={os.environ[n]!r}" if n in os.environ else f"{n} unset" for n in names)


def xpu_unavailable(plugin: Plugin | None, pr: Probe | None) -> str | None:
    """Why ``--platform xpu`` cannot be had (one message per cause, naming the fix), or None when it can."""
    if plugin is None:
        return ("--platform xpu needs JAX's Intel GPU plugin, which is not installed in this Python "
                f"({sys.executable}): build the Aurora environment with `make aurora-env` and run from "
                ".venv-aurora (jax 0.11.2 + jax-oneapi-plugin[with-oneapi] 0.11.2, Python >= 3.12; docs/aurora.md)")
    assert pr is not None
    if pr.plugin_error:
        err = pr.plugin_error
        if "libze_loader" in err and "cannot open" in err:
            why = ("the Level Zero loader libze_loader.so.1 is not installed or not on the library path; it comes "
                   "with the Intel GPU driver (on Aurora compute nodes: /usr/lib64)")
        elif "undefined symbol" in err:
            sym = err.rsplit("undefined symbol:", 1)[-1].strip()
            why = (f"the Level Zero loader{' ' + pr.loader if pr.loader else ''} (version "
                   f"{pr.loader_version or 'unknown'}) is too old: it lacks {sym}; the plugin's oneAPI 2025.1 "
                   "runtime needs a current loader (1.2x or newer)")
        else:
            why = "a library it needs does not load"
        return (f"--platform xpu: {plugin.distribution} {plugin.version} is installed but its library does not "
                f"load: {why}. The loader's error: {err}")
    if pr.devices == 0:
        return (f"--platform xpu: no Intel GPU is visible ({pr.error or 'Level Zero found no device'}; "
                f"{_ze_env()}). On Aurora, login nodes have no GPUs: run on a compute node (qsub), or plan there "
                "with --platform cpu; check that ZE_AFFINITY_MASK does not hide the tiles")
    return None


def translate_backend_error(platform: str, err: BaseException) -> str:
    """The message for a JAX backend that failed to start on a device the probe could not rule out."""
    text = str(err)
    if platform == "xpu" and "No visible GPU devices" in text:
        return (f"--platform xpu: no Intel GPU is visible to the oneapi plugin ({_ze_env()}): on Aurora, login "
                "nodes have no GPUs; run on a compute node, or plan with --platform cpu. JAX said: " + text)
    return f"--platform {platform}: JAX could not start its {PLATFORM_NAMES.get(platform, platform)} backend: {text}"


def detect(note: bool = True) -> str:
    """The platform ``auto`` resolves to: an accelerator whose plugin loads and that has devices, else cpu."""
    env = os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip()
    if env:
        return {"cuda": "gpu", "oneapi": "xpu", "sycl": "xpu"}.get(env, env)
    cuda = find_plugin(*CUDA_ENTRY_POINTS)
    if cuda is not None and probe("cuda", None).devices > 0:
        return "gpu"
    one = find_plugin(ONEAPI_ENTRY_POINT)
    if one is not None:
        why = xpu_unavailable(one, probe("oneapi", one.library))
        if why is None:
            return "xpu"
        if note:
            print(f"note: --platform auto: using cpu; {why.split(': ', 1)[1]}", file=sys.stderr)
    return "cpu"


def backends_started() -> bool:
    try:
        from jax._src import xla_bridge
        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):
        return False


class _QuietPluginErrors(logging.Filter):
    """On cpu, a plugin that cannot load is irrelevant: drop JAX's traceback for it (the choice was ours)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Jax plugin configuration error" not in record.getMessage()


def configure(platform: str, n_devices: int | None) -> str:
    """Select the JAX platform and, on CPU, make ``n_devices`` host devices. Returns the platform."""
    platform = {"sycl": "xpu"}.get(platform, platform)
    platform = detect() if platform == "auto" else platform
    if platform not in PLATFORM_NAMES:
        raise ConfigError(f"--platform {platform!r} is not one of auto, cpu, gpu, xpu")
    if platform == "xpu":
        plugin = find_plugin(ONEAPI_ENTRY_POINT)
        why = xpu_unavailable(plugin, probe("oneapi", plugin.library) if plugin else None)
        if why:
            raise ConfigError(why)
    if platform == "gpu" and find_plugin(*CUDA_ENTRY_POINTS) is None:
        raise ConfigError("--platform gpu needs JAX's CUDA plugin: pip install -e '.[cuda]' (docs/aurora.md has the "
                          "accelerator stacks)")
    if platform == "cpu" and find_plugin(ONEAPI_ENTRY_POINT, *CUDA_ENTRY_POINTS) is not None:
        logging.getLogger("jax._src.xla_bridge").addFilter(_QuietPluginErrors())
    import jax

    if backends_started():
        have = jax.device_count()
        if n_devices and have < n_devices:
            raise ConfigError(
                f"JAX already started with {have} devices but the mesh needs {n_devices}; "
                "run in a fresh process (the trainer then creates them) or shrink the mesh"
            )
        return platform
    jax.config.update("jax_platforms", PLATFORM_NAMES[platform])
    if platform == "cpu":
        reuse_host_memory()  # XLA:CPU's per-step buffers stay mapped (runtime.hostmem)
        # a one-device process (a pipeline stage) runs each step inline: dispatched asynchronously, a step's
        # outputs were ready before its temp buffer was freed, and the next step, dispatched in between,
        # allocated a second one (+164 MiB RSS per stage at the bench size, bf16, docs/performance.md). The loop
        # waits for every step's loss anyway; several devices in one process are always dispatched async.
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    if platform == "cpu" and n_devices:
        # never lower a count someone already asked for (e.g. a test session's 8 devices)
        jax.config.update("jax_num_cpu_devices", max(n_devices, jax.config.jax_num_cpu_devices))
    return platform


def start(platform: str) -> int:
    """Start JAX's backend (after ``jax.distributed`` joined, if it does); its failure becomes a ConfigError."""
    import jax

    try:
        return jax.device_count()
    except RuntimeError as e:
        raise ConfigError(translate_backend_error(platform, e)) from None


def check_config(cfg: Any, platform: str) -> None:
    """Refuse what the chosen platform cannot run, before anything compiles."""
    if platform != "xpu":
        return
    for (key, value), why in XPU_UNSUPPORTED.items():
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) == value:
            raise ConfigError(f"{key}={value} on --platform xpu: {why}")


def stack_info(platform: str) -> dict[str, Any]:
    """For meta.json: the JAX stack, and on a machine with the Intel plugin its versions and the loader's."""
    import jax
    import jaxlib

    info: dict[str, Any] = {"platform": platform, "jax": jax.__version__, "jaxlib": jaxlib.__version__}
    one = find_plugin(ONEAPI_ENTRY_POINT)
    if one is not None:
        pr = probe("oneapi", one.library)
        info.update({"jax-oneapi-pjrt": one.version, "jax-oneapi-plugin": _version("jax-oneapi-plugin"),
                     "level_zero_loader": pr.loader, "level_zero_loader_version": pr.loader_version,
                     "level_zero_devices": pr.devices})
    cuda = find_plugin(*CUDA_ENTRY_POINTS)
    if cuda is not None:
        info[cuda.distribution] = cuda.version
    return info

