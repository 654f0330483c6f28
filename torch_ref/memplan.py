"""``python -m torch_ref.memplan``: one rank's share of a layout's model, built in this process, and its bytes.

    python -m torch_ref.memplan --preset llama2-70b --mesh fsdp=96 --zero 3
    python -m torch_ref.memplan --preset llama2-70b --mesh data=8,fsdp=12 --zero 3 --parallel.hpz=true
    python -m torch_ref.memplan --preset llama2-70b --mesh pipeline=16,data=6 --zero 1 --rank 0

Same flags as ``torch_ref.train`` (``--rank R``: which rank to build, default 0). No worker is
started: the process joins a fake process group of the layout's world size as rank R (torch's
``fake`` backend: collectives are no-ops) and builds that rank's model the way its engine does,
with the storage it keeps on the meta device, so a 96-rank 70B layout is planned on a laptop:

* ZeRO-3 / hpZ: DeepSpeed's own ``zero.Init`` partitions each parameter (``remote_device="meta"``:
  the partitions have shapes, no storage). Each leaf exists in full for a moment on the host,
  allocated but never written (so never committed), as in a real run.
* MiCS (FSDP2): ``fully_shard`` of the meta model on the (data, fsdp) DeviceMesh; DTensor local shards.
* Pipeline: the stage's own layers, cut where DeepSpeed's ``type:Block`` partitioning cuts them
  (``PipelineModule`` itself cannot be built on meta: it moves the stage to the accelerator).
* Tensor parallel: AutoTP's even split of the block projections, counted on the meta model
  (AutoTP only cuts inside ``deepspeed.initialize``); embedding, norms and head replicated.
* ZeRO-0/1/2: the whole model.

Reported: the rank's parameter storage as built (in the dtype DeepSpeed keeps the model in: bf16
under ``--dtype bf16`` for ZeRO-3) and the whole model's fp32 bytes for comparison. Optimizer state
(fp32 master weights and AdamW moments) is not built here.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from typing import Any

from configs import Config, ConfigError
from configs.cli import resolve_config, trainer_parser
from torch_ref.layouts import Layout, plan_layout


@contextlib.contextmanager
def fake_world(rank: int, world: int) -> Iterator[None]:
    """This process as rank RANK of a WORLD-rank fake process group (no communication), DeepSpeed's comm on top."""
    import deepspeed
    import deepspeed.comm as ds_dist
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group already exists in this process; the plan needs its own fake one")
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0"})
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        deepspeed.init_distributed(dist_backend="fake", auto_mpi_discovery=False, verbose=False)
        yield
    finally:
        ds_dist.destroy_process_group()  # also drops DeepSpeed's cached groups (hpZ, TP)
        if dist.is_initialized():
            dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build_rank_model(cfg: Config, layout: Layout, rank: int) -> tuple[Any, str]:
    """Rank RANK's model with meta storage, in an already joined (fake) world; returns it and how it was built."""
    import torch

    from torch_ref import build
    from torch_ref.ds_config import installed_ds_config
    from torch_ref.model import Llama

    m, p = cfg.model, cfg.parallel
    if layout.engine == "fsdp2-mics":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        mesh = init_device_mesh("cpu", (layout.shape.data, layout.shape.fsdp),
                                mesh_dim_names=("replicate", "shard"))
        return build.fsdp2_model(m, None, mesh, MixedPrecisionPolicy(), "meta"), "FSDP2 fully_shard, local shards"
    if layout.engine == "deepspeed-mics" or (layout.engine == "deepspeed" and p.zero == 3):  # (no TP under ZeRO-3)
        model = build.zero3_model(m, installed_ds_config(cfg), None, mics=layout.engine == "deepspeed-mics",
                                  device="cpu", remote_device="meta")
        return model, "deepspeed.zero.Init partitions (remote_device=meta)"
    if layout.engine == "deepspeed-pipe":
        stage = layout.shape.stage(rank)
        bounds = build.stage_bounds(m, layout.shape.pipeline)
        lo, hi = bounds[stage], bounds[stage + 1]
        specs = build.pipeline_specs(m, None, "meta")[lo:hi]
        return (torch.nn.ModuleList(spec.build() for spec in specs),
                f"pipeline stage {stage} of {layout.shape.pipeline}: layers {lo}..{hi - 1} of "
                f"[embed, {m.n_layers} blocks, head] (DeepSpeed's type:Block cut)")
    model = Llama(m, device="meta")
    if layout.shape.tensor > 1:
        tp = layout.shape.tensor
        with torch.no_grad():
            for name, prm in model.named_parameters():
                key = name.rsplit(".", 2)[-2]
                if key in build.TP_COLUMN:
                    prm.data = prm.data[build.tp_shard(prm.shape[0], tp, 0)]
                elif key in build.TP_ROW:
                    prm.data = prm.data[:, build.tp_shard(prm.shape[1], tp, 0)]
        return model, f"AutoTP even split over tensor={tp} (counted on meta), replicated embedding/norms/head"
    return model, f"whole model (ZeRO-{p.zero} keeps all parameters on every rank)"


def check_rank(layout: Layout, rank: int) -> None:
    if not 0 <= rank < layout.world_size:
        raise ConfigError(f"--rank {rank} is outside the layout's {layout.world_size} ranks; use "
                          f"0..{layout.world_size - 1}")


def plan(cfg: Config, layout: Layout, rank: int = 0) -> dict[str, Any]:
    """Build RANK's share in a fake world of the layout's size; its parameter bytes, peak RSS and time."""
    from torch_ref.build import local_param_bytes

    check_rank(layout, rank)
    t = time.perf_counter()
    with fake_world(rank, layout.world_size):
        model, how = build_rank_model(cfg, layout, rank)
        local = local_param_bytes(model)
        dtypes = sorted({str(getattr(q, "ds_tensor", q).dtype).replace("torch.", "") for q in model.parameters()})
    return {"layout": layout.label, "engine": layout.engine, "world_size": layout.world_size, "rank": rank,
            "built": how, "param_bytes_rank": local, "param_dtypes": dtypes,
            "model_params": cfg.model.n_params(), "model_fp32_bytes": 4 * cfg.model.n_params(),
            "build_s": time.perf_counter() - t,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = trainer_parser("python -m torch_ref.memplan", __doc__, "ignored: the plan builds on the meta device")
    ap.add_argument("--rank", type=int, default=0, help="the rank whose share is built (default 0)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    try:
        cfg, args = resolve_config(ap, argv, validate=False)
        if args.mesh == "auto":
            raise ConfigError("torch_ref.memplan builds one explicit layout: give --mesh (and --zero/--mbs/--gas), "
                              "e.g. the pick that `torch_ref.train --mesh auto --dry-run` prints")
        layout = plan_layout(cfg)
        check_rank(layout, args.rank)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    out = plan(cfg, layout, args.rank)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{cfg.model.name} ({out['model_params']:,} params, {_gib(out['model_fp32_bytes'])} in fp32) | "
              f"{layout.label}: {layout.description} | {layout.world_size} ranks, mesh {layout.mesh}")
        print(f"rank {args.rank}: {out['built']}")
        print(f"  parameter storage on this rank: {out['param_bytes_rank']:,} B = {_gib(out['param_bytes_rank'])} "
              f"({'/'.join(out['param_dtypes'])}); whole model fp32 / rank = "
              f"{out['model_fp32_bytes'] / max(out['param_bytes_rank'], 1):,.1f}x this")
        print(f"  built in {out['build_s']:.1f}s; peak RSS of this process {_gib(out['peak_rss_bytes'])}")
    return out


if __name__ == "__main__":
    main()
