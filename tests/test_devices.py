"""Platform choice (jax_impl/devices.py) in the main stack, which has no Intel plugin: the messages, exactly.

The same cases with the real plugin installed run in tests/aurora_stack (make test-aurora).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from configs import ConfigError, load_config
from jax_impl import devices
from jax_impl.devices import Plugin, Probe
from jax_impl.train import compiled_memory, main

PLUGIN = Plugin("xla_oneapi", "jax-oneapi-pjrt", "0.11.2", "/venv/jax_plugins/xla_oneapi/xla_oneapi_plugin.so")


def test_xpu_without_the_plugin_says_how_to_install_it(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--preset", "tiny", "--mesh", "fsdp=2", "--platform", "xpu", "--dry-run"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--platform xpu needs JAX's Intel GPU plugin, which is not installed in this Python" in err
    assert "make aurora-env" in err and "jax-oneapi-plugin[with-oneapi] 0.11.2" in err


def test_sycl_is_an_alias_of_xpu_with_a_note(capsys):
    cfg = load_config("tiny", {"train.platform": "sycl"})
    assert cfg.train.platform == "xpu"
    assert "--platform sycl is an old spelling of --platform xpu" in capsys.readouterr().err


def test_no_plugin_library_load_errors_name_the_loader():
    missing = Probe(None, None, 0, "libze_loader.so.1: cannot open shared object file: No such file or directory",
                    "libze_loader.so.1: cannot open shared object file: No such file or directory")
    msg = devices.xpu_unavailable(PLUGIN, missing)
    assert msg.startswith("--platform xpu: jax-oneapi-pjrt 0.11.2 is installed but its library does not load: the "
                          "Level Zero loader libze_loader.so.1 is not installed or not on the library path")
    old = Probe("/usr/lib/x86_64-linux-gnu/libze_loader.so.1.8.0", "1.8.0", 0, "zeInit returned 0x78000001",
                "/venv/lib/libur_adapter_level_zero.so.0: undefined symbol: zeDeviceGetRootDevice")
    msg = devices.xpu_unavailable(PLUGIN, old)
    assert ("the Level Zero loader /usr/lib/x86_64-linux-gnu/libze_loader.so.1.8.0 (version 1.8.0) is too old: it "
            "lacks zeDeviceGetRootDevice") in msg


def test_no_device_names_the_visibility_variables(monkeypatch):
    monkeypatch.setenv("ZE_AFFINITY_MASK", "3")
    monkeypatch.delenv("ZE_FLAT_DEVICE_HIERARCHY", raising=False)
    msg = devices.xpu_unavailable(PLUGIN, Probe("/usr/lib64/libze_loader.so.1", "1.32.0", 0, None, None))
    assert msg.startswith("--platform xpu: no Intel GPU is visible (Level Zero found no device; "
                          "ZE_AFFINITY_MASK='3', ZE_FLAT_DEVICE_HIERARCHY unset")
    assert "login nodes have no GPUs" in msg
    assert devices.xpu_unavailable(PLUGIN, Probe("/usr/lib64/libze_loader.so.1", "1.32.0", 12, None, None)) is None


def test_auto_follows_jax_platforms_names(monkeypatch):
    for env, ours in (("oneapi", "xpu"), ("cuda", "gpu"), ("cpu", "cpu"), ("sycl", "xpu")):
        monkeypatch.setenv("JAX_PLATFORMS", env)
        assert devices.detect(note=False) == ours


def test_auto_without_accelerator_plugins_is_cpu(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    assert devices.find_plugin(devices.ONEAPI_ENTRY_POINT) is None  # the main stack has none
    assert devices.detect() == "cpu"


def test_cudnn_attention_refused_on_xpu():
    cfg = load_config("tiny", {"jax.attn_impl": "cudnn", "train.dtype": "bf16"})
    devices.check_config(cfg, "cpu")
    with pytest.raises(ConfigError, match=re.escape("jax.attn_impl=cudnn on --platform xpu: cuDNN fused "
                                                    "attention is NVIDIA-only")):
        devices.check_config(cfg, "xpu")


def test_backend_without_memory_analysis_is_routed_around():
    class NoAnalysis:
        def memory_analysis(self):
            raise RuntimeError("UNIMPLEMENTED: PJRT_Executable_GetCompiledMemoryStats")

    class NoneAnalysis:
        def memory_analysis(self):
            return None

    assert compiled_memory(NoAnalysis()) is None and compiled_memory(NoneAnalysis()) is None


def test_report_refuses_a_trainer_python_that_does_not_run(tmp_path, capsys):
    from compare import report

    code = report.main(["--layouts", "zero1", "--dtype", "fp32", "--torch-python", str(tmp_path / "nope"),
                        "--runs", str(tmp_path / "r"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert f"--torch-python {tmp_path / 'nope'}: not a Python that runs" in capsys.readouterr().err


def test_a_one_device_cpu_process_runs_each_computation_before_returning():
    """With one device, ``configure`` makes XLA:CPU execute inline: a computation's result is ready when the call
    returns, so its temp buffer is freed before the next step allocates one (asynchronous dispatch let two
    steps' temp buffers coexist: +164 MiB per pipeline stage at the bench size, docs/performance.md)."""
    code = (
        "import jax, jax.numpy as jnp\n"
        "from jax_impl import devices\n"
        "devices.configure('cpu', 1)\n"
        "f = jax.jit(lambda x: jax.lax.fori_loop(0, 40, lambda i, y: jnp.tanh(y @ x), x))\n"
        "x = jnp.ones((768, 768)) / 768\n"
        "f(x).block_until_ready()\n"
        "print(sum(f(x).is_ready() for _ in range(5)))\n"
    )
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "5"


def test_cpu_steps_are_scheduled_for_memory():
    """The train step is compiled with XLA:CPU's memory-optimized scheduler; its default (concurrency-optimized)
    keeps more buffers live at once (bench ZeRO-3 over 2 devices: 124 vs 86 MiB of temporaries)."""
    from jax_impl.sharding import make_mesh
    from jax_impl.trainer import Trainer

    cfg = load_config("bench", {"parallel.mesh": "fsdp=2", "parallel.zero": 3})
    tr = Trainer.build(cfg, make_mesh(cfg.mesh_shape()))
    assert devices.compiler_options()["xla_cpu_scheduler_type"] == "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
    ours = tr.compile_step().memory_analysis().temp_size_in_bytes
    default = tr.compile_step(compiler_options={"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_DEFAULT"})
    default_temp = default.memory_analysis().temp_size_in_bytes
    assert ours < 0.85 * default_temp, (ours, default_temp)
