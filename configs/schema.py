"""One typed config schema that both trainers load, plus the model's arithmetic.

Resolution order: dataclass defaults <- TOML preset <- dotted CLI overrides
(``--model.n_layers=4``). Every error names the offending value and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import sys
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from configs.layout import Layout

PRESET_DIR = Path(__file__).parent / "presets"
MESH_AXES = ("pipeline", "data", "fsdp", "tensor")
# train.platform: xpu = Intel GPUs (JAX's oneapi backend, DeepSpeed's xpu accelerator); "sycl" is accepted as xpu
PLATFORMS = ("auto", "cpu", "gpu", "xpu")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the value and the fix."""


@dataclass
class ModelConfig:
    name: str = "tiny"
    vocab_size: int = 256
    # Embedding/head rows are padded to a multiple of this (Megatron's
    # make-vocab-size-divisible-by x TP; 768 = 128*6 for the TP=6 42B model).
    vocab_pad_to: int = 1
    hidden: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 0  # 0 -> hidden // n_heads
    ffn_hidden: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.0  # 0 -> sqrt(2 / (5 h)), the "small init" the ALCF runs use
    embed_init_std: float = 0.632455532
    scaled_out_init: bool = True  # Megatron: o/down projections use std / sqrt(2 L)

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden // self.n_heads

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab_size // self.vocab_pad_to) * self.vocab_pad_to

    @property
    def std(self) -> float:
        return self.init_std or math.sqrt(2.0 / (5.0 * self.hidden))

    @property
    def out_std(self) -> float:
        return self.std / math.sqrt(2.0 * self.n_layers) if self.scaled_out_init else self.std

    # ---- arithmetic: written once, used by both trainers, the report and the planner ----
    def n_params(self) -> int:
        """Exact parameter count (padded vocab, untied embedding and head, no biases)."""
        h = self.hidden
        return 2 * self.padded_vocab * h + self.layer_matrix_params() + self.n_layers * 2 * h + h

    def layer_matrix_params(self) -> int:
        """Parameters of the layers' projection matrices (q, k, v, o, gate, up, down), all layers."""
        h, hd = self.hidden, self.dim_head
        attn = 2 * h * self.n_heads * hd + 2 * h * self.n_kv_heads * hd
        return self.n_layers * (attn + 3 * h * self.ffn_hidden)

    def flops_per_sample(self, seq: int) -> float:
        """Megatron-LM ``num_floating_point_operations`` per sample (fwd+bwd, no recompute).

        F = 12 s L h^2 ((1 + n_kv/n_h + s/h) + 1.5 FFN/h + V/(2 L h)); GQA- and SwiGLU-aware.
        """
        h, L = self.hidden, self.n_layers
        return (
            12.0 * seq * L * h * h
            * ((1 + self.n_kv_heads / self.n_heads + seq / h)
               + 1.5 * self.ffn_hidden / h
               + self.padded_vocab / (2.0 * L * h))
        )

    def flops_per_sample_legacy(self, seq: int, activation_checkpointing: bool) -> float:
        """Older Megatron-DeepSpeed formula 24 c s L h^2 (1 + s/(6h) + V/(16 L h)).

        c = 4 with activation checkpointing (counts the recompute), else 3. It ignores GQA
        and the SwiGLU width: never put its figures in the same column as the one above.
        """
        h, L, c = self.hidden, self.n_layers, 4 if activation_checkpointing else 3
        return 24.0 * c * seq * L * h * h * (1 + seq / (6.0 * h) + self.padded_vocab / (16.0 * L * h))

    def flops_per_token(self, seq: int) -> float:
        return self.flops_per_sample(seq) / seq


@dataclass
class ParallelConfig:
    # Mesh over the axes pipeline, data, fsdp, tensor: "fsdp=96", "data=8,fsdp=12".
    # One axis may be -1 (the rest of the devices); axes left out are 1.
    mesh: str = "data=1"
    # ZeRO stage: 0 nothing sharded; 1 optimizer state over the data-parallel axes
    # (data, fsdp); 2 + gradients; 3 + parameters.
    zero: int = 3
    hpz: bool = False  # ZeRO-3 + hpZ: params over `fsdp` (inside a node), states over data x fsdp
    mics: bool = False  # ZeRO-3 MiCS: all model states over `fsdp` only, replicated across `data`
    mbs: int = 1  # micro batch (samples) per data-parallel rank
    gas: int = 1  # gradient accumulation steps (microbatches per step)
    gbs: int = 0  # 0 -> mbs * gas * dp; otherwise must equal it
    remat: bool = False  # activation checkpointing per layer
    remat_policy: str = "full"  # full | save_dots | save_attn_out | save_matmuls (no matmul recomputed) | save_mlp
    pipeline_schedule: str = "gpipe"  # gpipe | 1f1b (pipeline axis > 1)


@dataclass
class JaxConfig:
    """jax_impl's performance knobs: they change how a step is computed, never its arithmetic, so torch_ref does
    not read this section (a preset that tunes them still runs there). Old spellings ``parallel.<key>`` are
    aliases (KEY_ALIASES)."""

    # tensor > 1: activations between blocks split over `tensor` along the sequence (Megatron-style)
    sequence_parallel: bool = False
    # GPipe: final norm + head + loss of the microbatch leaving the last stage computed by every stage on
    # its 1/p of the vocabulary (split) or by the last stage alone (last); 1F1B always uses the last stage
    pipeline_head: str = "split"
    # GPipe: chunks of layers per stage visited in turn (circular / interleaved schedule): stage s runs the
    # logical stages s, s+p, ... of L/(p*repeats) layers each, so a microbatch goes round the stages `repeats`
    # times and the bubble shrinks from (p-1)/(m+p-1) to (p-1)/(m*repeats+p-1) of the work (needs gas >= pipeline)
    pipeline_repeats: int = 1
    attn_chunk: int = 1024  # queries per attention block when seq > this (0 = never chunk)
    attn_impl: str = "xla"  # attention: xla (any device) | cudnn (fused flash attention, NVIDIA GPU, bf16)
    # the layer projections' output dtype. fp32 (bf16-in/fp32-out dots: fast on XLA:CPU) | compute
    # (the compute dtype, fp32-accumulated: half the activation bytes; for GPUs). Same numbers in fp32.
    matmul_out: str = "fp32"
    scan_unroll: int = 0  # layers per iteration of the layer scan; 0 = auto (see layer_unroll)

    def layer_unroll(self, n_layers: int) -> int:
        """Layers per scan iteration. Auto unrolls models of <= 8 layers fully: XLA:CPU then needs no
        loop-carried stacks (zero-filled, updated slice by slice) -- -21 % step time on the bench
        preset -- while a 70B's 80 layers stay one compiled layer. On a GPU full unrolling paid more
        (gpu-1b, 18 layers, H200: -20 % step time, half the memory), so that preset sets it."""
        if self.scan_unroll:
            return min(self.scan_unroll, n_layers)
        return n_layers if n_layers <= 8 else 1


@dataclass
class OptimConfig:
    lr: float = 2e-4
    min_lr: float = 0.0
    schedule: str = "cosine"  # cosine | constant
    warmup_frac: float = 0.05
    decay_steps: int = 0  # 0 -> train.steps
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.1
    clip: float = 1.0


@dataclass
class DataConfig:
    seq_len: int = 32
    source: str = "indexed"  # indexed (Megatron .bin/.idx) | synthetic
    file_list: str = ""  # Megatron data-file-list (weight prefix corpus); "" -> embedded stdlib corpus
    split: str = "990,10,0"  # Megatron train/valid/test split weights (ALCF's); training reads the first
    seed: int = 1234
    # Files of one corpus (the list's third column): concatenated (false, ALCF's current launch scripts) or
    # blended sample by sample (true: Megatron-DeepSpeed's --blend-sample-in-corpus, ALCF late 2024 - late 2025)
    blend_sample_in_corpus: bool = False
    shuffle_sample_in_corpus: bool = True  # permute each corpus' samples (--shuffle-sample-in-corpus)


@dataclass
class TrainConfig:
    steps: int = 10
    seed: int = 0
    dtype: str = "fp32"  # fp32 | bf16 (bf16 compute, fp32 params/grads/optimizer)
    name: str = ""  # run name; "" -> <preset>-<mesh>-<timestamp>
    out_dir: str = "runs"
    log_every: int = 1
    wandb: str = "offline"  # online | offline | disabled
    platform: str = "auto"  # auto | cpu | gpu | xpu (Intel GPUs; "sycl" is an old spelling of xpu)
    # validation loss on the valid split of data.split, as Megatron's --eval-interval / --eval-iters:
    # every eval_interval steps, eval_iters global batches (0: no evaluation)
    eval_interval: int = 0
    eval_iters: int = 10


# ---- run options: how a run is kept alive and saved, never what it computes. A resume may change them, and
# they are left out of the config hash and of every "same run" comparison (RUN_OPTION_SECTIONS).
@dataclass
class CheckpointConfig:
    every: int = 0  # save every N steps and at the last step (0: only on SIGTERM/SIGINT and with every_s)
    every_s: float = 0.0  # also save when this many seconds passed since the last save, and at the last step
    keep: int = 2  # finished checkpoints kept
    dir: str = ""  # "" -> <run dir>/checkpoints; must be shared by all processes


@dataclass
class NonfiniteConfig:
    action: str = "stop"  # a non-finite loss or gradient norm: stop (exit 3) | skip (the step's update)
    max_skips: int = 10  # with skip: stop after this many in a row


@dataclass
class WatchdogConfig:
    factor: float = 10.0  # a step longer than this x the median step ends the run (exit 75) with all stacks
    min_s: float = 120.0  # never fire before this many seconds
    first_s: float = 3600.0  # limit for the first steps (compilation, first collectives); 0 disables the watchdog


RUN_OPTION_SECTIONS = ("checkpoint", "nonfinite", "watchdog")

# Old spellings of moved keys, the one place they are mapped: TOML presets, --section.key overrides and the
# config.json of run directories written before the move all pass through apply_overrides.
KEY_ALIASES = {
    **{f"parallel.{k}": f"jax.{k}" for k in ("sequence_parallel", "pipeline_head", "pipeline_repeats",
                                             "attn_chunk", "attn_impl", "matmul_out", "scan_unroll")},
    "train.ckpt_every": "checkpoint.every", "train.ckpt_every_s": "checkpoint.every_s",
    "train.ckpt_keep": "checkpoint.keep", "train.ckpt_dir": "checkpoint.dir", "ckpt.every": "checkpoint.every",
}


@dataclass
class Config:
    preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    jax: JaxConfig = field(default_factory=JaxConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    nonfinite: NonfiniteConfig = field(default_factory=NonfiniteConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self, sections: tuple[str, ...] | None = None) -> str:
        """Stable short hash of the resolved config (or of some sections of it); the run options
        (RUN_OPTION_SECTIONS) are not part of the whole-config hash."""
        d = self.to_dict()
        sections = sections or tuple(k for k in d if k not in RUN_OPTION_SECTIONS)
        d = {k: d[k] for k in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def mesh_shape(self, n_devices: int | None = None) -> dict[str, int]:
        return parse_mesh(self.parallel.mesh, n_devices)

    def layout(self, n_devices: int | None = None) -> Layout:
        """The parallel layout (mesh sizes, ZeRO, hpZ/MiCS, label); a ``-1`` axis takes the rest of ``n_devices``."""
        from configs.layout import Layout  # configs.layout imports this module

        return Layout.from_config(self, n_devices)

    def dp_size(self, n_devices: int | None = None) -> int:
        return self.layout(n_devices).dp

    def global_batch(self, n_devices: int | None = None) -> int:
        return self.parallel.mbs * self.parallel.gas * self.dp_size(n_devices)


def lr_at(cfg: Config, step: Any, xp: Any = None) -> Any:
    """Learning rate of optimizer step ``step`` (0-based), as Megatron's OptimizerParamScheduler.

    Step-index convention (Megatron's): optimizer step k (1-based) runs at ``lr_at(k - 1)``, so the first step
    runs at lr 0 when there is warmup; warmup is linear over ``warmup_frac * decay_steps`` steps (a float, as
    Megatron), the step with index ``warmup`` (when whole) runs at the full lr, and cosine decay reaches
    ``min_lr`` at index ``decay_steps`` and stays there (``decay_steps`` 0: train.steps). ``schedule="constant"``:
    the full lr after the warmup. Megatron counts samples instead of steps; with a fixed global batch the
    ratios are the same (tests/test_lr_schedule.py checks both against a restatement of its scheduler).

    The one formula for every caller: ``xp=None`` takes a Python number and returns a float (torch_ref, the
    metrics); ``xp=jax.numpy`` takes a traced array (the JAX trainer's optax schedule, ``trainer.lr_schedule``).
    """
    o = cfg.optim
    decay = o.decay_steps or cfg.train.steps
    warmup = o.warmup_frac * decay
    if xp is None:
        cos, where = math.cos, lambda c, a, b: a if c else b
        clip = lambda x, lo, hi: min(max(x, lo), hi)  # noqa: E731
    else:
        cos, where, clip = xp.cos, xp.where, xp.clip
    if o.schedule == "constant":
        lr = o.lr
    else:
        ratio = clip((step - warmup) / max(decay - warmup, 1e-9), 0.0, 1.0)
        lr = o.min_lr + (o.lr - o.min_lr) * 0.5 * (cos(math.pi * ratio) + 1.0)
    if warmup > 0:
        lr = where(step <= warmup, o.lr * step / warmup, lr)
    return lr


def eval_due(cfg: Config, step: int) -> bool:
    """Whether the validation loss is computed after optimizer step ``step`` (1-based), as Megatron."""
    n = cfg.train.eval_interval
    return n > 0 and step % n == 0


def valid_samples(cfg: Config, gbs: int) -> int:
    """Samples of the valid split a run reads: Megatron's ``eval_iters * gbs * (train_iters // eval_interval + 1)``."""
    t = cfg.train
    return t.eval_iters * gbs * (t.steps // t.eval_interval + 1) if t.eval_interval > 0 else 0


def valid_offset(cfg: Config, step: int, gbs: int) -> int:
    """First valid-split sample of the evaluation after step ``step``: Megatron's ``consumed_valid_samples``
    (each evaluation reads the next ``eval_iters`` batches; a resumed run finds the same ones)."""
    return (step // cfg.train.eval_interval - 1) * cfg.train.eval_iters * gbs


# ----------------------------------------------------------------------------- mesh strings
def parse_mesh(spec: str, n_devices: int | None = None) -> dict[str, int]:
    """``"data=2,fsdp=-1"`` -> ``{"pipeline": 1, "data": 2, "fsdp": n/2, "tensor": 1}``.

    ``-1`` takes the rest of ``n_devices``; without ``n_devices`` a ``-1`` is an error.
    """
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen: set[str] = set()
    wild = None
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"([a-z_]+)\s*=\s*(-?\d+)", part)
        if not m:
            raise ConfigError(f"mesh entry {part!r} in {spec!r} is not AXIS=SIZE; write e.g. 'data=2,fsdp=4'")
        axis, size = m.group(1), int(m.group(2))
        if axis not in MESH_AXES:
            hint = difflib.get_close_matches(axis, MESH_AXES, n=1)
            raise ConfigError(
                f"unknown mesh axis {axis!r} in {spec!r}; axes are {', '.join(MESH_AXES)}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )
        if axis in seen:
            raise ConfigError(f"mesh axis {axis!r} given twice in {spec!r}")
        seen.add(axis)
        if size == -1:
            if wild:
                raise ConfigError(f"only one mesh axis may be -1 in {spec!r} (got {wild!r} and {axis!r})")
            wild = axis
        elif size < 1:
            raise ConfigError(f"mesh axis {axis}={size} in {spec!r} must be >= 1 or -1 (the rest of the devices)")
        sizes[axis] = size
    if wild:
        if n_devices is None:
            raise ConfigError(f"mesh {spec!r} has {wild}=-1 but the device count is unknown; give every size")
        rest = math.prod(v for k, v in sizes.items() if k != wild)
        if n_devices % rest:
            raise ConfigError(
                f"mesh {spec!r}: {n_devices} devices do not divide by the fixed axes' product {rest}; "
                f"change the fixed sizes so they divide {n_devices}"
            )
        sizes[wild] = n_devices // rest
    return sizes


def mesh_devices(spec: str) -> int | None:
    """Devices a mesh string asks for, or None when it has a -1 axis."""
    sizes = parse_mesh(spec.replace("-1", "1"))
    return None if "-1" in spec else math.prod(sizes.values())


# ----------------------------------------------------------------------------- loading
def coerce_value(value: Any, typ: Any, key: str) -> Any:
    """``value`` as ``typ`` (bool/int/float/str), or a ConfigError naming ``key`` and the value."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}={value!r} is not a boolean; use true or false")
    try:
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a valid {typ.__name__}") from None
    return value


def _section_types(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def apply_overrides(cfg: Config, overrides: dict[str, Any], source: str = "override") -> Config:
    """Set dotted keys (``model.n_layers``; an old spelling in KEY_ALIASES sets its new key) on ``cfg`` in place,
    with type checks."""
    for key, value in overrides.items():
        key = KEY_ALIASES.get(key, key)
        parts = key.split(".")
        target: Any = cfg
        for i, part in enumerate(parts):
            hints = _section_types(target)
            if part not in hints:
                prefix = ".".join(parts[:i])
                choices = [f"{prefix}.{k}" if prefix else k for k in hints]
                hint = difflib.get_close_matches(key, choices, n=1)
                raise ConfigError(
                    f"unknown config key {key!r} (from {source})"
                    + (f"; did you mean {hint[0]!r}?" if hint else f"; valid keys here: {', '.join(choices)}")
                )
            if i == len(parts) - 1:
                if dataclasses.is_dataclass(hints[part]):
                    raise ConfigError(f"{key!r} is a section; set one of its keys, e.g. {key}.<name>=...")
                setattr(target, part, coerce_value(value, hints[part], key))
            else:
                target = getattr(target, part)
                if not dataclasses.is_dataclass(target):
                    raise ConfigError(f"{'.'.join(parts[: i + 1])!r} is a value, not a section (in {key!r})")
    return cfg


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_preset(name: str) -> Config:
    path = Path(name) if name.endswith(".toml") else PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        hint = difflib.get_close_matches(name, list_presets(), n=1)
        raise ConfigError(
            f"unknown preset {name!r}; presets are {', '.join(list_presets())}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + ", or give a path to a .toml file"
        )
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"preset file {path} is not valid TOML ({e}); fix that line or pick another preset") from None
    except OSError as e:
        raise ConfigError(f"preset file {path} cannot be read ({e.strerror or e})") from None
    cfg = Config(preset=path.stem)
    return apply_overrides(cfg, _flatten(data), source=str(path))


def load_config(preset: str = "tiny", overrides: dict[str, Any] | None = None, validate: bool = True) -> Config:
    cfg = load_preset(preset)
    apply_overrides(cfg, overrides or {}, source="command line")
    if cfg.train.platform == "sycl":  # the name under the archived intel-extension-for-openxla plugin
        print("note: --platform sycl is an old spelling of --platform xpu (Intel GPUs); using xpu", file=sys.stderr)
        cfg.train.platform = "xpu"
    if validate:
        validate_config(cfg)
    return cfg


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict()`` output (e.g. a run directory's config.json)."""
    d = dict(d)
    cfg = apply_overrides(Config(preset=d.pop("preset", "tiny")), _flatten(d), source="config dict")
    if cfg.train.platform == "sycl":  # written by older versions
        cfg.train.platform = "xpu"
    return cfg


# ----------------------------------------------------------------------------- validation
def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")


def validate_config(cfg: Config, n_devices: int | None = None) -> None:
    """Check a config before anything is allocated or compiled: every section's checks (SECTION_CHECKS).

    A mesh with a -1 axis and no ``n_devices`` cannot be sized yet: the checks that need the axis sizes
    (parallel, jax) are then left to ``check_layout(cfg, n_devices)`` once the device count is known."""
    mesh = None if n_devices is None and "-1" in cfg.parallel.mesh else parse_mesh(cfg.parallel.mesh, n_devices)
    if mesh is None:
        parse_mesh(cfg.parallel.mesh.replace("-1", "1"))  # the string's own errors now
    for section, check in SECTION_CHECKS.items():
        if mesh is not None or section not in LAYOUT_SECTIONS:
            check(cfg, mesh)


def check_layout(cfg: Config, n_devices: int | None) -> None:
    """The checks of the sections that need the mesh's sizes (parallel, jax)."""
    mesh = parse_mesh(cfg.parallel.mesh, n_devices)
    for section in LAYOUT_SECTIONS:
        SECTION_CHECKS[section](cfg, mesh)


def check_model(cfg: Config, mesh: dict[str, int] | None = None) -> None:
    m = cfg.model
    for key in ("vocab_size", "hidden", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_pad_to"):
        if getattr(m, key) < 1:
            raise ConfigError(f"model.{key}={getattr(m, key)} must be >= 1")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(
            f"model.n_heads={m.n_heads} is not a multiple of model.n_kv_heads={m.n_kv_heads}; "
            "each KV head must serve a whole group of query heads"
        )
    if not m.head_dim and m.hidden % m.n_heads:
        raise ConfigError(
            f"model.hidden={m.hidden} does not divide by model.n_heads={m.n_heads}; "
            "set model.head_dim explicitly or change the head count"
        )
    if m.dim_head % 2:
        raise ConfigError(f"head dim {m.dim_head} must be even for rotary embeddings")


def check_parallel(cfg: Config, mesh: dict[str, int]) -> None:
    """The layout against the model: tensor divisibility, ZeRO options, pipeline stages, batch sizes."""
    m, p = cfg.model, cfg.parallel
    tp = mesh["tensor"]
    for key, val in (("n_heads", m.n_heads), ("n_kv_heads", m.n_kv_heads), ("ffn_hidden", m.ffn_hidden)):
        if val % tp:
            raise ConfigError(
                f"model.{key}={val} is not divisible by the tensor axis ({tp}); "
                f"pick tensor from the divisors of {val} or change the model"
            )
    if m.padded_vocab % tp:
        raise ConfigError(
            f"padded vocab {m.padded_vocab} is not divisible by the tensor axis ({tp}); "
            f"set model.vocab_pad_to to a multiple of {128 * tp} (Megatron pads to 128 x TP)"
        )
    if p.zero not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero={p.zero} must be 0, 1, 2 or 3")
    if p.hpz and p.mics:
        raise ConfigError("parallel.hpz and parallel.mics are exclusive; pick one")
    if (p.hpz or p.mics) and p.zero != 3:
        raise ConfigError(f"parallel.{'hpz' if p.hpz else 'mics'} needs ZeRO-3; set --zero 3")
    if (p.hpz or p.mics) and mesh["fsdp"] < 2:
        raise ConfigError(
            f"parallel.{'hpz' if p.hpz else 'mics'} shards inside the `fsdp` axis, which is {mesh['fsdp']}; "
            "use a mesh like data=8,fsdp=12 (fsdp = tiles per node)"
        )
    if mesh["pipeline"] > 1:
        check_pipeline(cfg, mesh)
    _choice("parallel.remat_policy", p.remat_policy, ("full", "save_dots", "save_attn_out", "save_matmuls", "save_mlp"))
    _choice("parallel.pipeline_schedule", p.pipeline_schedule, ("gpipe", "1f1b"))
    for key in ("mbs", "gas"):
        if getattr(p, key) < 1:
            raise ConfigError(f"parallel.{key}={getattr(p, key)} must be >= 1")
    if p.gbs:
        from configs.layout import Layout  # configs.layout imports this module

        dp = Layout.from_shape(mesh).dp
        if p.gbs != p.mbs * p.gas * dp:
            raise ConfigError(
                f"parallel.gbs={p.gbs} != mbs*gas*dp = {p.mbs}*{p.gas}*{dp} = {p.mbs * p.gas * dp}; "
                "set gbs=0 to derive it, or change mbs/gas/the data-parallel axes"
            )


def check_pipeline(cfg: Config, mesh: dict[str, int]) -> None:
    """A pipeline axis > 1: equal stages, ZeRO 0/1, the schedule's needs (jax_impl's pipeline also calls this)."""
    m, p, j = cfg.model, cfg.parallel, cfg.jax
    if m.n_layers % mesh["pipeline"]:
        divisors = [d for d in range(1, m.n_layers + 1) if m.n_layers % d == 0]
        raise ConfigError(
            f"model.n_layers={m.n_layers} does not split into pipeline={mesh['pipeline']} equal stages; "
            f"pick pipeline from {divisors}"
        )
    if p.zero > 1:
        raise ConfigError(
            f"pipeline parallelism runs with ZeRO 0 or 1 (as DeepSpeed's PipelineModule); got --zero {p.zero}: "
            "use --zero 1"
        )
    pr = j.pipeline_repeats
    if pr < 1:
        raise ConfigError(f"jax.pipeline_repeats={pr} must be >= 1 (1 = plain GPipe)")
    if pr > 1:
        if p.pipeline_schedule != "gpipe":
            raise ConfigError(f"jax.pipeline_repeats={pr} runs with parallel.pipeline_schedule=gpipe only; "
                              "set jax.pipeline_repeats=1 for 1f1b")
        if m.n_layers % (mesh["pipeline"] * pr):
            ok = [r for r in range(1, m.n_layers // mesh["pipeline"] + 1)
                  if m.n_layers % (mesh["pipeline"] * r) == 0]
            raise ConfigError(
                f"jax.pipeline_repeats={pr}: model.n_layers={m.n_layers} does not split into "
                f"pipeline x repeats = {mesh['pipeline'] * pr} equal chunks; pick repeats from {ok}"
            )
        if p.gas < mesh["pipeline"]:
            raise ConfigError(
                f"jax.pipeline_repeats={pr} sends each microbatch round the stages again, which needs "
                f"gas >= pipeline: gas={p.gas} < pipeline={mesh['pipeline']}; set --gas {mesh['pipeline']} "
                "or more, or jax.pipeline_repeats=1"
            )
    split = mesh["pipeline"] * mesh["tensor"]
    if p.pipeline_schedule == "gpipe" and j.pipeline_head == "split" and m.padded_vocab % split:
        raise ConfigError(
            f"jax.pipeline_head='split' gives each of the {mesh['pipeline']} stages 1/{mesh['pipeline']} of "
            f"the vocabulary, but padded vocab {m.padded_vocab} is not divisible by pipeline x tensor = {split}; "
            "use jax.pipeline_head=last or pad the vocabulary (model.vocab_pad_to)"
        )
    if p.pipeline_schedule == "1f1b" and p.gas < mesh["pipeline"]:
        raise ConfigError(
            f"parallel.pipeline_schedule='1f1b' needs at least one microbatch per stage in flight: "
            f"gas={p.gas} < pipeline={mesh['pipeline']}; set --gas {mesh['pipeline']} or more "
            "(gas >= 2 x stages to beat GPipe's memory), or use parallel.pipeline_schedule=gpipe"
        )


def check_jax(cfg: Config, mesh: dict[str, int]) -> None:
    j = cfg.jax
    _choice("jax.pipeline_head", j.pipeline_head, ("split", "last"))
    _choice("jax.attn_impl", j.attn_impl, ("xla", "cudnn"))
    _choice("jax.matmul_out", j.matmul_out, ("fp32", "compute"))
    if j.attn_impl == "cudnn" and cfg.train.dtype != "bf16":
        raise ConfigError("jax.attn_impl=cudnn runs in bf16 only; add --dtype bf16 or use attn_impl=xla")
    if j.scan_unroll < 0:
        raise ConfigError(f"jax.scan_unroll={j.scan_unroll} must be >= 0 (0 = auto)")


def check_optim(cfg: Config, mesh: dict[str, int] | None = None) -> None:
    o = cfg.optim
    _choice("optim.schedule", o.schedule, ("cosine", "constant"))
    for f in dataclasses.fields(o):  # nan passes every comparison below; inf makes every update nan
        value = getattr(o, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"optim.{f.name}={value} must be a finite number")
    if not 0.0 <= o.warmup_frac < 1.0:
        raise ConfigError(f"optim.warmup_frac={o.warmup_frac} must be in [0, 1)")
    if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
        raise ConfigError(f"optim.lr={o.lr}, optim.min_lr={o.min_lr}: need 0 <= min_lr <= lr and lr > 0")


def check_data(cfg: Config, mesh: dict[str, int] | None = None) -> None:
    _choice("data.source", cfg.data.source, ("synthetic", "indexed"))
    if cfg.data.source == "synthetic" and cfg.data.file_list:
        # refused rather than switched to indexed: the preset chose synthetic data, and a run must not change
        # its data source behind the user's back (config hash, loss curve) without saying so
        raise ConfigError(
            f"data.file_list={cfg.data.file_list!r} is set but data.source='synthetic' (preset {cfg.preset!r}) "
            "reads no files; add --data.source=indexed to train on the list, or drop data.file_list")
    parts = cfg.data.split.split(",")
    try:
        weights = [float(x) for x in parts]
    except ValueError:
        weights = []
    if len(weights) != 3 or min(weights) < 0 or weights[0] <= 0:
        raise ConfigError(f"data.split={cfg.data.split!r} must be three weights 'train,valid,test' with train > 0, "
                          "e.g. '990,10,0'")
    if cfg.data.seq_len < 2:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} must be >= 2")


def check_train(cfg: Config, mesh: dict[str, int] | None = None) -> None:
    t = cfg.train
    if t.eval_interval < 0:
        raise ConfigError(f"train.eval_interval={t.eval_interval} must be >= 0 (0: no validation loss)")
    if t.eval_interval > 0 and t.eval_iters < 1:
        raise ConfigError(f"train.eval_iters={t.eval_iters} must be >= 1 when train.eval_interval > 0 "
                          "(batches per evaluation); or set train.eval_interval=0")
    _choice("train.dtype", t.dtype, ("fp32", "bf16"))
    _choice("train.wandb", t.wandb, ("online", "offline", "disabled"))
    _choice("train.platform", t.platform, PLATFORMS)
    if t.steps < 1:
        raise ConfigError(f"train.steps={t.steps} must be >= 1")


def check_run_options(cfg: Config, mesh: dict[str, int] | None = None) -> None:
    """checkpoint, nonfinite, watchdog: values that would silently mean something else. Each message names the
    command-line flag and the config key, since either may have set it."""
    c, n, w = cfg.checkpoint, cfg.nonfinite, cfg.watchdog
    if c.every < 0:
        raise ConfigError(f"--ckpt-every {c.every}: must be >= 0 (N: save every N steps; 0: only on SIGTERM/SIGINT "
                          "and with --ckpt-every-s; config key checkpoint.every)")
    if c.every_s < 0 or not math.isfinite(c.every_s):
        raise ConfigError(f"--ckpt-every-s {c.every_s}: must be a finite number >= 0 (0: off; config key "
                          "checkpoint.every_s)")
    if c.keep < 1:
        raise ConfigError(f"--ckpt-keep {c.keep}: must be >= 1 (how many finished checkpoints are kept; a large "
                          "number keeps them all; config key checkpoint.keep)")
    _choice("nonfinite.action", n.action, ("stop", "skip"))
    if n.max_skips < 0:
        raise ConfigError(f"--max-skips {n.max_skips}: must be >= 0 (steps skipped in a row before the run "
                          "stops; config key nonfinite.max_skips)")
    for key in ("factor", "min_s", "first_s"):
        flag = "--watchdog-" + key.replace("_", "-")
        value = getattr(w, key)
        if value < 0 or math.isnan(value):
            raise ConfigError(f"{flag} {value:g}: must be >= 0 (seconds or a factor; config key watchdog.{key})")


# every section's checks, in the order their errors are reported; those of LAYOUT_SECTIONS need the mesh's sizes
SECTION_CHECKS: dict[str, Any] = {
    "train": check_train, "model": check_model, "parallel": check_parallel, "jax": check_jax,
    "optim": check_optim, "data": check_data, "checkpoint": check_run_options}
LAYOUT_SECTIONS = ("parallel", "jax")


# ----------------------------------------------------------------------------- CLI helpers
def parse_overrides(args: list[str]) -> dict[str, str]:
    """``["--model.n_layers=4", "--optim.lr", "1e-3"]`` -> ``{"model.n_layers": "4", ...}``."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or "." not in a.split("=", 1)[0]:
            raise ConfigError(f"unrecognised argument {a!r}; overrides look like --section.key=value")
        if "=" in a:
            k, v = a[2:].split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {a!r} has no value; write {a}=VALUE")
            k, v = a[2:], args[i + 1]
            i += 1
        out[k] = v
        i += 1
    return out
