"""``python -m jax_impl.train``: train (or ``--dry-run`` plan) a Llama on a named device mesh.

    python -m jax_impl.train --preset small --mesh fsdp=8
    python -m jax_impl.train --preset llama2-70b --mesh data=8,fsdp=12 --zero 3 --parallel.hpz=true --dry-run
    python -m jax_impl.train --preset tiny --model.n_layers=4 --optim.lr=3e-3

Everything not listed below is a dotted config override (``--section.key=value``).
JAX is imported only after the device count is known, so the CPU can fake the mesh's devices.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from typing import Any

from configs import Config, ConfigError, lr_at, mesh_devices, validate_config
from configs.cli import layout_label, resolve_config, trainer_parser
from configs.rundir import MetricsLog, make_run_dir, write_config, write_meta


def build_parser() -> argparse.ArgumentParser:
    ap = trainer_parser("python -m jax_impl.train", __doc__)
    ap.add_argument("--dry-run", action="store_true",
                    help="allocate nothing: parameter count, bytes per device, AOT-compiled memory analysis")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def dry_run(cfg: Config, trainer) -> dict[str, Any]:
    """Plan without allocating: counts, per-device state bytes, AOT-compiled memory analysis."""
    n_dev = trainer.mesh.size
    state = trainer.state_bytes_per_device()
    total = cfg.model.n_params()
    print(f"model {cfg.model.name}: {total:,} parameters ({_gib(total * 4)} fp32)")
    print(f"mesh {dict(trainer.mesh.shape)} = {n_dev} devices, ZeRO-{cfg.parallel.zero}"
          + (" + hpZ" if cfg.parallel.hpz else "") + (" MiCS" if cfg.parallel.mics else "")
          + f"; stored ZeRO dims padded to a multiple of {trainer.plan.pad_multiple()}")
    for k, v in state.items():
        print(f"  {k:<10} {_gib(v)} per device")
    t0 = time.perf_counter()
    compiled = trainer.compile_step()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    mem = {k: int(getattr(ma, k + "_size_in_bytes", 0) or 0) for k in ("argument", "output", "alias", "temp")}
    peak = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
    print(f"AOT-compiled train step in {compile_s:.1f}s; per-device memory analysis:")
    for k, v in mem.items():
        print(f"  {k:<10} {_gib(v)}")
    print(f"  {'peak':<10} {_gib(peak)} (arguments + outputs - aliased + temporaries)")
    return {"n_params": total, "devices": n_dev, "state_bytes": state, "memory": mem, "peak_bytes": peak,
            "compile_s": compile_s}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    try:
        cfg, args = resolve_config(build_parser(), argv)
        from jax_impl import devices

        platform = devices.configure(cfg.train.platform, mesh_devices(cfg.parallel.mesh))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    import jax

    from jax_impl.sharding import make_mesh

    try:
        validate_config(cfg, jax.device_count())
        mesh = make_mesh(cfg.mesh_shape(jax.device_count()))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    from jax_impl.trainer import Trainer

    trainer = Trainer.build(cfg, mesh)
    if args.dry_run:
        return dry_run(cfg, trainer)
    return train(cfg, trainer, platform, quiet=args.quiet)


def train(cfg: Config, trainer, platform: str, quiet: bool = False) -> dict[str, Any]:
    import jax
    from tqdm import tqdm

    from aurora_data import global_batch
    from jax_impl.data import make_source
    from jax_impl.sharding import activate, batch_sharding

    mesh, p = trainer.mesh, cfg.parallel
    dp, n_dev = mesh.shape["data"] * mesh.shape["fsdp"], mesh.size
    gbs, seq = p.mbs * p.gas * dp, cfg.data.seq_len
    flops_per_sample = cfg.model.flops_per_sample(seq)

    run_dir = make_run_dir(cfg, "jax")
    write_config(run_dir, cfg)
    source = make_source(cfg, num_samples=cfg.train.steps * gbs)
    print(f"run {run_dir} | {cfg.model.name} {cfg.model.n_params():,} params | mesh {dict(mesh.shape)} "
          f"ZeRO-{p.zero} | gbs {gbs} = mbs {p.mbs} x gas {p.gas} x dp {dp} | seq {seq} | {cfg.train.dtype}")

    t0 = time.perf_counter()
    params, opt_state = trainer.init_state()
    compiled = trainer.compile_step()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    write_meta(run_dir, {
        "framework": "jax", "jax": jax.__version__, "platform": platform, "devices": n_dev,
        "device_kind": jax.devices()[0].device_kind, "mesh": dict(mesh.shape), "layout": layout_label(cfg),
        "zero": p.zero, "dtype": cfg.train.dtype, "gbs": gbs, "compile_s": compile_s,
        "compiled_memory": {k: int(getattr(ma, k + "_size_in_bytes", 0) or 0)
                            for k in ("argument", "output", "alias", "temp")},
    })
    print(f"init + compile {compile_s:.1f}s")
    log = MetricsLog(run_dir, cfg, "jax")
    losses: list[float] = []
    bar = tqdm(range(cfg.train.steps), desc="train", unit="step", disable=quiet, leave=False)
    with activate(mesh):
        for step in bar:
            consumed = step * gbs
            batch = jax.device_put(global_batch(source, consumed, p.mbs, p.gas, dp), batch_sharding(mesh))
            t = time.perf_counter()
            params, opt_state, metrics = compiled(params, opt_state, batch)
            loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])  # waits for the step
            dt = time.perf_counter() - t
            losses.append(loss)
            sps = gbs / dt
            row = {
                "step": step + 1, "loss": loss, "lr": lr_at(cfg, step), "grad_norm": gnorm, "step_time_s": dt,
                "samples_per_s": sps, "tokens_per_s_per_device": sps * seq / n_dev,
                "tflops_per_device": sps * flops_per_sample / n_dev / 1e12, "consumed_samples": consumed + gbs,
                "peak_mem_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
            log.write(row)
            if not math.isfinite(loss):
                log.close()
                raise FloatingPointError(f"loss became {loss} at step {step + 1}; run {run_dir}")
            if (step + 1) % cfg.train.log_every == 0 or step == 0:
                msg = (f"step {step + 1:>5} | loss {loss:.4f} | lr {row['lr']:.3e} | gnorm {gnorm:.3f} | "
                       f"{dt * 1e3:.0f} ms | {sps:.2f} samples/s | {row['tokens_per_s_per_device']:.0f} tok/s/dev | "
                       f"{row['tflops_per_device']:.4f} TFLOPS/dev")
                (bar.write if not quiet else print)(msg)
    log.close()
    bar.close()
    print(f"done: loss {losses[0]:.4f} -> {losses[-1]:.4f}; metrics in {run_dir / 'metrics.jsonl'}")
    return {"run_dir": run_dir, "losses": losses, "compile_s": compile_s, "params": params}


if __name__ == "__main__":
    main()
