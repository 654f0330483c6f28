"""One-GPU bf16 training throughput, JAX vs PyTorch (eager and torch.compile), as MFU.

    python benchmarks/bench_gpu.py [--preset gpu-1b] [--steps 10] [--set jax.matmul_out=fp32] [--out r.json]

Same model (``gpu-1b``: ~1.0B parameters), batch and optimizer (AdamW with clipping, fp32 master
weights, bf16 compute) on both sides. Reports, per framework, the median step time after warm-up,
model TFLOP/s (Megatron-LM formula, no recompute term) and that figure as a fraction of (a) the
card's dense bf16 peak and (b) a bf16 matmul measured in the same process. JAX uses cuDNN's fused
attention (``jax.attn_impl=cudnn``), torch ``F.scaled_dot_product_attention``. With ``parallel.remat`` (the
``gpu-8b`` preset) both recompute every layer in the backward. Each section
is independent: one that fails prints its error and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # SXM parts, dense (no sparsity)


def peak_for(name: str) -> float | None:
    return next((v for k, v in DENSE_BF16_PEAK.items() if k in name), None)


def jax_matmul(n: int = 8192, reps: int = 20) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        out = f(a, b)
    out.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def jax_train(cfg, steps: int, warmup: int) -> dict:
    import jax
    import numpy as np

    from jax_impl.sharding import batch_sharding, make_mesh
    from jax_impl.trainer import Trainer

    mesh = make_mesh(cfg.mesh_shape(1), jax.devices()[:1])
    tr = Trainer.build(cfg, mesh)
    t0 = time.perf_counter()
    params, opt = tr.init_state()
    step = tr.compile_step()
    compile_s = time.perf_counter() - t0
    p = cfg.parallel
    rng = np.random.default_rng(0)
    batch = rng.integers(0, cfg.model.vocab_size, (p.gas, p.mbs, cfg.data.seq_len + 1)).astype(np.int32)
    batch = jax.device_put(batch, batch_sharding(mesh))
    times, losses = [], []
    for i in range(warmup + steps):
        t = time.perf_counter()
        params, opt, m = step(params, opt, batch)
        losses.append(float(m["loss"]))  # waits for the step
        if i >= warmup:
            times.append(time.perf_counter() - t)
    stats = jax.devices()[0].memory_stats() or {}
    return {"step_s": statistics.median(times), "compile_s": compile_s, "loss_first": losses[0],
            "loss_last": losses[-1], "peak_bytes": stats.get("peak_bytes_in_use")}


def torch_matmul(n: int = 8192, reps: int = 20) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def checkpoint_blocks(model):
    """Recompute every block in the backward (``torch.utils.checkpoint``, non-reentrant), as ``parallel.remat``
    makes the JAX step do; applied from outside the module, which keeps its parameter names."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)
    return model


def torch_train(cfg, steps: int, warmup: int, compile_model: bool) -> dict:
    import torch
    import torch.nn.functional as F

    from configs import lr_at
    from torch_ref.model import Llama, init_torch

    model = init_torch(Llama(cfg.model), 0).cuda()  # the JAX recipe's stds; fp32 master weights, bf16 autocast
    if cfg.parallel.remat:
        checkpoint_blocks(model)
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay, fused=True)
    fwd = torch.compile(model) if compile_model else model
    p, V = cfg.parallel, cfg.model.padded_vocab
    tokens = torch.randint(0, cfg.model.vocab_size, (p.mbs, cfg.data.seq_len + 1), device="cuda")
    times, losses = [], []
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        t = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, i)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = fwd(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, V), tokens[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # waits for the step
        if i == 0:
            first_s = time.perf_counter() - t0
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times), "compile_s": first_s if compile_model else None,
            "loss_first": losses[0], "loss_last": losses[-1], "peak_bytes": torch.cuda.max_memory_allocated()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpu-1b")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", default="jax,torch,torch.compile")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. jax.matmul_out=fp32 (repeatable)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)

    from configs import load_config, parse_overrides

    overrides = parse_overrides([f"--{kv}" for kv in args.set])
    cfg = load_config(args.preset, overrides)
    flops_step = cfg.model.flops_per_sample(cfg.data.seq_len) * cfg.parallel.mbs * cfg.parallel.gas
    res: dict = {"preset": args.preset, "overrides": overrides, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                 "n_params": cfg.model.n_params(), "tokens_per_step":
                 cfg.parallel.mbs * cfg.parallel.gas * cfg.data.seq_len, "model_tflop_per_step": flops_step / 1e12}
    print(json.dumps(res), flush=True)
    sections = {
        "jax": lambda: {**jax_train(cfg, args.steps, args.warmup), "matmul_flops": jax_matmul()},
        "torch": lambda: {**torch_train(cfg, args.steps, args.warmup, False), "matmul_flops": torch_matmul()},
        "torch.compile": lambda: {**torch_train(cfg, args.steps, args.warmup, True), "matmul_flops": torch_matmul()},
    }
    for name in args.only.split(","):
        if name == "jax":
            import jax

            res["device"] = jax.devices()[0].device_kind
            res["jax_version"] = jax.__version__
        elif "torch_version" not in res:
            import torch

            res["torch_version"] = torch.__version__
            res.setdefault("device", torch.cuda.get_device_name())
        try:
            r = sections[name]()
            flops = flops_step / r["step_s"]
            peak = peak_for(res.get("device", ""))
            r.update(model_tflops=flops / 1e12, mfu_vs_peak=flops / peak if peak else None,
                     mfu_vs_matmul=flops / r["matmul_flops"], matmul_tflops=r.pop("matmul_flops") / 1e12)
        except Exception as e:  # one broken section must not hide the others
            r = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        res[name] = r
        print(name, json.dumps(r, default=str), flush=True)
    for a, b in (("jax", "torch"), ("jax", "torch.compile")):
        if "step_s" in res.get(a, {}) and "step_s" in res.get(b, {}):
            res[f"{a}/{b}"] = res[b]["step_s"] / res[a]["step_s"]
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in res.items() if "/" in k}), flush=True)
    return res


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # let torch have memory after JAX
    main()
