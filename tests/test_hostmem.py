"""configs.hostmem: both trainers' processes keep their freed host buffers mapped (no fresh page faults)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# In a fresh process: optionally apply reuse_host_memory, then malloc/touch/free a 64 MiB block from a
# worker thread (as XLA's executor threads do) three times; print the minor page faults of the last two.
PROBE = """
import ctypes, json, resource, sys, threading
from configs import hostmem
applied = hostmem.reuse_host_memory() if sys.argv[1] == "reuse" else False
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 64 << 20

def cycle():
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)

def worker(out):
    cycle()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cycle(); cycle()
    out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)

out = []
t = threading.Thread(target=worker, args=(out,)); t.start(); t.join()
print(json.dumps({"applied": applied, "faults": out[0]}))
"""


def _probe(mode: str, env: dict | None = None) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_reused_host_buffers_are_not_faulted_in_again():
    pages = (64 << 20) // 4096
    default = _probe("default")
    reused = _probe("reuse")
    assert default["applied"] is False and reused["applied"] is True
    # glibc's default hands the 64 MiB block back to the OS after each free: two cycles fault it in twice
    assert default["faults"] > pages
    # with reuse the pages stay mapped: no fresh faults at all (a few for Python's own allocations)
    assert reused["faults"] < pages // 20


def test_host_malloc_opt_out():
    assert _probe("reuse", {"AURORA_HOST_MALLOC": "system"})["applied"] is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_jax_train_applies_it_on_cpu_and_records_it(tmp_path):
    r = subprocess.run([sys.executable, "-m", "jax_impl.train", "--preset", "tiny", "--mesh", "data=2", "--steps", "1",
                        "--out-dir", str(tmp_path), "--name", "r", "--wandb", "disabled", "--quiet"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "r" / "meta.json").read_text())["host_malloc_reuse"] is True
