"""The Intel-GPU JAX stack (jax 0.11.2 + jax-oneapi-plugin, .venv-aurora) on CPU: `make test-aurora`.

Runs only under that environment (the fixture fails elsewhere, naming the command). What can be real here
is: the plugin installed with no Level Zero loader (this machine has none), with Debian 12's loader (too
old for the plugin; `make aurora-old-loader` unpacks it), `--platform cpu`/`auto` training with losses equal
to the main stack's (jax 0.10.2), and the cross-stack parity report. No Intel GPU: the "no devices" message
is checked on the real probe's zero count and on JAX's real error text.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jax_impl import devices

pytestmark = pytest.mark.aurora_stack

ROOT = Path(__file__).resolve().parents[2]
MAIN_PYTHON = ROOT / ".venv" / "bin" / "python"
OLD_LOADER = ROOT / ".venv-aurora" / "opt" / "libze1-debian" / "usr" / "lib" / "x86_64-linux-gnu"
# JAX's words when the plugin loads but sees no GPU (jax 0.11.2 with Level Zero loader 1.32, no device)
NO_DEVICE_ERROR = "Unable to initialize backend 'oneapi': FAILED_PRECONDITION: No visible GPU devices"


@pytest.fixture(scope="module", autouse=True)
def stack():
    plugin = devices.find_plugin(devices.ONEAPI_ENTRY_POINT)
    if plugin is None:
        pytest.fail(f"the Intel-GPU stack is not installed in {sys.executable}: run `make test-aurora`")
    return plugin


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "LD_LIBRARY_PATH")}
    return {**env, "WANDB_MODE": "disabled", **extra}


def _train(python: Path | str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "jax_impl.train", *args], cwd=ROOT, env=env or _env(),
                          capture_output=True, text=True, timeout=600)


def _system_has_loader() -> bool:
    r = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True)
    return "libze_loader.so.1" in r.stdout


def test_versions_are_the_pinned_ones(stack):
    import flax
    import jax

    assert jax.__version__ == "0.11.2" and stack.version == "0.11.2"
    assert importlib.metadata.version("jax-oneapi-plugin") == "0.11.2"
    assert flax.__version__ == "0.12.12"


def test_xpu_without_a_level_zero_loader_names_the_loader():
    if _system_has_loader():
        pytest.skip("this machine has a system Level Zero loader: the missing-loader case cannot be made here")
    r = _train(sys.executable, "--preset", "tiny", "--mesh", "fsdp=2", "--platform", "xpu", "--dry-run")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "jax-oneapi-pjrt 0.11.2 is installed but its library does not load" in r.stderr
    assert "the Level Zero loader libze_loader.so.1 is not installed or not on the library path" in r.stderr
    assert "Traceback" not in r.stderr


def test_xpu_with_debian_12_loader_says_it_is_too_old():
    if not OLD_LOADER.is_dir():
        pytest.fail(f"{OLD_LOADER} missing: `make aurora-old-loader` unpacks Debian's libze1 there")
    r = _train(sys.executable, "--preset", "tiny", "--mesh", "fsdp=2", "--platform", "xpu", "--dry-run",
               env=_env(LD_LIBRARY_PATH=str(OLD_LOADER)))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "is too old: it lacks zeDeviceGetRootDevice" in r.stderr
    assert f"{OLD_LOADER}/libze_loader.so.1.8" in r.stderr and "(version 1.8" in r.stderr
    assert "Traceback" not in r.stderr


def test_no_device_message_from_the_real_probe_and_the_real_error(stack):
    if not OLD_LOADER.is_dir():
        pytest.fail(f"{OLD_LOADER} missing: `make aurora-old-loader` unpacks Debian's libze1 there")
    code = ("import json, dataclasses; from jax_impl import devices as d; "
            "print(json.dumps(dataclasses.asdict(d.probe('oneapi', None))))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(LD_LIBRARY_PATH=str(OLD_LOADER)),
                       capture_output=True, text=True, timeout=120)
    seen = devices.Probe(**json.loads(r.stdout.splitlines()[-1]))
    assert seen.loader and seen.devices == 0 and seen.error.startswith("zeInit returned 0x78000001")
    # the same probe as a loader the plugin accepts would give it (the plugin loads, no GPU)
    msg = devices.xpu_unavailable(stack, devices.Probe(seen.loader, "1.32.0", 0, seen.error, None))
    assert msg.startswith("--platform xpu: no Intel GPU is visible (zeInit returned 0x78000001")
    assert "login nodes have no GPUs" in msg and "ZE_AFFINITY_MASK" in msg
    msg = devices.translate_backend_error("xpu", RuntimeError(NO_DEVICE_ERROR))
    assert msg.startswith("--platform xpu: no Intel GPU is visible to the oneapi plugin") and NO_DEVICE_ERROR in msg


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mesh", ["fsdp=8", "data=2,fsdp=2,tensor=2"])
def test_cpu_and_auto_train_as_the_main_stack_does(mesh, tmp_path):
    if not MAIN_PYTHON.exists():
        pytest.fail(f"{MAIN_PYTHON} missing: `make test` builds the main stack first")
    common = ("--preset", "tiny", "--mesh", mesh, "--steps", "4", "--quiet", "--out-dir", str(tmp_path))
    runs = {}
    for name, python, platform in (("main", MAIN_PYTHON, "cpu"), ("cpu", sys.executable, "cpu"),
                                   ("auto", sys.executable, "auto")):
        r = _train(python, *common, "--platform", platform, "--name", name)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "Traceback" not in r.stderr and "Jax plugin configuration error" not in r.stderr
        runs[name] = r
    assert "note: --platform auto: using cpu; jax-oneapi-pjrt 0.11.2 is installed" in runs["auto"].stderr
    assert _losses(tmp_path / "cpu") == _losses(tmp_path / "main") == _losses(tmp_path / "auto")
    meta = json.loads((tmp_path / "auto" / "meta.json").read_text())
    stack = meta["platform_stack"]
    assert meta["platform"] == "cpu" and stack["jax"] == "0.11.2"
    assert stack["jax-oneapi-pjrt"] == "0.11.2" and stack["jax-oneapi-plugin"] == "0.11.2"
    assert "level_zero_loader_version" in stack and stack["level_zero_devices"] == 0


def test_parity_report_across_the_two_stacks(tmp_path):
    """JAX on this stack, DeepSpeed on the main one (this environment has no torch), from the same init."""
    r = subprocess.run([sys.executable, "-m", "compare.report", "--preset", "tiny", "--layouts", "zero1,zero3",
                        "--dtype", "fp32", "--steps", "6", "--assert", "--torch-python", str(MAIN_PYTHON),
                        "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")],
                       cwd=ROOT, env=_env(JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {k: v["parity"]["pass"] for k, v in report["layouts"].items()} == {"zero1/fp32": True, "zero3/fp32": True}
    jax_meta = json.loads((tmp_path / "runs" / "zero1-fp32-jax" / "meta.json").read_text())
    assert jax_meta["jax"] == "0.11.2"
