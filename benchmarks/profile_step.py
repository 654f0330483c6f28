"""Where a JAX training step's time goes on XLA:CPU: per-op self time from a jax.profiler trace.

    python benchmarks/profile_step.py                                  # bench preset, data=2 ZeRO-1, fp32
    python benchmarks/profile_step.py --mesh fsdp=8 --zero 3 --devices 8 --dtype bf16
    python benchmarks/profile_step.py --set parallel.remat=true --top 30

Compiles the step, runs a few warm steps, traces ``--steps`` more with ``jax.profiler`` (perfetto
JSON), and sums each XLA op's *self* time (nested thunks such as a ``while`` body are subtracted
from their parent) over all device threads. Every op is put in one category by its HLO: dots
(YNNPACK/oneDNN/Eigen fusions; forward vs backward from the op's JAX name), collectives and
their rendezvous waits, layout copies/transposes, broadcasts (zero fills), the optimizer update
(ops outside the differentiated function), and the rest of the forward/backward elementwise work.
Times are per step, summed over devices: on 2 cores with N fake devices the sum is ~2x wall time.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
RUNTIME = ("ThunkExecutor", "Rendezvous", "Wait", "Pjit", "CommonPjRt", "$", "PjRt", "TfrtCpu", "Thunk")


def parse_hlo(text: str) -> dict[str, tuple[str, str, str]]:
    """instruction name -> (opcode / fusion kind, JAX op_name metadata, result shape)."""
    out = {}
    pat = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+(?: \S+)*?) ([\w\-]+)\(")
    for line in text.splitlines():
        m = pat.match(line)
        if not m:
            continue
        name, shape, opcode = m.group(1), m.group(2), m.group(3)
        kind = re.search(r"kind=(\w+)", line)
        op = re.search(r'op_name="([^"]*)"', line)
        out[name] = (opcode + (f":{kind.group(1)}" if kind else ""), op.group(1) if op else "", shape)
    return out


def category(name: str, info: tuple[str, str, str] | None) -> str:
    base = name.split(".")[0]
    if any(name.startswith(c) for c in COLLECTIVES):
        return "collective"
    if name.startswith(("Rendezvous", "Wait:")):
        return "collective wait"
    if info is None:
        return "runtime/other"
    opcode, op_name, _ = info
    bwd = "transpose(" in op_name
    in_grad = "jvp(" in op_name or bwd
    is_dot = "ynn" in base or "onednn" in base or opcode.startswith(("dot", "custom-call")) or (
        opcode == "fusion:kCustom") or ("dot_general" in op_name and opcode.startswith("fusion:kOutput"))
    if is_dot and ("dot_general" in op_name or "->" in op_name):  # einsums are named by their equation
        return "dot (backward)" if bwd else "dot (forward)"
    if "ynn" in base:  # YNNPACK runs dots only (see jax_impl.devices.CPU_COMPILER_OPTIONS)
        return "dot (unnamed)"
    if "copy" in base or "transpose" in base or opcode.startswith(("copy", "transpose")):
        return "copy/transpose"
    if "broadcast" in base:
        return "broadcast (fills)"
    if opcode.startswith(("while", "conditional", "call")):
        return "loop control"
    if not op_name:
        return "unattributed"  # XLA-made ops without a JAX source (e.g. reduce-window from a reduce split)
    if not in_grad:
        return "optimizer/update"
    return "elementwise (backward)" if bwd else "elementwise (forward)"


def self_times(events: list[dict]) -> collections.Counter:
    """Exclusive duration per event name: each event minus the events nested in it on its thread."""
    by_tid: dict = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            by_tid[(e.get("pid"), e.get("tid"))].append(e)
    out: collections.Counter = collections.Counter()
    for evs in by_tid.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [end, name, child_time]
        for e in evs:
            while stack and e["ts"] >= stack[-1][0] - 1e-3:
                _end, n, child, dur = stack.pop()
                out[n] += dur - child
            if stack:
                stack[-1][2] += e["dur"]
            stack.append([e["ts"] + e["dur"], e["name"], 0.0, e["dur"]])
        while stack:
            _end, n, child, dur = stack.pop()
            out[n] += dur - child
    return out


def compiled_step(preset: str, overrides: dict, guard: bool = True, compiler_options: dict | None = None,
                  model_options: dict | None = None) -> dict:
    """The trainer's step for a config, AOT-compiled, with fresh state and one synthetic batch (shared with
    ab_step.py and bench_train.py). ``compile_s`` is init + compile. ``model_options``: fields of the trainer's
    ``ModelOptions`` to change (e.g. ``ticks_as_scan``), for code paths no config key selects."""
    import dataclasses

    import jax

    from aurora_data import SyntheticSource, global_batch
    from configs import load_config
    from jax_impl.sharding import batch_sharding, dp_size, make_mesh
    from jax_impl.trainer import Trainer
    from runtime import hostmem

    cfg = load_config(preset, overrides)
    mesh = make_mesh(cfg.mesh_shape())
    tr = Trainer.build(cfg, mesh)
    if model_options:
        tr = dataclasses.replace(tr, model_opts=dataclasses.replace(tr.model_opts, **model_options))
    t0 = time.perf_counter()
    params, opt = tr.init_state()
    step = tr.compile_step(guard=guard, compiler_options=compiler_options)
    compile_s = time.perf_counter() - t0
    hostmem.release_host_memory()
    p = cfg.parallel
    dp = dp_size(mesh)
    src = SyntheticSource(cfg.model.vocab_size, cfg.data.seq_len)
    batch = jax.device_put(global_batch(src, 0, p.mbs, p.gas, dp), batch_sharding(mesh))
    return {"step": step, "params": params, "opt": opt, "batch": batch, "compile_s": compile_s, "devices": mesh.size,
            "cfg": cfg, "mesh": mesh}


def profile(preset: str, overrides: dict, steps: int, warmup: int, guard: bool = True) -> dict:
    import jax

    c = compiled_step(preset, overrides, guard)
    step, params, opt, batch = c["step"], c["params"], c["opt"], c["batch"]
    walls = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        params, opt, m = step(params, opt, batch)
        m["loss"].block_until_ready()
        if i >= warmup:
            walls.append(time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        for _ in range(steps):
            params, opt, m = step(params, opt, batch)
            m["loss"].block_until_ready()
        jax.profiler.stop_trace()
        trace = sorted(Path(d).rglob("*.trace.json.gz"))[-1]
        events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    hlo = parse_hlo(step.as_text())
    st = self_times(events)
    ops = {n: us / steps / 1e3 for n, us in st.items() if n in hlo or n.startswith((*COLLECTIVES, "Rendezvous"))}
    cats: collections.Counter = collections.Counter()
    for n, ms in ops.items():
        cats[category(n, hlo.get(n))] += ms
    walls.sort()
    return {"wall_ms": walls[len(walls) // 2] * 1e3, "ops": ops, "categories": dict(cats), "hlo": hlo,
            "devices": c["devices"]}


def add_layout_args(ap: argparse.ArgumentParser) -> None:
    """The flags that pick the step to measure (shared with ab_step.py)."""
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--mesh", default="data=2")
    ap.add_argument("--zero", type=int, default=1)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--devices", type=int, default=2)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layout_args(ap)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-guard", dest="guard", action="store_false",
                    help="profile the step without the trainer's non-finite guard (jax_impl.train always uses it)")
    ap.add_argument("--top", type=int, default=15, help="also list the N most expensive ops")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    args = ap.parse_args(argv)
    from jax_impl import devices

    devices.configure("cpu", args.devices)  # + host buffer reuse, as jax_impl.train
    overrides = {"parallel.mesh": args.mesh, "parallel.zero": args.zero, "train.dtype": args.dtype}
    overrides.update(kv.split("=", 1) for kv in args.set)
    r = profile(args.preset, overrides, args.steps, args.warmup, args.guard)
    total = sum(r["categories"].values())
    print(f"{args.preset} {args.mesh} zero={args.zero} {args.dtype} on {r['devices']} CPU devices: "
          f"wall {r['wall_ms']:.0f} ms/step; op self time {total:.0f} ms/step summed over device threads")
    for c, ms in sorted(r["categories"].items(), key=lambda kv: -kv[1]):
        print(f"  {c:<24} {ms:8.1f} ms  {ms / total:6.1%}")
    if args.top:
        print(f"top {args.top} ops:")
        for n, ms in sorted(r["ops"].items(), key=lambda kv: -kv[1])[: args.top]:
            info = r["hlo"].get(n, ("", "", ""))
            print(f"  {ms:7.1f} ms  {n:<32} {category(n, r['hlo'].get(n)):<22} {info[2][:40]:<40} "
                  f"{info[1][-60:]}")
    return r


if __name__ == "__main__":
    from runtime.hostmem import reexec_with_allocator

    reexec_with_allocator()  # the trainers' host allocator (runtime/hostmem.py)
    main()
