"""Plain matmul rate of each framework's CPU kernels, fp32 and bf16, measured in one process.

    python benchmarks/matmul_rates.py                 # 2048^3, 5 alternating rounds
    python benchmarks/matmul_rates.py --size 1024 --rounds 9

JAX: ``bench_train.matmul_timer``, the matmul rate ``bench_train.py`` divides by (a jitted dot with fp32
accumulation, as the model's matmuls). torch: ``a @ b`` in the dtype (MKL's sgemm for fp32, oneDNN for bf16 on a
CPU with AVX512-BF16 or AMX), torch's default thread count.
The frameworks alternate round by round, so both see the same machine load; each round's figure is the median
of its timed calls. What it explains: ``compare.report``'s JAX/DeepSpeed ratio at the bench size includes how
fast each framework's own kernels multiply on this CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def torch_timer(dtype, n: int) -> Callable[[], float]:
    """A callable that times one (n x n) @ (n x n) torch product and returns its TFLOP/s (as ``matmul_timer``)."""
    import torch

    a = torch.randn((n, n), dtype=dtype)

    def timed() -> float:
        t = time.perf_counter()
        a @ a
        return 2 * n**3 / (time.perf_counter() - t) / 1e12

    return timed


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048, help="n of the (n x n) @ (n x n) product")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=5, help="timed calls per round and variant")
    args = ap.parse_args(argv)

    import jax
    import torch
    from bench_train import matmul_timer

    n = args.size
    timers: dict[str, Callable[[], float]] = {}
    for name, tdt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        timers[f"jax {name}"] = matmul_timer(name, n)
        timers[f"torch {name}"] = torch_timer(tdt, n)
    for timed in timers.values():  # compile, pack, first-touch
        timed()
    rates: dict[str, list[float]] = {k: [] for k in timers}
    for r in range(args.rounds):
        for k, timed in timers.items():  # GFLOP/s: the median call of the round
            rates[k].append(1e3 * statistics.median(timed() for _ in range(args.calls)))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()), flush=True)
    print(f"({n} x {n}) @ ({n} x {n}), GFLOP/s, median (range) of {args.rounds} rounds; "
          f"jax {jax.__version__} on {jax.default_backend()}, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads")
    for k, v in rates.items():
        print(f"  {k:<11} {statistics.median(v):7.1f}  ({min(v):.1f}-{max(v):.1f})")
    med = {k: statistics.median(v) for k, v in rates.items()}
    for name in ("fp32", "bf16"):
        print(f"  jax/torch {name}: {med[f'jax {name}'] / med[f'torch {name}']:.2f}")
    return rates


if __name__ == "__main__":
    main()
