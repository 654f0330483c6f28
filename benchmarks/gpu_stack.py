"""The project's pinned JAX CUDA stack, carried to a GPU machine that cannot download, in parts that fit a call.

    python benchmarks/gpu_stack.py pack                 # here: download the wheels, write .gpu-stack/call-K/
    python3 benchmarks/gpu_stack.py receive             # there, in every call: keep this call's part; install
                                                        # once all parts are in; exit 3 while some are missing

``pack`` downloads (``pip download``, CPython 3.12, manylinux x86-64, no dependencies) the versions
``pyproject.toml`` pins: jax, jaxlib, flax, optax, orbax-checkpoint, and the CUDA extra's
``jax-cuda13-plugin`` / ``jax-cuda13-pjrt`` at jax's version. Together they are ~213 MiB, more than one call to
the GPU machine may carry, so they are written as one tar cut into parts of ``--part-mib`` MiB, one folder
per call (``.gpu-stack/call-1``, ...; git ignores ``.gpu-stack/``), each with the manifest (sizes and sha256);
the wheels stay in ``.gpu-stack/wheels``.

``receive`` runs on the GPU machine at the start of each call that carries a part: it moves the part into
``--stash`` (outside the working tree, so it outlives the call while the machine is held), checks it, and
once every part is there joins them, checks the whole, and installs the wheels into ``--site`` with
``pip install --no-index --no-deps --target``. The packages they need and do not carry (numpy, scipy,
ml_dtypes, the NVIDIA CUDA 13 libraries, msgpack, tensorstore, ...) must be on that machine already.
Then ``export PYTHONPATH=<site>`` puts the pinned stack ahead of the machine's own JAX, and
``receive --check`` prints what Python then imports (versions, JAX's path, the devices) and exits 1 unless it
is the pinned stack on a GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = "manifest.json"
PART = "part"
# what pip may take for CPython 3.12 on the GPU machine (x86-64); pip matches each manylinux tag exactly
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
MISSING_EXIT = 3


def pinned_stack(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """``name==version`` for the JAX stack pyproject.toml pins, with the CUDA extra's plugin and PJRT packages."""
    proj = tomllib.loads(pyproject.read_text())["project"]
    pins = dict(d.split("==", 1) for d in proj["dependencies"] if "==" in d)
    wanted = ["jax", "jaxlib", "flax", "optax", "orbax-checkpoint"]
    missing = [n for n in wanted if n not in pins]
    if missing:
        raise SystemExit(f"pyproject.toml pins no version of {', '.join(missing)}: pin it with '=='")
    (cuda,) = proj["optional-dependencies"]["cuda"]  # "jax[cuda13]==0.10.2"
    extra, version = cuda.split("[", 1)[1].split("]==")
    if version != pins["jax"]:
        raise SystemExit(f"the cuda extra pins jax {version}, the dependencies jax {pins['jax']}: make them equal")
    return [f"{n}=={pins[n]}" for n in wanted] + [f"jax-{extra}-plugin=={version}", f"jax-{extra}-pjrt=={version}"]


def download(specs: list[str], dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    print("$", " ".join(cmd + specs), flush=True)
    subprocess.run(cmd + specs, check=True)
    wheels = sorted(dest.glob("*.whl"))
    names = {w.name.split("-")[0].lower().replace("_", "-") for w in wheels}
    lost = [s for s in specs if s.split("==")[0] not in names]
    if lost:
        raise SystemExit(f"pip download gave no wheel for {', '.join(lost)} in {dest}")
    return wheels


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack(wheels: list[Path], out: Path, part_bytes: int) -> dict:
    """One uncompressed tar of ``wheels`` (already deflated) cut into parts of at most ``part_bytes``, written
    as ``out/call-K/part`` with the manifest beside each; returns the manifest."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for w in wheels:
            tar.add(w, arcname=w.name)
    blob = buf.getvalue()
    chunks = [blob[i:i + part_bytes] for i in range(0, len(blob), part_bytes)]
    manifest = {"wheels": [w.name for w in wheels], "bytes": len(blob), "sha256": sha256(blob),
                "parts": [{"call": k + 1, "bytes": len(c), "sha256": sha256(c)} for k, c in enumerate(chunks)]}
    for old in out.glob("call-*"):  # an earlier pack's parts (the downloaded wheels beside them stay)
        shutil.rmtree(old)
    for k, c in enumerate(chunks, 1):
        d = out / f"call-{k}"
        d.mkdir(parents=True)
        (d / PART).write_bytes(c)
        (d / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def receive(src: Path, stash: Path, site: Path, install=None) -> int:
    """Move the parts under ``src`` (``call-K/``) into ``stash``; once all are there, join, check and install.

    Returns 0 when the stack is installed in ``site``, ``MISSING_EXIT`` while parts are missing.
    """
    stash.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((stash / MANIFEST).read_text()) if (stash / MANIFEST).exists() else None
    for d in sorted(src.glob("call-*")):
        m = json.loads((d / MANIFEST).read_text())
        if manifest is not None and m["sha256"] != manifest["sha256"]:
            raise SystemExit(f"{d} belongs to another pack than the parts before it: carry the parts of one pack "
                             f"(or remove {stash} to start over)")
        manifest = m
        data = (d / PART).read_bytes() if (d / PART).exists() else None
        k = int(d.name.split("-")[1])
        if data is not None:
            want = m["parts"][k - 1]["sha256"]
            if sha256(data) != want:
                raise SystemExit(f"{d / PART}: sha256 {sha256(data)}, the manifest says {want}: carry it again")
            (stash / f"{PART}-{k}").write_bytes(data)
            (d / PART).unlink()
        (stash / MANIFEST).write_text(json.dumps(m))
    if manifest is None:
        raise SystemExit(f"no part under {src} and none received before in {stash}: carry {src.name}/call-1 "
                         "(made by `python benchmarks/gpu_stack.py pack`)")
    n = len(manifest["parts"])
    have = [k for k in range(1, n + 1) if (stash / f"{PART}-{k}").exists()]
    missing = [k for k in range(1, n + 1) if k not in have]
    print(f"gpu_stack: parts {have} of {n} in {stash}", flush=True)
    if missing:
        print(f"gpu_stack: still missing {', '.join(f'call-{k}' for k in missing)}: carry them in the next calls "
              "while this machine is held", flush=True)
        return MISSING_EXIT
    blob = b"".join((stash / f"{PART}-{k}").read_bytes() for k in range(1, n + 1))
    if sha256(blob) != manifest["sha256"]:
        raise SystemExit("the joined parts do not match the manifest's sha256: pack again")
    wheels_dir = stash / "wheels"
    wheels_dir.mkdir(exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(wheels_dir, filter="data")
    wheels = [wheels_dir / w for w in manifest["wheels"]]
    (install or pip_install)(wheels, site)
    print(f"gpu_stack: installed {len(wheels)} wheels into {site}; export PYTHONPATH={site}", flush=True)
    return 0


def pip_install(wheels: list[Path], site: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)], check=True)


def check() -> int:
    """What Python imports with the current PYTHONPATH: versions, where JAX comes from, the devices. Non-zero
    unless that is the pinned stack on a GPU."""
    import importlib.metadata as md

    import jax
    import jaxlib

    info = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "jax_from": str(Path(jax.__file__).parent)}
    for n in ("flax", "optax", "orbax-checkpoint", "jax-cuda13-plugin", "jax-cuda13-pjrt"):
        try:
            info[n] = md.version(n)
        except md.PackageNotFoundError:
            info[n] = None
    try:
        info["devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
    except RuntimeError as e:
        info["devices"] = f"error: {e}"
    print(json.dumps(info), flush=True)
    pins = dict(spec.split("==") for spec in pinned_stack())
    wrong = [f"{n} {info[n]} (pinned {v})" for n, v in pins.items() if info.get(n) != v]
    if not any(str(d).startswith("gpu:") for d in info["devices"]):
        wrong.append(f"no GPU among the devices {info['devices']}")
    if wrong:
        print("gpu_stack: not the pinned stack on a GPU: " + "; ".join(wrong), flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="download the pinned wheels and write the parts")
    p.add_argument("--dir", type=Path, default=ROOT / ".gpu-stack")
    p.add_argument("--part-mib", type=float, default=56.0,
                   help="bytes per call (a call carries at most 64 MiB with the working tree)")
    p.add_argument("--wheels", type=Path, help="use these downloaded wheels instead of downloading")
    r = sub.add_parser("receive", help="on the GPU machine: keep this call's part, install once all are in")
    r.add_argument("--dir", type=Path, default=ROOT / ".gpu-stack")
    r.add_argument("--stash", type=Path, default=Path("/tmp/gpu-stack"))
    r.add_argument("--site", type=Path, default=Path("/tmp/gpu-site"))
    r.add_argument("--check", action="store_true", help="only print what the current PYTHONPATH imports")
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        if args.part_mib <= 0:
            raise SystemExit(f"--part-mib {args.part_mib}: give a positive size, e.g. 56")
        wheels = sorted(args.wheels.glob("*.whl")) if args.wheels else download(pinned_stack(), args.dir / "wheels")
        m = pack(wheels, args.dir, int(args.part_mib * 2**20))
        rel = os.path.relpath(args.dir, ROOT)
        print(f"{len(wheels)} wheels, {m['bytes'] / 2**20:.1f} MiB in {len(m['parts'])} parts under {args.dir}.\n"
              "One call per part, each soon after the last (an idle machine is soon given back); call K carries "
              f"{rel}/call-K and starts with: python3 benchmarks/gpu_stack.py receive --dir {rel}; the last "
              "goes on with: export PYTHONPATH=/tmp/gpu-site; python3 benchmarks/gpu_stack.py receive --check; "
              "python3 benchmarks/gpu_sweep.py ...")
        return 0
    if args.check:
        return check()
    return receive(args.dir, args.stash, args.site)


if __name__ == "__main__":
    sys.exit(main())
