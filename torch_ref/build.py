"""Each engine's model, built so that a rank only ever holds what it keeps, filled from a ``WeightSource``.

The model is first built on the meta device (shapes, no storage, no default init); then only the
rank's own storage is materialised and filled with its slice of the initial weights:

* ZeRO-3 / hpZ (``zero3_model``): under ``deepspeed.zero.Init``, ``to_empty`` materialises one leaf
  module at a time and DeepSpeed partitions it at once; each rank then writes its flat partition
  (and hpZ's secondary partition) from ``WeightSource.flat``. The full leaf exists for a moment,
  uninitialised (DeepSpeed's own broadcast of it carries no values we keep).
* FSDP2 (``fsdp2_model``): ``fully_shard`` on the meta model, ``to_empty``, then each DTensor's
  local rows from ``WeightSource.rows``.
* Pipeline (``pipeline_specs``): ``LayerSpec``s, so DeepSpeed builds only the stage's own layers;
  each layer fills itself from its global parameter names (``layers.{i}.*``).
* Tensor parallel (``tp_model``): DeepSpeed AutoTP needs real full-shape weights to cut, and cuts them
  inside ``deepspeed.initialize``, after which ZeRO flattens them: there is no point in between at
  which to fill a shard. So the full weights are allocated uninitialised on the host and only the
  slice AutoTP keeps on this rank is written; the OS commits only the pages written, and AutoTP
  frees each full weight when it copies its slice out. A row-parallel slice (a column range)
  crosses every row, so it commits every page its rows' slices touch: about 1/tp plus a page per
  row (the 42B's rows are 32 KiB and 112 KiB; ``benchmarks/bench_construct_rss.py --modes tp``).
* ZeRO-0/1/2 (``whole_model``): every rank keeps all fp32 parameters by definition.

Whole or in pieces, every parameter holds the same values (``tests/test_torch_build.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from configs import ModelConfig
from torch_ref.model import Block, EmbedStage, HeadStage, Llama, RMSNorm, embedding
from torch_ref.weights import WeightSource

# AutoTP's split of each block projection (the layer_specs in engines.AUTOTP_PARTITION)
TP_COLUMN = frozenset({"wq", "wk", "wv", "w_gate", "w_up"})  # output rows split
TP_ROW = frozenset({"wo", "w_down"})  # input columns split


@torch.no_grad()
def fill(module: nn.Module, src: WeightSource, prefix: str = "") -> nn.Module:
    """Copy every parameter of MODULE whole from SRC (global name = PREFIX + local name)."""
    for name, p in module.named_parameters():
        p.copy_(src.full(prefix + name).view(p.shape))
    return module


def materialise(module: nn.Module, src: WeightSource | None, device: torch.device | str, prefix: str = ""
                ) -> nn.Module:
    """Give a meta-built MODULE storage on DEVICE and its initial weights (none if SRC is None: planning)."""
    module.to_empty(device=device)
    return fill(module, src, prefix) if src is not None else module


def whole_model(cfg: ModelConfig, src: WeightSource | None, device: torch.device | str = "cpu") -> Llama:
    """All parameters on this rank (ZeRO-0/1/2 without pipeline or tensor parallelism)."""
    return materialise(Llama(cfg, device="meta"), src, device)


# ----------------------------------------------------------------------------- ZeRO-3
def zero3_model(cfg: ModelConfig, conf: dict[str, Any], src: WeightSource | None, *, mics: bool = False,
                device: torch.device | str | None = None, remote_device: str | None = None) -> Llama:
    """The model partitioned at construction by ``deepspeed.zero.Init`` (``MiCS_Init`` with MICS).

    DEVICE: where a leaf lives for its moment in full (default: the accelerator). REMOTE_DEVICE:
    DeepSpeed's home for the partitions (default: the accelerator); "meta" plans without storage.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    device = device or get_accelerator().current_device_name()
    init = deepspeed.zero.MiCS_Init if mics else deepspeed.zero.Init
    kwargs = {"remote_device": remote_device} if remote_device else {}
    with init(config_dict_or_path=conf, **kwargs):
        # keyword device="meta": zero.Init then partitions each leaf as to_empty materialises it
        model = Llama(cfg, device="meta")
        model.to_empty(device=device)
    if src is not None:
        fill_zero3_partitions(model.named_parameters(), src)
    return model


@torch.no_grad()
def fill_zero3_partitions(named: Iterable[tuple[str, nn.Parameter]], src: WeightSource) -> None:
    """Write each ZeRO-3 parameter's flat partition (and hpZ's secondary partition) from SRC.

    DeepSpeed's layout: the flattened parameter padded to a multiple of the group size, rank r of
    the partition group holding elements [r * n, (r + 1) * n); the padding is zero.
    """
    for name, p in named:
        parts = [(p.ds_tensor, p.ds_process_group)]
        if getattr(p, "ds_secondary_tensor", None) is not None:
            parts.append((p.ds_secondary_tensor, p.ds_zero_param_process_group))
        for part, group in parts:
            n = part.numel()
            start = min(dist.get_rank(group=group) * n, p.ds_numel)
            stop = min(start + n, p.ds_numel)
            part[:stop - start].copy_(src.flat(name, start, stop))
            part[stop - start:].zero_()


# ----------------------------------------------------------------------------- FSDP2
def fsdp2_model(cfg: ModelConfig, src: WeightSource | None, mesh: Any, mp_policy: Any,
                device: torch.device | str) -> Llama:
    """``fully_shard`` per block and at the root on a meta model, then only the local shards materialised."""
    from torch.distributed.fsdp import fully_shard

    model = Llama(cfg, device="meta")
    for block in model.layers:  # one all-gather per block, as DeepSpeed's per-module ZeRO-3 fetch
        fully_shard(block, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    model.to_empty(device=device)
    if src is not None:
        fill_row_shards(model.named_parameters(), src, mesh)
    return model


@torch.no_grad()
def fill_row_shards(named: Iterable[tuple[str, nn.Parameter]], src: WeightSource, mesh: Any) -> None:
    """Write each DTensor parameter's local rows (``Shard(0)`` over MESH: torch.chunk's split, short last shards)."""
    from torch.distributed.tensor import Shard

    for name, p in named:
        local = p.to_local()
        start, n_rows = 0, p.shape[0]
        for dim, placement in enumerate(p.placements):
            if isinstance(placement, Shard):
                if placement.dim != 0:
                    raise ValueError(f"{name}: sharded on dim {placement.dim}; only row shards (dim 0) are filled")
                chunk, k = -(-n_rows // mesh.size(dim)), mesh.get_local_rank(dim)
                start += chunk * k
                n_rows = max(0, min(chunk, n_rows - chunk * k))
        if tuple(local.shape) != (n_rows, *p.shape[1:]):
            raise RuntimeError(f"{name}: local shard {tuple(local.shape)} is not rows {start}:{start + n_rows} of "
                               f"{tuple(p.shape)}")
        local.copy_(src.rows(name, start, start + n_rows).view(local.shape))


# ----------------------------------------------------------------------------- pipeline
class StageEmbed(EmbedStage):
    """The pipeline's first layer, built by its own stage only."""

    def __init__(self, cfg: ModelConfig, src: WeightSource | None, device: torch.device | str):
        super().__init__(embedding(cfg.padded_vocab, cfg.hidden, device="meta"))
        materialise(self, src, device)


class StageBlock(Block):
    """Transformer block ``index`` (its name holds "Block": DeepSpeed's ``type:Block`` balances on it)."""

    def __init__(self, cfg: ModelConfig, index: int, src: WeightSource | None, device: torch.device | str):
        super().__init__(cfg, device="meta")
        materialise(self, src, device, prefix=f"layers.{index}.")


class StageHead(HeadStage):
    """The pipeline's last layer: final norm + head."""

    def __init__(self, cfg: ModelConfig, src: WeightSource | None, device: torch.device | str):
        super().__init__(RMSNorm(cfg.hidden, cfg.norm_eps, device="meta"),
                         nn.Linear(cfg.hidden, cfg.padded_vocab, bias=False, device="meta"))
        materialise(self, src, device)


def pipeline_specs(cfg: ModelConfig, src: WeightSource | None, device: torch.device | str = "cpu") -> list[Any]:
    """[embed, block_0 .. block_{L-1}, norm+head] as ``LayerSpec``s: a stage builds only its own layers."""
    from deepspeed.pipe import LayerSpec

    return [LayerSpec(StageEmbed, cfg, src, device),
            *(LayerSpec(StageBlock, cfg, i, src, device) for i in range(cfg.n_layers)),
            LayerSpec(StageHead, cfg, src, device)]


def stage_bounds(cfg: ModelConfig, stages: int) -> list[int]:
    """Layer index bounds per stage, as DeepSpeed's ``partition_method="type:Block"`` cuts ``pipeline_specs``."""
    from deepspeed.runtime.utils import partition_balanced

    weights = [0, *([1] * cfg.n_layers), 0]
    return partition_balanced(weights=weights, num_parts=stages)


# ----------------------------------------------------------------------------- tensor parallel
def tp_shard(n: int, tp: int, rank: int) -> slice:
    """Rank's share of N along a split dimension (AutoTP's even split; validate_config makes N divisible)."""
    if n % tp:
        raise ValueError(f"dimension {n} does not divide by tensor={tp}")
    return slice(rank * n // tp, (rank + 1) * n // tp)


def tp_model(cfg: ModelConfig, src: WeightSource | None, tp: int, tp_rank: int) -> Llama:
    """Full-shape host weights, uninitialised, with only this rank's AutoTP slices (and the replicated ones) written."""
    model = Llama(cfg, device="meta").to_empty(device="cpu")
    if src is None:
        return model
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = name.rsplit(".", 2)[-2]
            if key in TP_COLUMN:
                rows = tp_shard(p.shape[0], tp, tp_rank)
                p[rows].copy_(src.window(name, rows, slice(None)))
            elif key in TP_ROW:
                cols = tp_shard(p.shape[1], tp, tp_rank)
                p[:, cols].copy_(src.window(name, slice(None), cols))
            else:
                p.copy_(src.full(name))
    return model


def check_tp_shards(module: nn.Module, src: WeightSource, tp: int, tp_rank: int, dtype: torch.dtype) -> None:
    """After AutoTP: each sharded weight's first and last local rows are the slice we wrote (a cheap spot check)."""
    for name, p in module.named_parameters():
        key = name.rsplit(".", 2)[-2]
        if key not in TP_COLUMN | TP_ROW:
            continue
        full = src.shape(name)
        if key in TP_COLUMN:
            rows, cols = tp_shard(full[0], tp, tp_rank), slice(None)
        else:
            rows, cols = slice(0, full[0]), tp_shard(full[1], tp, tp_rank)
        for r in (0, rows.stop - rows.start - 1):
            want = src.window(name, slice(rows.start + r, rows.start + r + 1), cols).to(dtype)
            got = p.detach()[r:r + 1].to("cpu", dtype)
            if not torch.equal(got, want):
                raise RuntimeError(f"AutoTP kept a different slice of {name} on tensor rank {tp_rank} than the one "
                                   f"filled (local row {r}); its split is not the even split tp_shard assumes")


# ----------------------------------------------------------------------------- accounting
def local_param_bytes(model: nn.Module) -> int:
    """Bytes of parameter storage this rank holds: ZeRO-3 partitions, DTensor local shards, or plain tensors."""
    total = 0
    for p in model.parameters():
        for t in (getattr(p, "ds_tensor", None), getattr(p, "ds_secondary_tensor", None)):
            if t is not None:
                total += t.numel() * t.element_size()
        if getattr(p, "ds_tensor", None) is None:
            local = p.to_local() if hasattr(p, "to_local") else p
            total += local.numel() * local.element_size()
    return total
