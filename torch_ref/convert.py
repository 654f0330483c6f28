"""Exact JAX <-> torch parameter conversion (a bitwise round trip: only transposes and stacking).

The one mapping table (L layers; i = 0..L-1; JAX matrices are (in, out), torch's (out, in)):

    JAX (jax_impl.model)        shape         torch (torch_ref.model)           shape        op
    embed                       (V, h)        embed.weight                      (V, h)       copy
    head                        (h, V)        head.weight                       (V, h)       transpose
    final_norm                  (h,)          final_norm.weight                 (h,)         copy
    layers.attn_norm[i]         (h,)          layers.{i}.attn_norm.weight       (h,)         copy
    layers.mlp_norm[i]          (h,)          layers.{i}.mlp_norm.weight        (h,)         copy
    layers.wq[i]                (h, H*D)      layers.{i}.wq.weight              (H*D, h)     transpose
    layers.wk[i], wv[i]         (h, K*D)      layers.{i}.wk/wv.weight           (K*D, h)     transpose
    layers.wo[i]                (H*D, h)      layers.{i}.wo.weight              (h, H*D)     transpose
    layers.w_gate[i], w_up[i]   (h, F)        layers.{i}.w_gate/w_up.weight     (F, h)       transpose
    layers.w_down[i]            (F, h)        layers.{i}.w_down.weight          (h, F)       transpose

``--init jax`` hands the JAX initial weights to the torch workers as an ``.npz`` of the flat
JAX names (``layers.wq`` etc.), written once by the launcher (``save_npz``, uncompressed). A worker
never loads it whole: ``npz_members`` maps each member in place, and ``torch_ref.weights.NpzInit``
reads one parameter's shard at a time from those maps. Only ``jax_init_params`` needs JAX, and
imports it when called (the Aurora torch environment has no JAX).
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")
TOP_KEYS = ("embed", "head", "final_norm")
TRANSPOSED = frozenset({"head", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"})


def _t(a: np.ndarray, name: str) -> np.ndarray:
    # always a fresh, writable, C-ordered copy: torch.from_numpy must not alias JAX's read-only buffers
    return np.array(a.T if name in TRANSPOSED else a, order="C", copy=True)


def jax_to_torch(params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """JAX params (nested dict of arrays, ``init_params`` layout) -> torch ``state_dict`` of ``Llama``."""
    out: dict[str, torch.Tensor] = {}
    for name in TOP_KEYS:
        out[f"{name}.weight"] = torch.from_numpy(_t(np.asarray(params[name]), name))
    layers = params["layers"]
    n_layers = np.asarray(layers["wq"]).shape[0]
    for key in LAYER_KEYS:
        stacked = np.asarray(layers[key])
        for i in range(n_layers):
            out[f"layers.{i}.{key}.weight"] = torch.from_numpy(_t(stacked[i], key))
    return out


def torch_to_jax(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """torch ``state_dict`` of ``Llama`` -> JAX params (nested dict of numpy arrays)."""
    def arr(k: str) -> np.ndarray:
        return state[k].detach().cpu().numpy()

    out: dict[str, Any] = {name: _t(arr(f"{name}.weight"), name) for name in TOP_KEYS}
    n_layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    out["layers"] = {key: np.stack([_t(arr(f"layers.{i}.{key}.weight"), key) for i in range(n_layers)])
                     for key in LAYER_KEYS}
    return out


def flatten(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Nested JAX params -> {"embed": ..., "layers.wq": ...} (the .npz keys)."""
    flat = {k: np.asarray(v) for k, v in params.items() if k != "layers"}
    flat.update({f"layers.{k}": np.asarray(v) for k, v in params["layers"].items()})
    return flat


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {"layers": {}}
    for k, v in flat.items():
        if k.startswith("layers."):
            out["layers"][k.split(".", 1)[1]] = v
        else:
            out[k] = v
    return out


def save_npz(path: str | Path, params: Mapping[str, Any]) -> Path:
    path = Path(path)
    np.savez(path, **flatten(params))
    return path


def load_npz(path: str | Path) -> dict[str, Any]:
    with np.load(path) as f:
        return unflatten({k: f[k] for k in f.files})


@dataclass(frozen=True)
class NpzMember:
    """Where one array of an uncompressed ``.npz`` lies in the file: ``array()`` maps it read-only, copying nothing."""

    path: Path
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool

    def array(self) -> np.ndarray:
        # a fresh map per call: the pages a reader touched leave the process when its array is dropped
        if 0 in self.shape:  # np.memmap cannot map zero bytes
            return np.zeros(self.shape, self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape or (1,),
                         order="F" if self.fortran_order else "C").reshape(self.shape)


def npz_members(path: str | Path) -> dict[str, NpzMember]:
    """The arrays of an ``np.savez`` file (stored, not deflated) by key, located without reading their data."""
    path = Path(path)
    out: dict[str, NpzMember] = {}
    with zipfile.ZipFile(path) as z, path.open("rb") as f:
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{path}: member {info.filename} is compressed; the shard-by-shard reader needs an "
                                 "uncompressed .npz (write it with torch_ref.convert.save_npz / np.savez)")
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                raise ValueError(f"{path}: no local file header for {info.filename} at byte {info.header_offset}")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            out[info.filename[:-4]] = NpzMember(path, f.tell(), tuple(shape), np.dtype(dtype), bool(fortran))
    return out


def jax_init_params(model_cfg, seed: int) -> dict[str, Any]:
    """``jax_impl.model.init_params`` as numpy (JAX on CPU; same weights on any device count)."""
    import os

    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # only matters if JAX has not started yet
    import jax

    from jax_impl.model import init_params

    return jax.tree.map(np.asarray, init_params(model_cfg, seed))
