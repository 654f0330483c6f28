"""Exact JAX <-> torch parameter names (a bitwise round trip: only transposes and stacking), numpy only.

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

Both trainers' packages use it (``jax_impl.checkpoint``'s export/import, ``torch_ref.convert``) without
importing each other: arrays in, arrays out. Wrapping them as torch tensors is ``torch_ref.convert``'s job.
The "flat JAX names" (``embed``, ``layers.wq``, ...) are the keys of the ``.npz`` files both sides exchange
(``weightmap.npz``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")
TOP_KEYS = ("embed", "head", "final_norm")
TRANSPOSED = frozenset({"head", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"})


def _t(a: np.ndarray, name: str) -> np.ndarray:
    # always a fresh, writable, C-ordered copy: torch.from_numpy must not alias JAX's read-only buffers
    return np.array(a.T if name in TRANSPOSED else a, order="C", copy=True)


def to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """JAX params (nested dict of arrays, ``init_params`` layout) -> the torch ``state_dict`` names, as numpy."""
    out: dict[str, np.ndarray] = {}
    for name in TOP_KEYS:
        out[f"{name}.weight"] = _t(np.asarray(params[name]), name)
    layers = params["layers"]
    n_layers = np.asarray(layers["wq"]).shape[0]
    for key in LAYER_KEYS:
        stacked = np.asarray(layers[key])
        for i in range(n_layers):
            out[f"layers.{i}.{key}.weight"] = _t(stacked[i], key)
    return out


def to_jax(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """torch ``state_dict`` names -> JAX params (nested dict of numpy arrays)."""
    out: dict[str, Any] = {name: _t(np.asarray(state[f"{name}.weight"]), name) for name in TOP_KEYS}
    n_layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    out["layers"] = {key: np.stack([_t(np.asarray(state[f"layers.{i}.{key}.weight"]), key) for i in range(n_layers)])
                     for key in LAYER_KEYS}
    return out


def torch_shapes(shapes: Mapping[str, Any]) -> dict[str, list[int]]:
    """The torch ``state_dict`` shapes of JAX params given as shapes (nested like ``init_params``: anything with a
    ``.shape``, or a shape tuple)."""
    def shape(x: Any) -> tuple[int, ...]:
        return tuple(getattr(x, "shape", x))

    def t(name: str, s: tuple[int, ...]) -> list[int]:
        return list(s[::-1] if name in TRANSPOSED else s)

    out = {f"{k}.weight": t(k, shape(shapes[k])) for k in TOP_KEYS}
    for k in LAYER_KEYS:
        s = shape(shapes["layers"][k])
        out.update({f"layers.{i}.{k}.weight": t(k, s[1:]) for i in range(s[0])})
    return out


def flatten(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Nested JAX params -> {"embed": ..., "layers.wq": ...} (the .npz keys)."""
    flat = {k: np.asarray(v) for k, v in params.items() if k != "layers"}
    flat.update({f"layers.{k}": np.asarray(v) for k, v in params["layers"].items()})
    return flat


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """{"embed": ..., "layers.wq": ...} -> nested JAX params (the arrays themselves, not copies)."""
    out: dict[str, Any] = {"layers": {}}
    for k, v in flat.items():
        if k.startswith("layers."):
            out["layers"][k.split(".", 1)[1]] = v
        else:
            out[k] = v
    return out
