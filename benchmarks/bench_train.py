"""JAX training throughput on fake CPU devices vs the plain matmul rate of the same process.

    python benchmarks/bench_train.py                       # bench preset, 8 devices, 4 layouts x dtypes
    python benchmarks/bench_train.py --meshes fsdp=8 --dtypes bf16 --steps 20

Prints, per layout and dtype: median step time, tokens/s/device, model TFLOPS (Megatron-LM
formula, all devices together) and that figure as a fraction of the measured matmul rate
(one (4096 x 4096) @ (4096 x 4096) dot of the same dtype, fp32 accumulation, all cores).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def matmul_tflops(dtype_name: str, n: int = 4096, reps: int = 10) -> float:
    import jax
    import jax.numpy as jnp

    dt = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[dtype_name]
    a = jax.random.normal(jax.random.key(0), (n, n), dt)
    b = jax.random.normal(jax.random.key(1), (n, n), dt)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e12


def bench_layout(preset: str, mesh_spec: str, dtype: str, steps: int, warmup: int) -> dict:
    import jax

    from aurora_data import SyntheticSource, global_batch
    from configs import load_config
    from jax_impl.sharding import activate, batch_sharding, make_mesh
    from jax_impl.trainer import Trainer

    cfg = load_config(preset, {"parallel.mesh": mesh_spec, "train.dtype": dtype, "train.steps": steps + warmup})
    mesh = make_mesh(cfg.mesh_shape())
    tr = Trainer.build(cfg, mesh)
    t0 = time.perf_counter()
    params, opt = tr.init_state()
    step = tr.compile_step()
    compile_s = time.perf_counter() - t0
    p, seq = cfg.parallel, cfg.data.seq_len
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    gbs = p.mbs * p.gas * dp
    src = SyntheticSource(cfg.model.vocab_size, seq)
    times = []
    with activate(mesh):
        for i in range(steps + warmup):
            b = jax.device_put(global_batch(src, i * gbs, p.mbs, p.gas, dp), batch_sharding(mesh))
            t = time.perf_counter()
            params, opt, m = step(params, opt, b)
            m["loss"].block_until_ready()
            if i >= warmup:
                times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    sps = gbs / dt
    return {
        "mesh": mesh_spec, "dtype": dtype, "step_ms": dt * 1e3, "compile_s": compile_s,
        "tok_s_dev": sps * seq / mesh.size, "tflops": sps * cfg.model.flops_per_sample(seq) / 1e12,
        "params": cfg.model.n_params(), "gbs": gbs, "seq": seq,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--meshes", default="fsdp=8;data=2,fsdp=2,tensor=2", help="';'-separated mesh specs")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)

    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)

    rows = []
    rates = {d: matmul_tflops(d) for d in args.dtypes.split(",")}
    for d, r in rates.items():
        print(f"matmul rate {d} (fp32 accumulate): {r * 1e3:.1f} GFLOP/s")
    print(f"{'mesh':<24} {'dtype':<5} {'step ms':>9} {'compile s':>9} {'tok/s/dev':>10} {'GFLOP/s':>9} "
          f"{'/ matmul':>8}")
    for mesh_spec in args.meshes.split(";"):
        for d in args.dtypes.split(","):
            r = bench_layout(args.preset, mesh_spec, d, args.steps, args.warmup)
            r["vs_matmul"] = r["tflops"] / rates[d]
            rows.append(r)
            print(f"{r['mesh']:<24} {d:<5} {r['step_ms']:>9.1f} {r['compile_s']:>9.1f} {r['tok_s_dev']:>10.1f} "
                  f"{r['tflops'] * 1e3:>9.1f} {r['vs_matmul']:>8.1%}", flush=True)
    return rows


if __name__ == "__main__":
    main()
