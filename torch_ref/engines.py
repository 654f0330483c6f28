"""One training step per layout: DeepSpeed ZeRO-0..3 (+hpZ), DeepSpeed pipeline, tensor parallel, MiCS.

Each runner builds its own model from a ``WeightSource`` (``torch_ref.build``: a rank materialises
only what it keeps) and takes a rank's (gas, mbs, seq+1) int64 token block to do one optimizer step:
GAS microbatches, gradient = mean over microbatches and over data-parallel ranks (what JAX
computes for the whole global batch), global-norm clipping, AdamW. It returns the rank's
mean microbatch loss and the pre-clip global gradient norm.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from configs import Config
from torch_ref import build
from torch_ref.layouts import Layout
from torch_ref.model import Llama, cross_entropy
from torch_ref.weights import WeightSource


def param_groups(named: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as the JAX optimizer: no weight decay on the norm weights."""
    decay = [p for n, p in named if not n.endswith("norm.weight")]
    no_decay = [p for n, p in named if n.endswith("norm.weight")]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_adamw(cfg: Config, named: list[tuple[str, torch.nn.Parameter]]) -> torch.optim.AdamW:
    """Plain torch AdamW (DeepSpeed's fused Adam ops would take ~50 s to compile on CPU)."""
    o = cfg.optim
    return torch.optim.AdamW(param_groups(named, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             foreach=False)


class Runner:
    """A layout's engine behind one interface."""

    optimizer: Any
    model: torch.nn.Module  # this rank's (partitioned) model

    def set_lr(self, lr: float) -> float:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return float(self.optimizer.param_groups[0]["lr"])

    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, float]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def eval_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """The rank's mean microbatch loss of a (gas, mbs, seq+1) block: no gradients, no update."""
        with torch.no_grad():
            return torch.stack([cross_entropy(self.forward(m[:, :-1]), m[:, 1:]).float() for m in tokens]).mean()


def _device() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().current_device_name()


class DeepSpeedRunner(Runner):
    """``deepspeed.initialize``: ZeRO-0/1/2 on the whole model, ZeRO-3/hpZ on a model partitioned at construction."""

    def __init__(self, cfg: Config, src: WeightSource, conf: dict[str, Any], mpu: Any = None,
                 model: Llama | None = None):
        if model is None:
            zero3 = conf["zero_optimization"]["stage"] == 3
            model = build.zero3_model(cfg.model, conf, src) if zero3 else build.whole_model(cfg.model, src, _device())
        self._initialize(cfg, model, conf, mpu)

    def _initialize(self, cfg: Config, model: Llama, conf: dict[str, Any], mpu: Any = None) -> None:
        import deepspeed

        opt = make_adamw(cfg, list(model.named_parameters()))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=conf, mpu=mpu)
        self.model = self.engine.module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.engine(x)  # the engine gathers ZeRO-3 partitions and casts to the compute dtype

    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, float]:
        losses = []
        for micro in tokens:  # DeepSpeed scales each backward by 1/gas and steps at the GAS boundary
            loss = cross_entropy(self.engine(micro[:, :-1]), micro[:, 1:])
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach().float())
        return torch.stack(losses).mean(), _norm(self.engine.get_global_grad_norm())


class PipelineRunner(Runner):
    """DeepSpeed ``PipelineModule``: embedding on the first stage, norm + head on the last, GAS microbatches."""

    def __init__(self, cfg: Config, src: WeightSource, conf: dict[str, Any], layout: Layout):
        import deepspeed
        from deepspeed.pipe import PipelineModule
        from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

        topo = PipeDataParallelTopology(num_pp=layout.shape.pipeline, num_dp=layout.dp)
        # LayerSpecs: each stage builds (and fills) only its own layers. "type:Block" balances the
        # transformer blocks; the embed/head layers stay at the ends
        pipe = PipelineModule(layers=build.pipeline_specs(cfg.model, src, _device()), loss_fn=cross_entropy,
                              topology=topo, partition_method="type:Block")
        named = list(pipe.named_parameters())
        opt = make_adamw(cfg, named)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=pipe, optimizer=opt, config=conf)
        self.model = self.engine.module
        self.stage = self.engine.stage_id

    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, float]:
        it = iter([(m[:, :-1].contiguous(), m[:, 1:].contiguous()) for m in tokens])
        # train_batch returns the GAS-mean loss averaged over DP, broadcast from the last stage;
        # the caller's DP all-reduce then leaves it unchanged
        loss = self.engine.train_batch(data_iter=it)
        return loss.detach().float(), _norm(self.engine.get_global_grad_norm())

    def eval_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        # the same schedule forward only; the GAS-mean loss, averaged over DP and sent to every stage
        it = iter([(m[:, :-1].contiguous(), m[:, 1:].contiguous()) for m in tokens])
        return self.engine.eval_batch(data_iter=it).detach().float()


def _norm(x: Any) -> float:
    if x is None:
        return math.nan
    return float(x.item() if torch.is_tensor(x) else x)


def dp_mean(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Mean over the data-parallel group (every DP rank's loss covers the same number of tokens)."""
    x = x.detach().clone()
    dist.all_reduce(x, group=group)
    return x / dist.get_world_size(group)


# Column-parallel (output dim split): q/k/v and the SwiGLU inputs; row-parallel (input dim split,
# all-reduce after): the attention output and the down projection. Embedding, norms and head stay
# replicated. Each rank then holds H/tp query and K/tp KV heads (validate_config checks divisibility).
AUTOTP_PARTITION = {
    "use_default_specs": False,
    "layer_specs": [
        {"patterns": [r".*\.wo\.weight$", r".*\.w_down\.weight$"], "partition_type": "row"},
        {"patterns": [r".*\.w[qkv]\.weight$", r".*\.w_gate\.weight$", r".*\.w_up\.weight$"],
         "partition_type": "column"},
    ],
}


class TensorParallelRunner(DeepSpeedRunner):
    """DeepSpeed AutoTP training (``tensor_parallel.autotp_size``) under ZeRO-1/2, with our layer specs.

    It works on CPU/gloo with DeepSpeed 0.19.8, so torch's own tensor-parallel API is not needed.
    The model is built on the host at full shape but only this rank's slices are written
    (``build.tp_model``): the OS commits only the pages written, and AutoTP frees the rest.
    """

    def __init__(self, cfg: Config, src: WeightSource, conf: dict[str, Any], layout: Layout):
        from deepspeed.utils import groups

        tp = layout.shape.tensor
        # DeepSpeed's own (data, tensor) groups, tensor innermost as our mesh; passing them as the mpu
        # makes DeepSpeed count the data-parallel world as world / tp (batch size, gradient averaging)
        groups._init_tp_mesh_device(tensor_model_parallel_size=tp)
        tp_rank = groups.get_tensor_model_parallel_rank()
        # no "dtype" key: DeepSpeed requires a torch.dtype there, which its own rank-0 config printer
        # cannot serialise (TypeError); precision comes from the bf16 section as everywhere else
        conf = {**conf, "tensor_parallel": {"autotp_size": tp, "partition_config": AUTOTP_PARTITION}}
        model = build.tp_model(cfg.model, src, tp, tp_rank)
        super().__init__(cfg, src, conf, mpu=groups, model=model)
        # AutoTP must really have sharded the projections (not silently left them replicated) ...
        blk, m = self.engine.module.layers[0], cfg.model
        shapes = {n: tuple(getattr(blk, n).weight.shape) for n in ("wq", "wk", "wo", "w_up", "w_down")}
        want = {"wq": (m.n_heads * m.dim_head // tp, m.hidden), "wk": (m.n_kv_heads * m.dim_head // tp, m.hidden),
                "wo": (m.hidden, m.n_heads * m.dim_head // tp), "w_up": (m.ffn_hidden // tp, m.hidden),
                "w_down": (m.hidden, m.ffn_hidden // tp)}
        if shapes != want:
            raise RuntimeError(f"AutoTP left unexpected local weight shapes {shapes}; expected {want}")
        # ... and kept the slices build.tp_model wrote (the rest of each weight was never initialised)
        build.check_tp_shards(self.engine.module, src, tp, tp_rank, next(self.engine.module.parameters()).dtype)


class FSDP2MicsRunner(Runner):
    """MiCS semantics with torch FSDP2 hybrid sharding (DeepSpeed 0.19.7+ has no MiCS; 0.19.6's fails on gloo).

    ``fully_shard`` on a 2-D DeviceMesh (replicate = ``data``, shard = ``fsdp``): parameters,
    gradients and AdamW state are sharded inside each group of ``fsdp`` consecutive ranks and
    replicated across groups; gradients are reduce-scattered in the group and all-reduced across
    groups, averaged over all data-parallel ranks. Clipping and AdamW as the DeepSpeed runners.
    """

    def __init__(self, cfg: Config, src: WeightSource, layout: Layout):
        from deepspeed.accelerator import get_accelerator
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy
        from torch.distributed.tensor import Replicate, Shard

        # bf16: fp32 sharded master parameters, bf16 compute copies, fp32 gradient reduction (as DeepSpeed bf16)
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if cfg.train.dtype == "bf16" else MixedPrecisionPolicy())
        mesh = init_device_mesh(get_accelerator().device_name(), (layout.shape.data, layout.shape.fsdp),
                                mesh_dim_names=("replicate", "shard"))
        # fully_shard on the meta model, then only the local shards materialised and filled
        model = build.fsdp2_model(cfg.model, src, mesh, mp, _device())

        wrong = [n for n, p in model.named_parameters() if tuple(p.placements) != (Replicate(), Shard(0))]
        if wrong:
            raise RuntimeError(f"FSDP2 did not shard {wrong} as (replicate over data, shard over fsdp)")
        self.model, self.clip = model, cfg.optim.clip
        self.optimizer = make_adamw(cfg, list(model.named_parameters()))

    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, float]:
        losses, gas = [], len(tokens)
        for i, micro in enumerate(tokens):
            self.model.set_requires_gradient_sync(i == gas - 1)  # reduce gradients once, after the last microbatch
            loss = cross_entropy(self.model(micro[:, :-1]), micro[:, 1:])
            (loss / gas).backward()
            losses.append(loss.detach().float())
        params = list(self.model.parameters())
        if self.clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses).mean(), float(norm)


class DeepSpeedMicsRunner(DeepSpeedRunner):
    """DeepSpeed's own MiCS (``mics_shard_size``), for installs that still have ``deepspeed.runtime.zero.mics``.

    UNTESTED here: DeepSpeed 0.19.8 removed MiCS, so this path is selected only on older installs.
    The model is partitioned at construction under ``MiCS_Init`` and each rank writes its own
    partition, as the ZeRO-3 runner does.
    """

    def __init__(self, cfg: Config, src: WeightSource, conf: dict[str, Any]):
        super().__init__(cfg, src, conf, model=build.zero3_model(cfg.model, conf, src, mics=True))
