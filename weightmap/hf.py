"""Hugging Face Llama checkpoints (``config.json`` + ``*.safetensors``) <-> the project's flat weight names.

Numpy only (``safetensors`` reads bf16 through ml_dtypes), so JAX's checkpoint CLI and torch_ref share it.

    HF (LlamaForCausalLM)                              flat name (jax_impl.model)   op
    model.embed_tokens.weight        (V, h)            embed        (Vp, h)         copy, rows padded to Vp
    lm_head.weight                   (V, h)            head         (h, Vp)         transpose, columns padded
    model.norm.weight                (h,)              final_norm   (h,)            copy
    model.layers.{i}.input_layernorm.weight            layers.attn_norm[i]          copy
    model.layers.{i}.post_attention_layernorm.weight   layers.mlp_norm[i]           copy
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight   layers.w{q,k,v,o}[i]         transpose
    model.layers.{i}.mlp.{gate,up,down}_proj.weight    layers.w_{gate,up,down}[i]   transpose

Both models rotate q/k by halves ("rotate_half": pairs (j, j + D/2) of each head), the layout HF's
Llama conversion writes, so q_proj/k_proj rows need no permutation. Meta's original ``consolidated.*.pth``
files rotate interleaved pairs; they are not read here (convert them with transformers' script first).

Vp is the preset's padded vocabulary (``model.vocab_pad_to``): imported padding rows/columns are zero,
and export drops them. Zero head columns give logit 0, so a padded model's loss counts those entries in
its softmax (as Megatron's padded vocabulary does); the logits of real tokens are HF's exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
TOP = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "head": "lm_head.weight"}
LAYER = {
    "attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
    "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight",
}
TRANSPOSED = frozenset({"head", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"})
# computed buffers some older exports carry; they hold no learned weight
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# config.json key -> ModelConfig field: the fields that decide the weights' shapes and the forward pass
FIELDS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden", "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads", "intermediate_size": "ffn_hidden",
    "rope_theta": "rope_theta", "rms_norm_eps": "norm_eps", "head_dim": "head_dim",
}
DTYPES = {"float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16}


class HFError(ValueError):
    """A Hugging Face checkpoint this model cannot represent, or an unreadable one; the message says why."""


def _rope(cfg: Mapping[str, Any]) -> tuple[float, str]:
    """(theta, rope type) from either the ``rope_parameters`` dict (transformers >= 5) or the older keys."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), str(kind)


def model_fields(cfg: Mapping[str, Any], where: str = CONFIG) -> dict[str, Any]:
    """``config.json`` of a ``LlamaForCausalLM`` -> ModelConfig fields; refuses what the model lacks."""
    problems = []
    if cfg.get("model_type", "llama") != "llama":
        problems.append(f"model_type is {cfg.get('model_type')!r}, not 'llama'")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        problems.append("attention_bias/mlp_bias is true: this model's projections have no biases")
    if cfg.get("tie_word_embeddings"):
        problems.append("tie_word_embeddings is true: this model keeps a separate output head")
    theta, kind = _rope(cfg)
    if kind != "default":
        problems.append(f"rope scaling {kind!r}: this model has plain RoPE only")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {cfg.get('hidden_act')!r}: this model's MLP is SwiGLU (silu)")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size") if k not in cfg]
    if missing:
        problems.append(f"missing keys {missing}")
    if problems:
        raise HFError(f"{where}: cannot be represented by this Llama model:\n  " + "\n  ".join(problems))
    out = {f: cfg[k] for k, f in FIELDS.items() if k in cfg and k != "rope_theta"}
    out["rope_theta"] = theta
    out.setdefault("n_kv_heads", cfg["num_attention_heads"])
    out.setdefault("norm_eps", 1e-6)  # LlamaConfig's default when the key is absent
    if out.get("head_dim") in (None, cfg["hidden_size"] // cfg["num_attention_heads"]):
        out["head_dim"] = 0  # ModelConfig's "hidden // n_heads"
    return out


def config_json(model_cfg, dtype: str = "float32") -> dict[str, Any]:
    """A ``LlamaForCausalLM`` config.json for a ModelConfig (readable by transformers 4.x and 5.x)."""
    m = model_cfg
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": m.vocab_size, "hidden_size": m.hidden, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads, "head_dim": m.dim_head,
        "intermediate_size": m.ffn_hidden, "hidden_act": "silu", "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "max_position_embeddings": 4096, "torch_dtype": dtype, "dtype": dtype,
    }


def check_against(fields: Mapping[str, Any], model_cfg, where: str) -> None:
    """Refuse an HF config whose shape-deciding fields differ from ``model_cfg`` (name each, and the fix)."""
    diffs = []
    for f, v in fields.items():
        mine = getattr(model_cfg, f)
        same = math.isclose(float(v), float(mine), rel_tol=1e-9) if isinstance(mine, float) else v == mine
        if not same:
            diffs.append(f"{f}: {where} has {v!r}, the preset {mine!r} (--model.{f}={v})")
    if diffs:
        raise HFError(f"{where} does not match the model config '{model_cfg.name}':\n  " + "\n  ".join(diffs)
                      + "\npick the preset of these weights, or override the fields above")


def _files(directory: Path) -> list[Path]:
    index = directory / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise HFError(f"{index}: not a safetensors index ({e})") from e
        files = [directory / n for n in names]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise HFError(f"{index} names shards that are missing: {absent}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise HFError(f"{directory}: no *.safetensors (and no {INDEX}); .bin (pickle) checkpoints are not read")
    return files


def read(directory: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json as a dict, {HF name: array}) of a Llama checkpoint directory, sharded or not."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    if not (directory / CONFIG).is_file():
        raise HFError(f"{directory}: no {CONFIG} (a Hugging Face model directory has config.json + *.safetensors)")
    try:
        cfg = json.loads((directory / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise HFError(f"{directory / CONFIG}: not JSON ({e})") from e
    tensors: dict[str, np.ndarray] = {}
    for f in _files(directory):
        try:
            with safe_open(str(f), framework="numpy") as st:
                for k in st.keys():
                    tensors[k] = st.get_tensor(k)
        except (SafetensorError, OSError, ValueError) as e:
            raise HFError(f"{f}: unreadable safetensors file (truncated or corrupt?): {e}") from e
    return cfg, tensors


def shapes(model_cfg) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of a ModelConfig and its shape (unpadded vocabulary)."""
    m = model_cfg
    V, h, F, q, kv = m.vocab_size, m.hidden, m.ffn_hidden, m.n_heads * m.dim_head, m.n_kv_heads * m.dim_head
    layer = {"attn_norm": (h,), "mlp_norm": (h,), "wq": (q, h), "wk": (kv, h), "wv": (kv, h), "wo": (h, q),
             "w_gate": (F, h), "w_up": (F, h), "w_down": (h, F)}
    out = {TOP["embed"]: (V, h), TOP["final_norm"]: (h,), TOP["head"]: (V, h)}
    for i in range(m.n_layers):
        out.update({f"model.layers.{i}.{LAYER[k]}": s for k, s in layer.items()})
    return out


def _pad(a: np.ndarray, rows: int, axis: int) -> np.ndarray:
    extra = rows - a.shape[axis]
    if extra <= 0:
        return a
    width = [(0, 0)] * a.ndim
    width[axis] = (0, extra)
    return np.pad(a, width)


def to_flat(tensors: Mapping[str, np.ndarray], model_cfg, dtype=np.float32, where: str = "checkpoint"
            ) -> dict[str, np.ndarray]:
    """{HF name: array} -> the flat names of ``jax_impl.model`` (``embed``, ``layers.wq`` stacked, ...)."""
    L = model_cfg.n_layers
    expect = shapes(model_cfg)
    want = set(expect)
    names = {k for k in tensors if not k.endswith(IGNORED_SUFFIXES)}
    biases = sorted(k for k in names if k.endswith(".bias"))
    if biases:
        raise HFError(f"{where}: holds biases this model lacks: {biases[:4]}{' ...' if len(biases) > 4 else ''}")
    missing, extra = sorted(want - names), sorted(names - want)
    if "lm_head.weight" in missing:
        raise HFError(f"{where}: no lm_head.weight (tied embeddings?); this model keeps a separate output head")
    if missing or extra:
        raise HFError(f"{where}: tensor names do not match a {L}-layer Llama: missing {missing[:6]}, "
                      f"unexpected {extra[:6]}")
    wrong = [f"{k}: {tuple(tensors[k].shape)} vs {v}" for k, v in expect.items() if tuple(tensors[k].shape) != v]
    if wrong:
        raise HFError(f"{where}: tensor shapes do not match the model config:\n  " + "\n  ".join(wrong[:8]))

    def get(name: str, key: str) -> np.ndarray:
        a = np.asarray(tensors[name]).astype(dtype)
        return a.T if key in TRANSPOSED else a

    vp = model_cfg.padded_vocab
    flat = {"embed": _pad(get(TOP["embed"], "embed"), vp, 0), "head": _pad(get(TOP["head"], "head"), vp, 1),
            "final_norm": get(TOP["final_norm"], "final_norm")}
    for key, suffix in LAYER.items():
        flat[f"layers.{key}"] = np.stack([get(f"model.layers.{i}.{suffix}", key) for i in range(L)])
    return flat


def from_flat(flat: Mapping[str, np.ndarray], model_cfg, dtype=np.float32) -> dict[str, np.ndarray]:
    """Flat names -> {HF name: array} (padding rows dropped), contiguous and ready for safetensors."""
    def put(a: np.ndarray, key: str) -> np.ndarray:
        a = np.asarray(a)
        return np.ascontiguousarray((a.T if key in TRANSPOSED else a).astype(dtype))

    V = model_cfg.vocab_size
    out = {TOP["embed"]: put(flat["embed"][:V], "embed"), TOP["head"]: put(flat["head"][:, :V], "head"),
           TOP["final_norm"]: put(flat["final_norm"], "final_norm")}
    for key, suffix in LAYER.items():
        stacked = flat[f"layers.{key}"]
        for i in range(model_cfg.n_layers):
            out[f"model.layers.{i}.{suffix}"] = put(stacked[i], key)
    return out


def write(directory: str | Path, tensors: Mapping[str, np.ndarray], model_cfg, dtype: str = "float32",
          max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """Write config.json + ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` + index when larger
    than ``max_shard_bytes``, as transformers' ``save_pretrained`` names them). The directory must not exist."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    if directory.exists():
        raise HFError(f"{directory} already exists; choose a new output directory (nothing is overwritten)")
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for k, a in tensors.items():
        if shards[-1] and size + a.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = a
        size += a.nbytes
    tmp = directory.with_name(directory.name + ".tmp-export")
    tmp.mkdir(parents=True)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for name, shard in zip(names, shards, strict=True):
        save_file(dict(shard), str(tmp / name), metadata={"format": "pt"})
    if n > 1:
        weight_map = {k: name for name, shard in zip(names, shards, strict=True) for k in shard}
        total = sum(a.nbytes for a in tensors.values())
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / CONFIG).write_text(json.dumps(config_json(model_cfg, dtype), indent=2) + "\n")
    tmp.rename(directory)  # the directory appears whole or not at all
    return [directory / nm for nm in names]
