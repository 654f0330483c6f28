"""JAX training throughput on fake CPU devices vs the plain matmul rate of the same process.

    python benchmarks/bench_train.py                       # bench preset, 8 devices, 4 layouts x dtypes
    python benchmarks/bench_train.py --meshes fsdp=8 --dtypes bf16 --steps 20

Prints, per layout and dtype: median step time, tokens/s/device, model TFLOPS (Megatron-LM
formula, all devices together) and that figure as a fraction of the measured matmul rate
(a (2048 x 2048) @ (2048 x 2048) dot of the same dtype, fp32 accumulation, all cores). The matmul is
timed right after every training step, so both figures see the same machine load; the ratio is of
their medians.

The script re-executes itself once on the trainers' host allocator (runtime/hostmem.py: tcmalloc where
installed). Under glibc's reuse policy (the fallback) the heap grows by one XLA temp buffer (68-128 MiB) on
many of the first ~10 steps and, with 8 devices, on one step in 3-9 after that, every new page faulting in
(docs/performance.md, "The host allocator"); under tcmalloc RSS is flat from the first step. ``--warmup`` (default 12)
steps run untimed first either way.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def matmul_timer(dtype_name: str, n: int = 2048):
    """A callable that times one (n x n) @ (n x n) dot and returns its TFLOP/s."""
    import jax
    import jax.numpy as jnp

    dt = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[dtype_name]
    cpu = jax.devices()[0]
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), dt), cpu)
    b = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), dt), cpu)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()

    def timed() -> float:
        t = time.perf_counter()
        f(a, b).block_until_ready()
        return 2 * n**3 / (time.perf_counter() - t) / 1e12

    return timed


def bench_layout(preset: str, mesh_spec: str, dtype: str, steps: int, warmup: int) -> dict:
    matmul = matmul_timer(dtype)
    import jax
    from profile_step import compiled_step

    from aurora_data import SyntheticSource, global_batch
    from jax_impl.sharding import batch_sharding, dp_size

    c = compiled_step(preset, {"parallel.mesh": mesh_spec, "train.dtype": dtype, "train.steps": steps + warmup},
                      guard=False)
    cfg, mesh, step, params, opt, compile_s = c["cfg"], c["mesh"], c["step"], c["params"], c["opt"], c["compile_s"]
    p, seq = cfg.parallel, cfg.data.seq_len
    dp = dp_size(mesh)
    gbs = p.mbs * p.gas * dp
    src = SyntheticSource(cfg.model.vocab_size, seq)
    times, rates = [], []
    for i in range(steps + warmup):  # the compiled step needs no mesh context; the matmul must not have one
        b = jax.device_put(global_batch(src, i * gbs, p.mbs, p.gas, dp), batch_sharding(mesh))
        t = time.perf_counter()
        params, opt, m = step(params, opt, b)
        m["loss"].block_until_ready()
        if i >= warmup:
            times.append(time.perf_counter() - t)
            rates.append(matmul())
    dt = statistics.median(times)
    sps = gbs / dt
    tflops = sps * cfg.model.flops_per_sample(seq) / 1e12
    rate = statistics.median(rates)
    return {
        "mesh": mesh_spec, "dtype": dtype, "step_ms": dt * 1e3, "compile_s": compile_s,
        "tok_s_dev": sps * seq / mesh.size, "tflops": tflops, "matmul_tflops": rate, "vs_matmul": tflops / rate,
        "params": cfg.model.n_params(), "gbs": gbs, "seq": seq,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--meshes", default="fsdp=8;data=2,fsdp=2,tensor=2", help="';'-separated mesh specs")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=12, help="untimed steps first (the heap's growth, see above)")
    args = ap.parse_args(argv)
    from jax_impl import devices
    from runtime.hostmem import host_allocator

    devices.configure("cpu", args.devices)  # + host buffer reuse, as jax_impl.train

    rows = []
    print(f"{args.preset} preset on {args.devices} CPU devices, host allocator {host_allocator()}; matmul rate "
          "timed after every step (same load)")
    print(f"{'mesh':<24} {'dtype':<5} {'step ms':>9} {'compile s':>9} {'tok/s/dev':>10} {'GFLOP/s':>9} "
          f"{'matmul GFLOP/s':>14} {'/ matmul':>8}")
    for mesh_spec in args.meshes.split(";"):
        for d in args.dtypes.split(","):
            r = bench_layout(args.preset, mesh_spec, d, args.steps, args.warmup)
            rows.append(r)
            print(f"{r['mesh']:<24} {d:<5} {r['step_ms']:>9.1f} {r['compile_s']:>9.1f} {r['tok_s_dev']:>10.1f} "
                  f"{r['tflops'] * 1e3:>9.1f} {r['matmul_tflops'] * 1e3:>14.1f} {r['vs_matmul']:>8.1%}", flush=True)
    return rows


if __name__ == "__main__":
    from runtime.hostmem import reexec_with_allocator

    reexec_with_allocator()  # the trainers' host allocator (runtime/hostmem.py)
    main()
