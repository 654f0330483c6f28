"""A/B of two source trees on the multi-process pipeline step: each stage in its own process, over gloo.

    python benchmarks/ab_processes.py --a /tmp/before --b .                  # pp2 fp32, head last, 3 rounds
    python benchmarks/ab_processes.py --a /tmp/before --b . --dtype bf16 --set parallel.pipeline_repeats=2

``benchmarks/ab_step.py`` compares variants inside one process; a pipeline whose stages run as separate
processes (how ``compare.report`` runs ``pp2-zero1``) needs separate processes per variant. Each round runs
A then B: ``--processes`` workers per variant import the project from that tree, join ``jax.distributed``,
compile the trainer's step and time ``--steps`` steps; the median after 2 warm-up steps is printed per round,
with B/A. Make tree A with e.g. ``git worktree add /tmp/before HEAD~1``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(args.src).resolve()))
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.processes,
                               process_id=args.process_id)
    from aurora_data import SyntheticSource, global_batch
    from configs import load_config
    from jax_impl.sharding import batch_sharding, make_mesh
    from jax_impl.trainer import Trainer

    overrides = {"parallel.mesh": args.mesh, "parallel.zero": 1, "parallel.gas": args.gas,
                 "parallel.pipeline_head": "last", "train.dtype": args.dtype}
    overrides.update(kv.split("=", 1) for kv in args.set)
    cfg = load_config(args.preset, overrides)
    mesh = make_mesh(cfg.mesh_shape())
    trainer = Trainer.build(cfg, mesh)
    params, opt = trainer.init_state()
    step = trainer.compile_step()
    p = cfg.parallel
    host = global_batch(SyntheticSource(cfg.model.vocab_size, cfg.data.seq_len), 0, p.mbs, p.gas,
                        mesh.shape["data"] * mesh.shape["fsdp"])
    batch = jax.make_array_from_callback(host.shape, batch_sharding(mesh), lambda idx: host[idx])
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        params, opt, metrics = step(params, opt, batch)
        metrics["loss"].block_until_ready()
        times.append(time.perf_counter() - t)
    if jax.process_index() == 0:
        print(f"RESULT {statistics.median(times[2:]) * 1e3:.1f} {float(metrics['loss']):.6f}", flush=True)


def run_variant(src: str, args: argparse.Namespace) -> tuple[float, float]:
    """Median step ms and last loss of one multi-process run of tree ``src``."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--worker", "--src", src, "--coordinator", f"127.0.0.1:{port}",
           "--processes", str(args.processes), "--mesh", args.mesh, "--gas", str(args.gas), "--dtype", args.dtype,
           "--preset", args.preset, "--steps", str(args.steps), *(f"--set={kv}" for kv in args.set)]
    procs = [subprocess.Popen([*cmd, "--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(args.processes)]
    outs = [proc.communicate()[0] for proc in procs]
    for i, (proc, out) in enumerate(zip(procs, outs, strict=True)):
        if proc.returncode:
            raise SystemExit(f"process {i} of tree {src} exited {proc.returncode}:\n{out[-3000:]}")
    line = next(ln for ln in outs[0].splitlines() if ln.startswith("RESULT "))
    ms, loss = line.split()[1:]
    return float(ms), float(loss)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", help="source tree A (the project root of the baseline)")
    ap.add_argument("--b", help="source tree B")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--mesh", default="pipeline=2,data=1")
    ap.add_argument("--gas", type=int, default=4)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--set", action="append", default=[], help="extra override k=v (repeatable)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--coordinator", help=argparse.SUPPRESS)
    ap.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if not (args.a and args.b):
        ap.error("--a and --b (two source trees) are required")
    for tree in (args.a, args.b):
        if not (Path(tree) / "jax_impl" / "pipeline.py").is_file():
            ap.error(f"--a/--b {tree!r} is not a project tree (no jax_impl/pipeline.py); make one with "
                     "`git worktree add DIR REV`")
    print(f"{args.mesh} {args.dtype} GAS {args.gas}, {args.processes} processes, median of {args.steps - 2} steps")
    ratios = []
    for r in range(args.rounds):
        (a_ms, a_loss), (b_ms, b_loss) = run_variant(args.a, args), run_variant(args.b, args)
        ratios.append(b_ms / a_ms)
        print(f"round {r + 1}: A {a_ms:7.1f} ms  B {b_ms:7.1f} ms  B/A {b_ms / a_ms:.3f}   "
              f"(last loss A {a_loss:.6f}, B {b_loss:.6f})", flush=True)
    print(f"B/A median {statistics.median(ratios):.3f}  (< 1: B faster)")


if __name__ == "__main__":
    main()
