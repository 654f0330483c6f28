"""Backend choice (`--platform auto|cpu|gpu|sycl`) and fake CPU devices; runs before JAX starts.

On CPU, a mesh that asks for N devices gets N host devices (``jax_num_cpu_devices``), so
``--mesh fsdp=96`` runs on a laptop and the same command uses 96 accelerators where they
exist. ``sycl`` is Intel GPUs (Aurora's PVC tiles) through the OpenXLA PJRT plugin
(intel-extension-for-openxla); ``gpu`` is CUDA. Neither accelerator path runs on this
project's CI machines; both only select the platform and fail clearly when it is missing.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

from configs import ConfigError
from configs.hostmem import reuse_host_memory

PLATFORM_NAMES = {"cpu": "cpu", "gpu": "cuda", "xpu": "oneapi"}

# XLA:CPU compile options for the train step (measured in docs/performance.md). YNNPACK takes only
# single dots: inside a scanned layer loop its fused reductions ran the softmax backward's row sums
# ~10x slower than XLA's own loop emitter (-8 % fp32 / -14 % bf16 step time, bench preset, scan);
# with the layers unrolled the difference is within this machine's noise, and XLA's temp memory -6 %.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def compiler_options() -> dict[str, str] | None:
    """Backend-specific XLA options for the train step: CPU's above, none for GPU/XPU."""
    import jax

    return dict(CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else None


def _has_plugin(*names: str) -> bool:
    eps = importlib.metadata.entry_points(group="jax_plugins")
    found = {ep.name for ep in eps} | {ep.value.split(":")[0] for ep in eps}
    return any(n in f for n in names for f in found) or any(importlib.util.find_spec(n) for n in names)


def detect() -> str:
    """The platform `auto` resolves to: an installed accelerator plugin, else cpu."""
    env = os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip()
    if env:
        return {"cuda": "gpu"}.get(env, env)
    if _has_plugin("jax_cuda12_plugin", "jax_cuda13_plugin"):
        return "gpu"
    if _has_plugin("intel_extension_for_openxla"):
        return "sycl"
    return "cpu"


def backends_started() -> bool:
    try:
        from jax._src import xla_bridge
        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):
        return False


def configure(platform: str, n_devices: int | None) -> str:
    """Select the JAX platform and, on CPU, make ``n_devices`` host devices. Returns the platform."""
    platform = detect() if platform == "auto" else platform
    if platform not in PLATFORM_NAMES:
        raise ConfigError(f"--platform {platform!r} is not one of auto, cpu, gpu, sycl")
    if platform == "xpu" and not _has_plugin("xla_oneapi"):
        raise ConfigError(
            "--platform sycl needs Intel's OpenXLA PJRT plugin: pip install -e '.[xpu]' on an Aurora compute node "
            "(intel-extension-for-openxla with a matching jax; see README 'Aurora')"
        )
    if platform == "gpu" and not _has_plugin("jax_cuda12_plugin", "jax_cuda13_plugin"):
        raise ConfigError("--platform gpu needs jax's CUDA plugin: pip install -e '.[cuda]'")
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
        reuse_host_memory()  # XLA:CPU's per-step buffers stay mapped (configs.hostmem)
    if platform == "cpu" and n_devices:
        # never lower a count someone already asked for (e.g. a test session's 8 devices)
        jax.config.update("jax_num_cpu_devices", max(n_devices, jax.config.jax_num_cpu_devices))
    return platform
