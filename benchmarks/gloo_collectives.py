"""Wall time of XLA:CPU's cross-process collectives (gloo) between processes on this machine.

    python benchmarks/gloo_collectives.py                          # 2 processes; (256, 512) and (2, 256) fp32
    python benchmarks/gloo_collectives.py --shape 1,256,512 --reps 50

Each of ``--processes`` processes holds one CPU device and joins ``jax.distributed`` with gloo collectives the
way the trainer's multi-process CPU runs do (launcher variables read by ``jax_impl.distributed.detect``, then its
``initialize``). Each op -- psum, all_gather, psum_scatter,
ppermute (a ring shift) -- runs in its own jitted ``shard_map`` on a per-process block of ``--shape``, ``--reps``
times after 3 warm-up calls; process 0 prints the median and the largest wall time of one call.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPS = ("psum", "all_gather", "psum_scatter", "ppermute")


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: comma-separated sizes, e.g. 256,512") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: every size must be >= 1")
    return shape


def worker(info, shapes: list[tuple[int, ...]], reps: int) -> None:
    """One process (``info``: its ``jax_impl.distributed.DistInfo``): time every op on every shape; process 0
    prints."""
    from jax_impl import distributed

    distributed.initialize(info, "cpu")
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    n, rank = info.num_processes, info.process_id
    mesh = jax.make_mesh((n,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    bodies = {
        "psum": lambda x: jax.lax.psum(x, "x"),
        "all_gather": lambda x: jax.lax.all_gather(x, "x", tiled=True),
        "psum_scatter": lambda x: jax.lax.psum_scatter(x, "x", tiled=True),
        "ppermute": lambda x: jax.lax.ppermute(x, "x", [(i, (i + 1) % n) for i in range(n)]),
    }
    for shape in shapes:
        block = np.ones(shape, np.float32)
        x = jax.make_array_from_callback((n * shape[0], *shape[1:]), NamedSharding(mesh, P("x")),
                                         lambda _, b=block: b)
        for op in OPS:
            f = jax.jit(jax.shard_map(bodies[op], mesh=mesh, in_specs=P("x"), out_specs=P("x"), check_vma=False))
            for _ in range(3):
                jax.block_until_ready(f(x))
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                jax.block_until_ready(f(x))
                times.append(time.perf_counter() - t)
            if rank == 0:
                print(f"{op:13s} {'x'.join(map(str, shape)):>12s} fp32  median {np.median(times) * 1e3:8.3f} ms"
                      f"  max {max(times) * 1e3:8.3f} ms", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--shape", type=_shape, action="append", help="per-process block (repeatable); default "
                    "256,512 and 2,256")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--timeout", type=int, default=600, help="seconds for the whole run")
    args = ap.parse_args(argv)
    if args.processes < 2:
        ap.error(f"--processes {args.processes}: a cross-process collective needs at least 2")
    shapes = args.shape or [(256, 512), (2, 256)]
    for shape in shapes:
        if shape[0] % args.processes:
            raise SystemExit(f"--shape {','.join(map(str, shape))}: psum_scatter splits the first size over "
                             f"{args.processes} processes; make it a multiple of {args.processes}")
    from jax_impl import distributed
    from runtime import procgroup

    info = distributed.detect()
    if info is not None:  # started below, as one of the group
        worker(info, shapes, args.reps)
        return

    # the launcher variables jax_impl.distributed.detect reads (as compare.report starts a multi-process run);
    # no XLA_FLAGS: one CPU device per process
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    addr = f"127.0.0.1:{procgroup.free_port()}"
    argv_ = [sys.executable, str(Path(__file__).resolve()), "--processes", str(args.processes), "--reps",
             str(args.reps), *(a for shape in shapes for a in ("--shape", ",".join(map(str, shape))))]
    with tempfile.TemporaryDirectory() as tmp:
        logs = [Path(tmp) / f"rank{i}.log" for i in range(args.processes)]
        group = procgroup.start([argv_] * args.processes,
                                [{**env, "PMI_RANK": str(i), "PMI_SIZE": str(args.processes),
                                  "JAX_COORDINATOR_ADDRESS": addr} for i in range(args.processes)],
                                cwd=ROOT, logs=logs, poll_s=0.2)
        group.wait(deadline=time.monotonic() + args.timeout, failure_grace_s=0.0, kill_on_stop=True)
        first = group.first_failure()
        if first is not None or group.stopped:
            tail = "\n".join(logs[first or 0].read_text().splitlines()[-8:])
            raise SystemExit(f"process {first or 0} failed or ran past --timeout {args.timeout} s:\n{tail}")
        print(f"{args.processes} processes, one CPU device each, gloo; {args.reps} calls per op after 3 warm-up")
        print("\n".join(line for line in logs[0].read_text().splitlines() if line.split(" ", 1)[0] in OPS))


if __name__ == "__main__":
    main()
