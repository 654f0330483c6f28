"""Per-tile memory of every layout the study ran: JAX's AOT-compiled step beside the DeepSpeed model.

    python -m benchmarks.memory_table                    # the study's layouts (+ the extra targets below)
    python -m benchmarks.memory_table --only hpZ --only "gas 8" --refresh
    python -m benchmarks.memory_table --out reports/memory_table.md

For each layout: the JAX train step AOT-compiled on fake CPU devices (``compare.plan.jax_memory``: one
subprocess per layout, so 96 or 192 devices can be faked; cached by config hash), its per-device peak
(arguments + outputs - aliased + temporaries, XLA:CPU's buffer assignment) split into the stored state
(arguments: fp32 params, Adam moments) and temporaries; the planner's DeepSpeed estimate for the same
layout (``compare.plan.ds_memory``); the usable memory of a tile (``compare/clusters/aurora.toml``:
64 GB x 0.97 = 62.1 GB = 57.8 GiB) and a verdict. JAX runs each layout as DeepSpeed does
(``Layout.jax_config``: 1F1B pipelines; no checkpointing = no matmul recomputed).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from compare.cluster import load_cluster
from compare.plan import Assumptions, Layout, ds_memory, jax_memory, layout_from_row
from compare.reference import load_reference

GIB = 2**30

# layouts the study's table does not list but that its text names as run (16 nodes, MBS 2, PP=16, MiCS sizes)
EXTRA: list[tuple[str, Layout]] = [
    ("llama2-70b", Layout("ZeRO-3+hpZ", data=8, fsdp=12, zero=3, hpz=True, mbs=2, gas=1)),
    ("llama2-70b", Layout("ZeRO-3+hpZ", data=8, fsdp=12, zero=3, hpz=True, mbs=2, gas=8)),
    ("llama2-70b", Layout("ZeRO-3+hpZ", data=16, fsdp=12, zero=3, hpz=True, mbs=1, gas=1)),
    ("llama2-70b", Layout("ZeRO-3+hpZ", data=16, fsdp=12, zero=3, hpz=True, mbs=2, gas=8)),
    ("llama2-70b", Layout("PP+ZeRO-1", pp=16, data=6, tp=2, zero=1, mbs=1, gas=32)),
    ("llama2-70b", Layout("ZeRO-3 MiCS", data=8, fsdp=12, zero=3, mics=True)),
    ("llama2-70b", Layout("ZeRO-3 MiCS", data=4, fsdp=24, zero=3, mics=True)),
    ("llama2-70b", Layout("ZeRO-3 MiCS", data=2, fsdp=48, zero=3, mics=True)),
    ("llama2-70b", Layout("ZeRO-3", fsdp=96, zero=3)),
    # the 42B without checkpointing does not fit JAX's step (save_matmuls); the least recompute that does
    ("auroragpt-42b-tp6", Layout("TP+ZeRO-2", data=16, tp=6, zero=2, remat=False, jax_remat_policy="save_mlp")),
]


def study_layouts(extra: bool = True) -> list[tuple[str, Layout, str]]:
    """(model, layout, where it comes from) for every distinct layout of the reference CSV, then EXTRA."""
    seen: set[tuple[str, Layout]] = set()
    out = []
    for row in load_reference():
        key = (row.model, layout_from_row(row))
        if key not in seen:
            seen.add(key)
            out.append((row.model, key[1], f"{row.run} ({row.status})"))
    for model, lay in EXTRA if extra else []:
        if (model, lay) not in seen:
            seen.add((model, lay))
            out.append((model, lay, "study text"))
    return out


def command(model: str, lay: Layout) -> str:
    """The ``jax_impl.train --dry-run`` command of the same JAX config."""
    cfg = lay.jax_config(model)
    p = cfg.parallel
    parts = [f"--preset {model}", f"--mesh {lay.mesh}", f"--zero {lay.zero}", f"--mbs {lay.mbs}", f"--gas {lay.gas}"]
    parts += ["--parallel.hpz=true"] * lay.hpz + ["--parallel.mics=true"] * lay.mics
    parts += [f"--parallel.remat={str(p.remat).lower()}"]
    if p.remat and p.remat_policy != "full":
        parts.append(f"--parallel.remat_policy={p.remat_policy}")
    if lay.pp > 1:
        parts.append(f"--parallel.pipeline_schedule={p.pipeline_schedule}")
    return "python -m jax_impl.train " + " ".join(parts) + " --dry-run"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.memory_table", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", help="layouts whose 'model label variant' contains this text "
                    "(repeatable: any of them)")
    ap.add_argument("--no-extra", action="store_true", help="only the reference CSV's layouts")
    ap.add_argument("--refresh", action="store_true", help="recompile instead of reading the cache")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per compile")
    ap.add_argument("--cluster", default="aurora")
    ap.add_argument("--out", type=Path, help="also write the table as markdown here")
    args = ap.parse_args(argv)

    cluster = load_cluster(args.cluster, {})
    usable = cluster.usable_bytes
    todo = [t for t in study_layouts(not args.no_extra)
            if not args.only or any(o in f"{t[0]} {t[1].label} {t[1].variant}" for o in args.only)]
    if not todo:
        print(f"error: no layout matches --only {args.only!r}", file=sys.stderr)
        return 2
    head = ("model", "layout", "variant", "source", "JAX peak GiB", "JAX args GiB", "JAX temp GiB",
            "DeepSpeed est. GiB", "usable GiB", "verdict", "command")
    rows = []
    for model, lay, src in todo:
        print(f"compiling {model} {lay.label} ({lay.variant}) on {lay.ngpu} fake CPU devices ...", file=sys.stderr,
              flush=True)
        res = jax_memory(model, lay, timeout=args.timeout, refresh=args.refresh)
        ds = ds_memory(model, lay, cluster, Assumptions()).total
        if res.get("ok"):
            peak, m = res["peak_bytes"], res["memory"]
            cells = [f"{peak / GIB:.1f}", f"{m['argument'] / GIB:.1f}", f"{m['temp'] / GIB:.1f}"]
            verdict = "fits" if peak <= usable else f"over by {(peak - usable) / GIB:.1f}"
        else:
            cells, verdict = ["–", "–", "–"], f"not compiled: {res.get('reason', '?')[:80]}"
        rows.append([model, lay.label, lay.variant, src, *cells, f"{ds / GIB:.1f}", f"{usable / GIB:.1f}", verdict,
                     f"`{command(model, lay)}`"])
        print(" | ".join(rows[-1][:10]), flush=True)
    md = "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
    md += "".join("| " + " | ".join(r) + " |\n" for r in rows)
    print()
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
