"""Peak host RSS of building the torch reference's model per rank, with 1, 2 and 4 ranks: it must fall as ~1/ranks.

    .venv/bin/python benchmarks/bench_construct_rss.py [--layers 48] [--ranks 1,2,4] [--init torch] [--json out.json]

The ``bench`` preset (hidden 512, vocab 4096) with --layers blocks (48: 145M parameters, 580 MB in
fp32), so the model, not the interpreter + torch + DeepSpeed baseline, dominates. Each rank is a
real process on gloo that builds its share the way its engine does (``torch_ref.build``) and
nothing else (no ``deepspeed.initialize``, no optimizer state):

* zero3: ``deepspeed.zero.Init`` construction, each rank filling its partitions;
* pipeline: DeepSpeed ``PipelineModule`` of ``LayerSpec``s over the ranks as stages, ZeRO-1;
* tp: ``build.tp_model`` with the ranks as tensor=N: full-shape host weights of which only the
  rank's AutoTP slices are written (AutoTP itself cuts them later, in ``deepspeed.initialize``);
  the unwritten rest must not count. At this size a row-parallel slice is narrower than a page
  (wo's rows are 2 KiB), so those weights count whole: expect ~1/N for the rest only;
* whole: the whole model on every rank, as every engine built it before (``build.whole_model``).

Per rank: ru_maxrss after joining the process group (the baseline) and after the build; the
table shows the growth (max over ranks) and the parameter bytes the rank holds. One rank runs the
whole model in all three rows. CPU, one thread per rank, the trainers' host allocator.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("zero3", "pipeline", "tp", "whole")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(mode: str, layers: int, init: str) -> dict:
    """One rank (RANK/WORLD_SIZE/MASTER_* from the environment): join gloo, build, report bytes and RSS."""
    import dataclasses
    import gc

    import deepspeed
    import torch

    from configs import load_config
    from runtime import launcher_env
    from runtime.hostmem import reuse_host_memory
    from torch_ref import build
    from torch_ref.ds_config import installed_ds_config
    from torch_ref.weights import TorchInit

    reuse_host_memory()
    torch.set_num_threads(1)
    launch = launcher_env.read()  # the one reader of launcher variables; run() sets torchrun's
    if launch is None:
        raise SystemExit("--worker runs as one rank of run(): RANK/WORLD_SIZE are not set")
    rank, world = launch.rank, launch.world_size
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    cfg = load_config("bench", {"parallel.mesh": f"fsdp={world}" if mode == "zero3" else f"pipeline={world}",
                                "parallel.zero": 3 if mode == "zero3" else 1}, validate=False)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layers=layers))
    if init != "torch":
        raise SystemExit(f"--init {init!r}: the benchmark draws its weights (--init torch)")
    src = TorchInit(cfg.model, 0)
    gc.collect()
    base = _peak()
    if mode == "zero3":
        model = build.zero3_model(cfg.model, installed_ds_config(cfg), src)
    elif mode == "tp":
        model = build.tp_model(cfg.model, src, world, rank)
    elif mode == "pipeline" and world > 1:
        from deepspeed.pipe import PipelineModule
        from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

        model = PipelineModule(layers=build.pipeline_specs(cfg.model, src), topology=PipeDataParallelTopology(
            num_pp=world, num_dp=1), partition_method="type:Block")
    else:
        model = build.whole_model(cfg.model, src)
    if mode == "tp":  # what the rank keeps once AutoTP has cut: the sharded projections by 1/N, the rest whole
        held = sum(p.numel() // (world if n.rsplit(".", 2)[-2] in build.TP_COLUMN | build.TP_ROW else 1)
                   for n, p in model.named_parameters()) * 4
    else:
        held = build.local_param_bytes(model)
    out = {"rank": rank, "world": world, "mode": mode, "base_rss": base, "peak_rss": _peak(),
           "param_bytes": held, "model_params": cfg.model.n_params()}
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return out


def run(mode: str, ranks: int, layers: int, init: str) -> list[dict]:
    import tempfile

    from runtime import procgroup
    from runtime.hostmem import allocator_env

    port, env0 = procgroup.free_port(), allocator_env()
    envs = [{**env0, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
             "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
            for r in range(ranks)]
    argv = [sys.executable, __file__, "--worker", mode, "--layers", str(layers), "--init", init]
    with tempfile.TemporaryDirectory() as tmp:
        logs = [(Path(tmp) / f"{r}.out", Path(tmp) / f"{r}.err") for r in range(ranks)]
        group = procgroup.start([argv] * ranks, envs, logs=logs)
        group.wait(deadline=time.monotonic() + 900, kill_on_stop=True)
        first = group.first_failure()
        if first is not None or group.stopped:
            rank = first if first is not None else min(group.stopped)
            tail = "\n".join(logs[rank][1].read_text().splitlines()[-6:])
            raise SystemExit(f"{mode} x{ranks}: rank {rank} failed ({group.describe(rank)}):\n{tail}")
        return [json.loads(out.read_text().strip().splitlines()[-1]) for out, _ in logs]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--ranks", default="1,2,4", help="comma-separated rank counts")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--init", default="torch")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.layers, args.init)), flush=True)
        return []
    try:
        ranks = [int(x) for x in args.ranks.split(",")]
        modes = args.modes.split(",")
        bad = [m for m in modes if m not in MODES]
        if bad or args.layers < 1 or any(n < 1 for n in ranks):
            raise ValueError(f"modes {bad} (use {', '.join(MODES)})" if bad else "--layers and --ranks must be >= 1")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    table = []
    print(f"{'build':<9} {'ranks':>5} {'params/rank MiB':>16} {'RSS growth/rank MiB (max)':>26} "
          f"{'x 1-rank':>9} {'baseline MiB':>13}")
    first: dict[str, int] = {}
    for mode in modes:
        for n in ranks:
            rows = run(mode, n, args.layers, args.init)
            growth = max(r["peak_rss"] - r["base_rss"] for r in rows)
            pbytes = max(r["param_bytes"] for r in rows)
            first.setdefault(mode, growth)
            row = {"mode": mode, "ranks": n, "param_bytes_max": pbytes, "rss_growth_max": growth,
                   "base_rss_max": max(r["base_rss"] for r in rows), "model_params": rows[0]["model_params"],
                   "per_rank": rows}
            table.append(row)
            print(f"{mode:<9} {n:>5} {pbytes / 2**20:>16.1f} {growth / 2**20:>26.1f} {growth / first[mode]:>9.2f} "
                  f"{row['base_rss_max'] / 2**20:>13.0f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")
    return table


if __name__ == "__main__":
    main()
