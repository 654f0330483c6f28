"""Llama-2 as a plain ``nn.Module``: the same math as ``jax_impl.model``, nothing distributed.

Parameter names map 1:1 to the Flax tree (see ``weightmap.jaxtorch`` for the table); linear
weights are torch's (out, in), i.e. the transpose of JAX's (in, out). Layers are an
``nn.ModuleList`` of ``Block`` so a pipeline can cut between them (``torch_ref.build.pipeline_specs``).

Numerics, as the JAX side: RMSNorm and rotary embeddings in fp32, then cast to the compute
dtype (the parameters' dtype: fp32, or bf16 under DeepSpeed's bf16 mode); causal softmax in
fp32 (``scaled_dot_product_attention`` accumulates in fp32 for bf16 inputs on CPU); SwiGLU
product in fp32; logits in fp32. In fp32 every op matches JAX to rounding (tests: 1e-5).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from configs import ModelConfig, rope


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * w, computed in fp32, returned in ``dtype``."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * w.float()).to(dtype)


def rope_tables(seq: int, dim: int, theta: float, device: torch.device | str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (seq, dim) fp32 for non-interleaved ("rotate half") rotary embeddings: the host tables both
    models share (``configs.rope``; correctly rounded, so JAX's are the same bits on every platform)."""
    return tuple(torch.from_numpy(np.array(t)).to(device) for t in rope.rope_tables(int(seq), int(dim), float(theta)))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (batch, seq, heads, head_dim), rotated in fp32, returned in x's dtype."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x32 * cos[None, :, None, :] + rotated * sin[None, :, None, :]).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal GQA. q (b, s, H, D); k, v (b, s, K, D) -> (b, s, H*D); query head j reads KV head j // (H/K).

    SDPA's ``enable_gqa`` repeats each KV head H/K times consecutively (repeat_interleave), which
    is exactly that grouping; scale 1/sqrt(D) is its default.
    """
    b, s, nh, hd = q.shape
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, enable_gqa=k.shape[2] != nh)
    return out.transpose(1, 2).reshape(b, s, nh * hd)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device: torch.device | str | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, x.dtype)


class _RopeCache:
    """cos/sin per (seq, device), kept off the module: DeepSpeed's bf16 cast would round buffers."""

    def __init__(self, dim: int, theta: float):
        self.dim, self.theta = dim, theta
        self._tables: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (seq, str(device))
        if key not in self._tables:
            self._tables[key] = rope_tables(seq, self.dim, self.theta, device)
        return self._tables[key]


def embedding(n: int, dim: int, device: torch.device | str | None = None) -> nn.Embedding:
    """nn.Embedding; on the meta device without its default normal_ init, which there would import
    torch._dynamo (~70 MiB per process, and it fails under deepspeed.zero.Init's patched Tensor.__new__)."""
    if str(device) == "meta":
        return nn.Embedding(n, dim, _weight=torch.empty(n, dim, device="meta"))
    return nn.Embedding(n, dim, device=device)


class Block(nn.Module):
    """One pre-norm layer: x + attn(norm(x)), then x + swiglu(norm(x)). Flat names match JAX's ``layers.*``."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str | None = None):
        super().__init__()
        h, hd, f = cfg.hidden, cfg.dim_head, cfg.ffn_hidden
        self.head_dim = hd
        self.attn_norm = RMSNorm(h, cfg.norm_eps, device=device)
        self.wq = nn.Linear(h, cfg.n_heads * hd, bias=False, device=device)
        self.wk = nn.Linear(h, cfg.n_kv_heads * hd, bias=False, device=device)
        self.wv = nn.Linear(h, cfg.n_kv_heads * hd, bias=False, device=device)
        self.wo = nn.Linear(cfg.n_heads * hd, h, bias=False, device=device)
        self.mlp_norm = RMSNorm(h, cfg.norm_eps, device=device)
        self.w_gate = nn.Linear(h, f, bias=False, device=device)
        self.w_up = nn.Linear(h, f, bias=False, device=device)
        self.w_down = nn.Linear(f, h, bias=False, device=device)
        self.rope = _RopeCache(hd, cfg.rope_theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        hd = self.head_dim
        cos, sin = self.rope(s, x.device)
        y = self.attn_norm(x)
        # -1 heads: under tensor parallelism each rank holds H/tp query and K/tp KV heads, and the
        # local grouping j // (H/K) is still right because K/tp is whole.
        q = apply_rope(self.wq(y).view(b, s, -1, hd), cos, sin)
        k = apply_rope(self.wk(y).view(b, s, -1, hd), cos, sin)
        v = self.wv(y).view(b, s, -1, hd)
        x = x + self.wo(attention(q, k, v))
        y = self.mlp_norm(x)
        m = (F.silu(self.w_gate(y).float()) * self.w_up(y).float()).to(x.dtype)
        return x + self.w_down(m)


class Llama(nn.Module):
    """tokens (batch, seq) int -> logits (batch, seq, padded_vocab) fp32.

    ``device="meta"`` builds the shapes only (no storage, no default init): the engines then
    materialise just their own shards and fill them from ``torch_ref.weights``. Pass ``device``
    as a keyword: ``deepspeed.zero.Init`` recognises that construction by it.
    """

    def __init__(self, cfg: ModelConfig, device: torch.device | str | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed = embedding(cfg.padded_vocab, cfg.hidden, device=device)
        self.layers = nn.ModuleList(Block(cfg, device=device) for _ in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.hidden, cfg.norm_eps, device=device)
        self.head = nn.Linear(cfg.hidden, cfg.padded_vocab, bias=False, device=device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return logits_fp32(self.final_norm(x), self.head.weight)


def logits_fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 logits from compute-dtype inputs: bf16 x bf16 products are exact in fp32, as JAX's matmul."""
    return F.linear(x.float(), w.float())


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over all positions (padded vocab rows not masked, as JAX)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten().long())


@torch.no_grad()
def init_torch(model: Llama, seed: int) -> Llama:
    """Pure-torch init with the JAX recipe's stds (not its random stream): N(0, std) matrices,
    N(0, out_std) for wo/w_down, N(0, embed_init_std) for the embedding, ones for norms.

    Every parameter is drawn from its own (seed, name) streams (``torch_ref.weights.TorchInit``),
    so a partitioned build holds exactly the same values as this whole one.
    """
    from torch_ref.weights import TorchInit

    src = TorchInit(model.cfg, seed)
    for name, p in model.named_parameters():
        p.copy_(src.full(name))
    return model


# ----------------------------------------------------------------------------- pipeline pieces
class EmbedStage(nn.Module):
    """First pipeline layer: token embedding (holds the Llama's own ``embed`` module)."""

    def __init__(self, embed: nn.Embedding):
        super().__init__()
        self.embed = embed

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens)


class HeadStage(nn.Module):
    """Last pipeline layer: final norm + untied head, fp32 logits."""

    def __init__(self, final_norm: RMSNorm, head: nn.Linear):
        super().__init__()
        self.final_norm, self.head = final_norm, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_fp32(self.final_norm(x), self.head.weight)


def n_params(model: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in model.parameters())
