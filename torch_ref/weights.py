"""Initial weights one parameter, or one shard of one parameter, at a time: the same values however the model is cut.

A ``WeightSource`` answers "the fp32 values of parameter NAME, rows a:b (columns c:d)" by the
torch parameter names of ``torch_ref.model.Llama`` (``layers.3.wq.weight``), in torch's (out, in)
layout. The engines ask it only for what a rank holds: a ZeRO-3 partition is a flat element range
(``flat``), an FSDP2 shard a row range (``rows``), a row-parallel tensor-parallel shard a column
range (``window``), a pipeline stage its own layers' parameters (``full``). So no rank ever holds
the whole model, and a model built in pieces is bit-identical to one built whole.

``TorchInit`` (``--init torch``): N(0, std) with the JAX recipe's stds, ones for the norms. Each
parameter's flattened values are cut into fixed chunks of ``CHUNK`` elements and chunk k is drawn
from its own generator, seeded from (seed, name, k): any element range is reproducible on its own,
at the cost of drawing at most two chunks more than asked for.

``NpzInit`` (``--init jax``): the JAX initial weights in the run directory's ``init_params.npz``
(JAX names, stacked layers, (in, out) matrices), read in place through ``weightmap.npz.npz_members``:
only the requested slice of a member is ever read into memory.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch

from configs import ModelConfig

CHUNK = 1 << 20  # elements per random chunk (4 MiB of fp32)
_BLOCK_ELEMS = 1 << 24  # rows are read in blocks of about this many elements (64 MiB fp32) when cut into columns


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Torch parameter name -> torch shape, in ``Llama.named_parameters()`` order."""
    h, hd, f, v = cfg.hidden, cfg.dim_head, cfg.ffn_hidden, cfg.padded_vocab
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (v, h)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attn_norm.weight": (h,), p + "wq.weight": (q, h), p + "wk.weight": (kv, h),
                       p + "wv.weight": (kv, h), p + "wo.weight": (h, q), p + "mlp_norm.weight": (h,),
                       p + "w_gate.weight": (f, h), p + "w_up.weight": (f, h), p + "w_down.weight": (h, f)})
    shapes.update({"final_norm.weight": (h,), "head.weight": (v, h)})
    return shapes


def leaf_key(name: str) -> str:
    """``layers.3.wq.weight`` -> ``wq``; ``embed.weight`` -> ``embed``."""
    return name.rsplit(".", 2)[-2]


class WeightSource:
    """fp32 values of the initial parameters by torch name; subclasses implement ``rows``."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.shapes = param_shapes(cfg)

    def shape(self, name: str) -> tuple[int, ...]:
        try:
            return self.shapes[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a parameter of model {self.cfg.name!r}") from None

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """param[start:stop] (for a 1-D parameter: its elements start:stop), fp32, contiguous."""
        raise NotImplementedError

    def full(self, name: str) -> torch.Tensor:
        return self.rows(name, 0, self.shape(name)[0])

    def flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements start:stop of the flattened (row-major) parameter, 1-D."""
        shape = self.shape(name)
        if len(shape) == 1 or stop <= start:
            return self.rows(name, start, stop) if len(shape) == 1 else torch.empty(0)
        n_cols = shape[1]
        r0, r1 = start // n_cols, -(-stop // n_cols)
        return self.rows(name, r0, r1).reshape(-1)[start - r0 * n_cols:stop - r0 * n_cols].clone()

    def window(self, name: str, rows: slice, cols: slice) -> torch.Tensor:
        """param[rows, cols] of a 2-D parameter (unit steps), read a block of rows at a time."""
        n_rows, n_cols = self.shape(name)
        r0, r1, _ = rows.indices(n_rows)
        c0, c1, _ = cols.indices(n_cols)
        out = torch.empty(max(r1 - r0, 0), max(c1 - c0, 0))
        step = max(1, _BLOCK_ELEMS // n_cols)
        for a in range(r0, r1, step):
            b = min(a + step, r1)
            out[a - r0:b - r0] = self.rows(name, a, b)[:, c0:c1]
        return out


def chunk_seed(seed: int, name: str, chunk: int) -> int:
    """A 63-bit generator seed for one chunk of one parameter (stable across processes, unlike ``hash``)."""
    digest = hashlib.blake2b(f"{seed}/{name}/{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class TorchInit(WeightSource):
    """``--init torch``: the JAX recipe's stds, each parameter drawn chunk by chunk from (seed, name, chunk) streams."""

    def __init__(self, cfg: ModelConfig, seed: int):
        super().__init__(cfg)
        self.seed = seed

    def std(self, name: str) -> float | None:
        """The normal's std for NAME; None for the norm weights (ones)."""
        leaf = leaf_key(name)
        if leaf.endswith("norm"):
            return None
        return {"embed": self.cfg.embed_init_std, "wo": self.cfg.out_std, "w_down": self.cfg.out_std}.get(
            leaf, self.cfg.std)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        shape = self.shape(name)
        n_cols = math.prod(shape[1:])
        stop = max(stop, start)
        std = self.std(name)
        if std is None:
            return torch.ones((stop - start, *shape[1:]))
        return self._normal(name, math.prod(shape), start * n_cols, stop * n_cols, std).view(stop - start, *shape[1:])

    def _normal(self, name: str, numel: int, start: int, stop: int, std: float) -> torch.Tensor:
        out = torch.empty(stop - start)
        for k in range(start // CHUNK, -(-stop // CHUNK)):
            lo, hi = k * CHUNK, min((k + 1) * CHUNK, numel)
            vals = torch.randn(hi - lo, generator=torch.Generator().manual_seed(chunk_seed(self.seed, name, k)))
            a, b = max(lo, start), min(hi, stop)
            out[a - start:b - start] = vals[a - lo:b - lo]
        return out.mul_(std)


class NpzInit(WeightSource):
    """``--init jax``: slices of the JAX initial weights in an ``init_params.npz``, read in place."""

    def __init__(self, cfg: ModelConfig, path: str | Path):
        from weightmap.jaxtorch import TRANSPOSED
        from weightmap.npz import npz_members

        super().__init__(cfg)
        self.path = Path(path)
        self.members = npz_members(self.path)
        self._transposed = TRANSPOSED
        for name, shape in self.shapes.items():  # fail at once, naming the array, not mid-way through a build
            key, idx = self._member(name)
            got = self.members[key].shape if key in self.members else None
            want = self._jax_shape(name, shape)
            if got is None or got[len(idx):] != want or (idx and got[0] <= idx[0]):
                raise ValueError(f"{self.path}: array {key!r} has shape {got}, which does not hold {name} {shape} of "
                                 f"model {cfg.name!r}; write the file for this model (weightmap.npz.save_npz)")

    def _member(self, name: str) -> tuple[str, tuple[int, ...]]:
        if name.startswith("layers."):
            _, i, key, _ = name.split(".")
            return f"layers.{key}", (int(i),)
        return leaf_key(name), ()

    def _jax_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape[::-1] if leaf_key(name) in self._transposed else shape

    def _read(self, name: str, rows: slice, cols: slice) -> torch.Tensor:
        key, idx = self._member(name)
        arr = self.members[key].array()[idx]
        if leaf_key(name) in self._transposed:  # torch's rows are JAX's columns
            block = np.ascontiguousarray(arr[cols, rows].T, dtype=np.float32)
        elif arr.ndim == 1:
            block = np.array(arr[rows], dtype=np.float32)
        else:
            block = np.array(arr[rows, cols], dtype=np.float32)
        del arr
        return torch.from_numpy(block)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._read(name, slice(start, max(start, stop)), slice(None))

    def window(self, name: str, rows: slice, cols: slice) -> torch.Tensor:
        return self._read(name, rows, cols)


def weight_source(cfg: ModelConfig, init: str, seed: int, run_dir: str | Path | None = None) -> WeightSource:
    """The initial weights of ``--init torch`` (from the seed) or ``--init jax`` (the run directory's .npz)."""
    if init == "torch":
        return TorchInit(cfg, seed)
    if init in ("jax", "file"):  # file: --init-from's weights, written there by the launcher
        if run_dir is None:
            raise ValueError(f"--init {init} reads init_params.npz from the run directory; none was given")
        return NpzInit(cfg, Path(run_dir) / "init_params.npz")
    raise ValueError(f"--init {init!r}: expected 'torch', 'jax' or 'file'")
