"""Plain matmul rate of each framework's CPU kernels, fp32 and bf16, measured in one process.

    python benchmarks/matmul_rates.py                 # 2048^3, 5 alternating rounds
    python benchmarks/matmul_rates.py --size 1024 --rounds 9

JAX: a jitted ``dot`` with fp32 accumulation (``preferred_element_type``, as the model's matmuls), compiled with
the trainers' XLA:CPU options (``jax_impl.devices.CPU_COMPILER_OPTIONS``: YNNPACK dots). torch: ``a @ b`` in the
dtype (MKL's sgemm for fp32, oneDNN for bf16 on a CPU with AVX512-BF16 or AMX), torch's default thread count.
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


def _rate(fn: Callable[[], object], flops: float, calls: int) -> float:
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return flops / statistics.median(times) / 1e9


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048, help="n of the (n x n) @ (n x n) product")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=5, help="timed calls per round and variant")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch

    from jax_impl.devices import compiler_options

    n = args.size
    flops = 2.0 * n**3
    variants: dict[str, Callable[[], object]] = {}
    for name, jdt, tdt in (("fp32", jnp.float32, torch.float32), ("bf16", jnp.bfloat16, torch.bfloat16)):
        a = jnp.ones((n, n), jdt)
        f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32)).lower(a, a).compile(
            compiler_options())
        ta = torch.ones((n, n), dtype=tdt)
        variants[f"jax {name}"] = lambda f=f, a=a: f(a, a).block_until_ready()
        variants[f"torch {name}"] = lambda ta=ta: ta @ ta
    for fn in variants.values():  # compile, pack, first-touch
        fn()
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for k, fn in variants.items():
            rates[k].append(_rate(fn, flops, args.calls))
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
