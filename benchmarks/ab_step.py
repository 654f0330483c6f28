"""A/B timing of training-step variants in one process, steps interleaved (A, B, A, B, ...).

    python benchmarks/ab_step.py --mesh data=2 --zero 1 --b lever:zero_dim=embed
    python benchmarks/ab_step.py --mesh fsdp=8 --devices 8 --dtype bf16 --b parallel.remat=true

This 2-core machine is shared and its speed drifts by +-20 % over minutes, so two variants timed
in separate runs cannot be told apart by a 5 % lever. Here both are compiled in the same process
and alternate step by step; the median over adjacent (A, B) pairs of B's step time / A's is what each
lever's figure in docs/performance.md comes from. A variant is a comma list of config overrides (``key=value``)
and/or ``xla:OPTION=VALUE`` XLA compiler options (a repeated option's values joined by ``+``) and/or
``lever:NAME=VALUE`` code switches (the old behaviour of a lever, kept to measure it):

    lever:zero_dim=embed      ZeRO shards the embed/norm dimension (now: the most major one)
    lever:zero_dim=rows       ZeRO-1/2 shard a stacked layer matrix's rows, each layer's gradient reduce-scattered
                              in the backward (now, where the shard count divides the layers: by layer, the
                              stack's gradient reduce-scattered once, jax_impl.sharding.STATES_BY_LAYER)
    lever:step_grads=stored   gradients reduced into their stored sharding (ZeRO-1: an all-reduce;
                              now: into the optimizer state's sharding, a reduce-scatter)
    lever:cpu_options=none    XLA:CPU's default options (now: jax_impl.devices.CPU_COMPILER_OPTIONS)
    lever:attn_vjp=autodiff   attention's backward by autodiff (now: jax_impl.model._attend's written-out VJP)
    lever:attn_layout=seq     attention's einsums on sequence-major q/k/v (now: head-major, jax_impl.model._heads_major)
    lever:norm=optax          optax.tree.norm for the gradient norm (now: trainer.global_norm, one dot per leaf)
    lever:norm=whole          each gradient's square sum as one whole-leaf dot (now: stacked layer weights
                              layer by layer, trainer.global_norm's per_layer)
    lever:clip=optax          optax.clip_by_global_norm, which recomputes the norm the step already has
    lever:clip=divide         clipping as optax computes it, (g / norm) * max_norm (now: g * (max_norm / norm))
    lever:ticks=scan          GPipe's unrolled ticks as an unrolled lax.scan (traced tick index; now: a Python loop)
    lever:gather=unpinned     ZeRO-3 weights all-gathered without first pinning the layer slice to its stored
                              sharding (now: jax_impl.sharding.gather_weight pins it; 2-D gathers, no layout copy)
    lever:gather=fp32         ZeRO-3 / MiCS in bf16 gather the fp32 params and cast after (now: cast to bf16 where
                              stored, gathered as bf16 bits; jax_impl.sharding.ZERO3_GATHER_BF16)
    lever:rope=traced         rotary tables computed inside the step (now: constants, jax_impl.model.rope_tables)
    lever:grad_scatter=partitioner  ZeRO-1/2 weight gradients reduced by the SPMD partitioner (XLA:CPU: an all-reduce
                              and a slice; now: a local dot and a reduce-scatter, jax_impl.sharding.weight_grad_fn)
    lever:guard=select        the non-finite guard as where(ok, new, old) over params and Adam moments
                              (now: a branch around the update, jax_impl.trainer.guarded_update)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@contextlib.contextmanager
def lever(name: str, value: str) -> Iterator[None]:
    """Switch one code-level lever back to its earlier behaviour while a variant is built and compiled."""
    import jax

    from jax_impl import sharding

    if name == "zero_dim" and value == "embed":
        def embed_dim(self, names, shape):
            return next(i for i, n in enumerate(names) if n in sharding.ZERO_DIMS)

        with mock.patch.object(sharding.ZeroPlan, "zero_dim", embed_dim):
            yield
    elif name == "step_grads" and value == "stored":
        from jax_impl.trainer import Trainer

        orig_build = Trainer.build.__func__

        def build(cls, cfg, mesh):
            tr = orig_build(cls, cfg, mesh)
            tr.opt_leaf_sh = tr.grad_sh  # reduce gradients into their stored ZeRO sharding (ZeRO-1: all-reduce)
            return tr

        with mock.patch.object(Trainer, "build", classmethod(build)):
            yield
    elif name == "cpu_options" and value == "none":
        from jax_impl import devices

        with mock.patch.object(devices, "CPU_COMPILER_OPTIONS", {}):
            yield
    elif name == "attn_vjp" and value == "autodiff":
        from jax_impl import model

        def plain(q, k, v, q_offset):  # the same forward, differentiated by JAX
            return model._attend_fwd(q, k, v, q_offset)[0]

        with mock.patch.object(model, "_attend", plain):
            yield
    elif name == "norm" and value == "optax":
        import optax

        from jax_impl import trainer
        with mock.patch.object(trainer, "global_norm", lambda tree, per_layer=None: optax.tree.norm(tree)):
            yield
    elif name == "norm" and value == "whole":
        from jax_impl.trainer import Trainer

        with mock.patch.object(Trainer, "norm_per_layer", lambda self: None):
            yield
    elif name == "clip" and value == "divide":
        from jax_impl import trainer

        def divide(g, g_norm, max_norm):  # optax's arithmetic
            return (g / g_norm.astype(g.dtype)) * max_norm

        with mock.patch.object(trainer, "_clipped", divide):
            yield
    elif name == "clip" and value == "optax":
        import optax

        from jax_impl import trainer

        with mock.patch.object(trainer, "clip_by_global_norm", optax.clip_by_global_norm):
            yield
    elif name == "zero_dim" and value == "rows":
        with mock.patch.object(sharding, "STATES_BY_LAYER", False):
            yield
    elif name == "grad_scatter" and value == "partitioner":
        with mock.patch.object(sharding, "EXPLICIT_GRAD_SCATTER", False):
            yield
    elif name == "guard" and value == "select":
        from jax_impl import trainer

        def select(ok, apply, params, opt_state, grads):
            new = apply(params, opt_state, grads)
            return jax.tree.map(lambda n, o: jax.numpy.where(ok, n, o), new, (params, opt_state))

        with mock.patch.object(trainer, "guarded_update", select):
            yield
    elif (name, value) == ("attn_layout", "seq"):
        from jax_impl import model
        jnp = jax.numpy

        # the attention core before the head-major layout: einsums on the sequence-major q, k, v, which left
        # XLA:CPU to transpose score-sized operands and results (same numbers, bit for bit)
        def probs_of(q, k, q_offset):
            cq, s, hd = q.shape[1], k.shape[1], q.shape[-1]
            scores = jnp.einsum("bqngd,bknd->bngqk", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(hd)
            mask = (q_offset + jnp.arange(cq))[:, None] >= jnp.arange(s)[None, :]
            return jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1).astype(k.dtype)

        def fwd(q, k, v, q_offset):
            probs = probs_of(q, k, q_offset)
            out = jnp.einsum("bngqk,bknd->bqngd", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)
            return out, (q, k, v, probs)

        def bwd(res, dout):
            q, k, v, probs = res
            f32, scale = jnp.float32, 1.0 / jnp.sqrt(q.shape[-1]).astype(jnp.float32)
            dout = dout.astype(q.dtype)
            dprobs = jnp.einsum("bqngd,bknd->bngqk", dout, v, preferred_element_type=f32)
            p32 = probs.astype(f32)
            dscores = (p32 * (dprobs - jnp.sum(dprobs * p32, axis=-1, keepdims=True)) * scale).astype(q.dtype)
            dv = jnp.einsum("bqngd,bngqk->bndk", dout, probs, preferred_element_type=f32)
            dk = jnp.einsum("bqngd,bngqk->bndk", q, dscores, preferred_element_type=f32)
            dq = jnp.einsum("bngqk,bknd->bqngd", dscores, k, preferred_element_type=f32)
            return (dq.astype(q.dtype), dk.transpose(0, 3, 1, 2).astype(k.dtype),
                    dv.transpose(0, 3, 1, 2).astype(v.dtype), None)

        seq_major = jax.custom_vjp(lambda q, k, v, q_offset: fwd(q, k, v, q_offset)[0])
        seq_major.defvjp(fwd, bwd)
        with mock.patch.object(model, "_attend", seq_major):
            yield
    elif name == "gather" and value == "unpinned":
        import dataclasses

        from jax_impl.trainer import Trainer

        orig_build = Trainer.build.__func__

        def build(cls, cfg, mesh):  # the model told nothing of the ZeRO plan: weights gathered unpinned
            tr = orig_build(cls, cfg, mesh)
            tr.model_opts = dataclasses.replace(tr.model_opts, plan=None)
            return tr

        with mock.patch.object(Trainer, "build", classmethod(build)):
            yield
    elif name == "gather" and value == "fp32":
        with mock.patch.object(sharding, "ZERO3_GATHER_BF16", False):
            yield
    elif name == "rope" and value == "traced":
        from jax_impl import model
        jnp = jax.numpy

        def traced(seq, dim, theta):
            inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
            emb = jnp.tile(jnp.outer(jnp.arange(seq, dtype=jnp.float32), inv_freq), 2)
            return jnp.cos(emb), jnp.sin(emb)

        with mock.patch.object(model, "rope_tables", traced):
            yield
    else:
        raise SystemExit(f"unknown lever {name}={value}; known: zero_dim=embed, zero_dim=rows, step_grads=stored, "
                         "cpu_options=none, guard=select, attn_vjp=autodiff, clip=optax, clip=divide, attn_layout=seq, "
                         "norm=optax, norm=whole, "
                         "ticks=scan, gather=unpinned, gather=fp32, rope=traced")


def build(preset: str, base: dict, variant: str, guard: bool) -> dict:
    from profile_step import compiled_step

    overrides, levers, xla, model_options = dict(base), [], {}, {}
    for item in filter(None, variant.split(",")):
        key, _, value = item.partition("=")
        if key.startswith("xla:"):
            # a repeated option's values joined by "+" (the variant's own separator is ","): A+B -> "A,B"
            xla[key[len("xla:"):]] = {"true": True, "false": False}.get(value, value.replace("+", ","))
        elif key == "lever:ticks" and value == "scan":  # an option of the model, passed to the build
            model_options["ticks_as_scan"] = True
        elif key.startswith("lever:"):
            levers.append((key[len("lever:"):], value))
        else:
            overrides[key] = value
    with contextlib.ExitStack() as stack:
        for name, value in levers:
            stack.enter_context(lever(name, value))
        c = compiled_step(preset, overrides, guard, xla or None, model_options or None)
    return {"step": c["step"], "state": [c["params"], c["opt"]], "batch": c["batch"], "compile_s": c["compile_s"],
            "temp_mib": c["step"].memory_analysis().temp_size_in_bytes / 2**20, "times": [], "losses": []}


def run_step(v: dict) -> None:
    t = time.perf_counter()
    params, opt, m = v["step"](*v["state"], v["batch"])
    v["losses"].append(float(m["loss"]))
    v["times"].append(time.perf_counter() - t)
    v["state"] = [params, opt]


def main(argv: list[str] | None = None) -> dict:
    from profile_step import add_layout_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layout_args(ap)
    ap.add_argument("--a", default="", help="variant A (default: the code as it is)")
    ap.add_argument("--b", required=True, help="variant B")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-guard", dest="guard", action="store_false", help="without the non-finite guard")
    args = ap.parse_args(argv)
    from jax_impl import devices

    devices.configure("cpu", args.devices)  # + host buffer reuse, as jax_impl.train
    base = {"parallel.mesh": args.mesh, "parallel.zero": args.zero, "train.dtype": args.dtype}
    va = build(args.preset, base, args.a, args.guard)
    vb = build(args.preset, base, args.b, args.guard)
    for i in range(args.warmup + args.steps):
        for v in (va, vb) if i % 2 == 0 else (vb, va):
            run_step(v)
    for v in (va, vb):
        v["median_ms"] = statistics.median(v["times"][args.warmup:]) * 1e3
    print(f"{args.preset} {args.mesh} zero={args.zero} {args.dtype}, {args.devices} devices, "
          f"{args.steps} interleaved steps each")
    for label, v, spec in (("A", va, args.a or "(as is)"), ("B", vb, args.b)):
        print(f"  {label}: {v['median_ms']:7.1f} ms/step  compile+init {v['compile_s']:4.1f}s  "
              f"XLA temp {v['temp_mib']:6.1f} MiB  last loss {v['losses'][-1]:.6f}  {spec}")
    # each B step against the A step next to it in time: robust to the machine's drift
    ratio = statistics.median(b / a for a, b in zip(va["times"][args.warmup:], vb["times"][args.warmup:], strict=True))
    print(f"  B/A step time (median of adjacent pairs): {ratio:.3f}  "
          + (f"(B takes {ratio - 1:+.1%} longer)" if ratio > 1 else f"(B is {1 - ratio:.1%} faster than A)"))
    return {"a": va["median_ms"], "b": vb["median_ms"], "ratio": ratio}


if __name__ == "__main__":
    from runtime.hostmem import reexec_with_allocator

    reexec_with_allocator()  # the trainers' host allocator (runtime/hostmem.py)
    main()
