"""Generated Aurora job scripts run under a fake PBS: mpiexec and module replaced by scripts that report."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from scripts.aurora import launch

JAX_70B = ["--trainer", "jax", "--nodes", "8", "-A", "MyProject", "--preset", "llama2-70b", "--mesh", "data=8,fsdp=12",
           "--parallel.hpz=true", "--ckpt-every", "100", "--print-only"]
TORCH_70B = ["--trainer", "torch", "--nodes", "8", "-A", "MyProject", "--preset", "llama2-70b", "--mesh",
             "data=8,fsdp=12", "--zero", "3", "--parallel.hpz=true", "--print-only"]


def fake_bin(tmp_path: Path, module_rc: int = 0) -> Path:
    """mpiexec prints its arguments and a few variables, then exits with the next code of $FAKE_RCS (a file of
    one exit code per line, consumed one per call; 0 when empty); module exits ``module_rc``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mpiexec").write_text(
        '#!/bin/bash\necho "MPIEXEC $*"\n'
        'echo "ENV MASTER_ADDR=$MASTER_ADDR WORLD_SIZE=$WORLD_SIZE LOCAL_WORLD_SIZE=$LOCAL_WORLD_SIZE '
        'ZE=$ZE_FLAT_DEVICE_HIERARCHY CCL=$CCL_PROCESS_LAUNCHER VENV=$VIRTUAL_ENV"\n'
        'rc=0\nif [ -n "${FAKE_RCS:-}" ] && [ -s "$FAKE_RCS" ]; then rc=$(head -n 1 "$FAKE_RCS"); '
        'sed -i 1d "$FAKE_RCS"; fi\nexit "$rc"\n')
    (bin_dir / "module").write_text(f"#!/bin/bash\necho MODULE $*\nexit {module_rc}\n")
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def fake_pbs(tmp_path: Path, nodes: int = 8, venv: str | None = ".venv-aurora", module_rc: int = 0
             ) -> dict[str, str]:
    """The environment PBS would give the job script, with mpiexec/module faked and a fake venv."""
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("".join(f"x4102c{i}s0b0n0\n" for i in range(nodes)))
    if venv:
        (tmp_path / venv / "bin").mkdir(parents=True, exist_ok=True)
        (tmp_path / venv / "bin" / "activate").write_text(f'export VIRTUAL_ENV="{tmp_path / venv}"\n')
    return {"PATH": f"{fake_bin(tmp_path, module_rc)}:{os.environ['PATH']}", "PBS_NODEFILE": str(nodefile),
            "PBS_O_WORKDIR": str(tmp_path), "HOME": str(tmp_path)}


def write_script(tmp_path: Path, argv: list[str]) -> Path:
    script = tmp_path / "job.pbs"
    launch.main([a for a in argv if a != "--print-only"] + ["--out", str(script)])
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    return script
