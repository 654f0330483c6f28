"""Sharded, asynchronous, atomic training checkpoints (orbax), resumable onto another mesh.

Layout of a checkpoint directory (one orbax ``CheckpointManager``; ``<step>/`` per save):

    <ckpt_dir>/<step>/params/     params, as the run stores them (ZeRO-sharded, maybe padded)
    <ckpt_dir>/<step>/opt_state/  optax state (AdamW moments + the schedule's ``count``)
    <ckpt_dir>/<step>/meta/       JSON: step, consumed samples, logical shapes, model/optim/data config,
                                  seeds, the mesh it was saved from (see ``checkpoint_meta``)

Every process writes its own shards; saves run in a background thread after a device->host copy,
so the train step continues. Atomicity is orbax's: a save goes to ``<step>.orbax-checkpoint-tmp-*``
and is renamed to ``<step>`` only when every item of every process is written (finalisation), so a
crash mid-save leaves the last finished step untouched, and a half-written step is never listed.

Padding: over an indivisible mesh the ZeRO dimensions are stored padded with zeros (see
``jax_impl.sharding``), and the padding differs between meshes. Arrays are saved as stored; a restore
asks orbax for the *new* storage shape with ``strict=False``, which truncates or zero-pads at the end
-- exact, since padding is zero in params and in both Adam moments. Before that, the logical shapes
in ``meta`` are compared to the model's, so a wrong model is refused by name instead of being padded.

    python -m jax_impl.checkpoint info   runs/r1/checkpoints
    python -m jax_impl.checkpoint export --to torch runs/r1/checkpoints model.pt    # torch_ref state_dict
    python -m jax_impl.checkpoint import --from torch model.pt out_ckpt --preset tiny  # params-only ckpt
    python -m jax_impl.checkpoint import --from hf Llama-2-70b-hf out_ckpt --preset llama2-70b
    python -m jax_impl.checkpoint export --to hf --dtype bfloat16 runs/r1/checkpoints hf_out

The JAX <-> torch parameter mapping is the table in ``weightmap/jaxtorch.py`` (transposes and layer
stacking only, so both directions are exact in fp32); the Hugging Face Llama names are in
``weightmap/hf.py`` (config.json + safetensors, sharded or not; no transformers needed at run time).
This module imports neither torch nor torch_ref: ``--to torch`` / ``--from torch`` map the names here and
leave torch's file format to ``python -m torch_ref.convert``, run as a subprocess (an environment without
torch gets a message naming ``--to npz`` / ``--to hf``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from weightmap import hf
from weightmap.jaxtorch import flatten, to_jax, to_torch, torch_shapes, unflatten
from weightmap.npz import save_npz

FORMAT = 1
ITEMS = ("params", "opt_state", "meta")
# config sections whose change makes a resume a different run (mesh/batch/steps may change)
MUST_MATCH = ("model",)
SHOULD_MATCH = ("optim", "data")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used here; the message says which and why."""


def _why(e: BaseException) -> str:
    """An exception as one short line (orbax/tensorstore messages run to many lines of C++ status)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


class UnreadableCheckpoint(CheckpointError):
    """A finished checkpoint step whose files cannot be read (truncated, corrupt): an older one may be good."""


def _ocp():
    import orbax.checkpoint as ocp

    # orbax logs every save/restore at INFO through absl; keep the trainer's output readable
    logging.getLogger("absl").setLevel(logging.WARNING)
    return ocp


def path_name(path: tuple) -> str:
    """``('layers', 'wq')`` key path -> ``layers.wq`` (the flat names of ``weightmap.jaxtorch``)."""
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return ".".join(parts)


def flat_shapes(tree: Any) -> dict[str, list[int]]:
    return {path_name(p): list(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def checkpoint_meta(cfg, trainer, step: int, consumed_samples: int, params_only: bool = False) -> dict[str, Any]:
    """What a resume must know besides the arrays: position, shapes, the config that made them."""
    c = cfg.to_dict()
    return {
        "format": FORMAT, "framework": "jax", "step": int(step), "consumed_samples": int(consumed_samples),
        "params_only": params_only,
        "logical_shapes": {k: list(v) for k, v in _flat(trainer.shapes).items()},
        "storage_shapes": flat_shapes(trainer.storage),
        "mesh": {k: int(v) for k, v in trainer.mesh.shape.items()}, "zero": cfg.parallel.zero,
        # no stochastic op runs in a step (dropout 0): the random state is the init seed and the data
        # order, which is (data.seed, consumed_samples); both are here and checked on resume
        "rng": {"init_seed": cfg.train.seed, "data_seed": cfg.data.seed},
        "config": {s: c[s] for s in ("model", "optim", "data", "parallel", "train")},
        "jax": jax.__version__, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _flat(shapes: dict) -> dict[str, tuple[int, ...]]:
    out = {}
    for k, v in shapes.items():
        if isinstance(v, dict):
            out.update({f"{k}.{n}": tuple(s) for n, s in v.items()})
        else:
            out[k] = tuple(v)
    return out


def resolve_dir(path: str | Path) -> tuple[Path, int | None]:
    """A run directory, a checkpoints directory or one ``<step>`` directory -> (checkpoints dir, step|None)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no checkpoint at {p}: the path does not exist")
    if (p / "checkpoints").is_dir():
        return p / "checkpoints", None
    if p.name.isdigit() and (p / "meta").exists():
        return p.parent, int(p.name)
    return p, None


@dataclass
class Restored:
    params: Any
    opt_state: Any | None
    meta: dict[str, Any]
    step: int
    seconds: float


class Checkpointer:
    """Periodic async saves of (params, opt_state, meta); every process of a multi-process run calls it."""

    def __init__(self, directory: str | Path, every: int = 0, keep: int = 2, use_async: bool = True):
        self.directory = Path(directory).absolute()
        self.every = every
        self.keep, self.use_async = keep, use_async
        self._manager: Any = None
        self.save_s: list[float] = []  # time the train loop was blocked per save

    @property
    def manager(self) -> Any:
        """The orbax ``CheckpointManager``, made at the first save: a run that never saves neither imports
        orbax and tensorstore (~24 MiB of every process's host memory) nor creates the directory."""
        if self._manager is None:
            ocp = _ocp()
            opts = ocp.CheckpointManagerOptions(max_to_keep=self.keep or None, create=True,
                                                enable_async_checkpointing=self.use_async)
            self._manager = ocp.CheckpointManager(self.directory, options=opts, item_names=ITEMS)
        return self._manager

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, params: Any, opt_state: Any | None, meta: dict[str, Any]) -> float:
        """Start saving step ``step``; returns the seconds the caller was blocked (device->host copy)."""
        ocp = _ocp()
        t = time.perf_counter()
        items = {"params": ocp.args.PyTreeSave(params), "meta": ocp.args.JsonSave(meta)}
        if opt_state is not None:
            items["opt_state"] = ocp.args.PyTreeSave(opt_state)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        dt = time.perf_counter() - t
        self.save_s.append(dt)
        return dt

    def wait(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()


def _manager(directory: Path):
    ocp = _ocp()
    # orbax wants an absolute path (a relative --resume failed with "Checkpoint path should be absolute")
    return ocp.CheckpointManager(Path(directory).absolute(),
                                 options=ocp.CheckpointManagerOptions(create=False, read_only=True),
                                 item_names=ITEMS)


def steps_in(directory: str | Path) -> list[int]:
    """Finished (finalised) checkpoint steps; half-written ``*.orbax-checkpoint-tmp-*`` dirs are not listed."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def read_meta(directory: str | Path, step: int) -> dict[str, Any]:
    f = Path(directory) / str(step) / "meta" / "metadata"
    try:
        meta = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UnreadableCheckpoint(f"checkpoint step {step} in {directory} has no readable meta ({f}: {e}); "
                              f"it is corrupt or was not written by jax_impl.checkpoint") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint step {step} in {directory} has format {meta.get('format')!r}; "
                              f"this code reads format {FORMAT}")
    return meta


def check_compatible(meta: dict[str, Any], cfg, trainer, where: str) -> list[str]:
    """Raise on a model that does not fit the checkpoint; return warnings for other config changes."""
    want = {k: list(v) for k, v in _flat(trainer.shapes).items()}
    have = meta["logical_shapes"]
    diffs = [f"{k}: checkpoint {have[k]} vs model {want[k]}" for k in want if k in have and have[k] != want[k]]
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if diffs or missing or extra:
        lines = diffs[:8] + ([f"missing in checkpoint: {missing}"] if missing else []) + (
            [f"not in this model: {extra}"] if extra else [])
        changed = {k: (meta["config"]["model"].get(k), v) for k, v in cfg.to_dict()["model"].items()
                   if meta["config"]["model"].get(k) != v}
        raise CheckpointError(f"{where} does not fit this model (parameter shapes differ):\n  " + "\n  ".join(lines)
                              + (f"\nmodel config differences (checkpoint, now): {changed}" if changed else ""))
    warnings = []
    now = cfg.to_dict()
    for s in SHOULD_MATCH:
        d = {k: (meta["config"][s].get(k), v) for k, v in now[s].items() if meta["config"][s].get(k) != v}
        if d:
            warnings.append(f"{s} config differs from the checkpoint's (checkpoint, now): {d}")
    return warnings


def restore(directory: str | Path, trainer, step: int | None = None) -> Restored:
    """Restore (params, opt_state, meta) into ``trainer``'s shardings and storage shapes (any mesh)."""
    ocp = _ocp()
    directory, step_from_path = resolve_dir(directory)
    step = step if step is not None else step_from_path
    steps = steps_in(directory)
    if not steps:
        raise CheckpointError(f"no finished checkpoint in {directory}")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise CheckpointError(f"checkpoint step {step} is not in {directory} (finished steps: {steps})")
    where = f"checkpoint step {step} in {directory}"
    meta = read_meta(directory, step)
    for w in check_compatible(meta, trainer.cfg, trainer, where):
        print(f"warning: {w}", file=sys.stderr)

    def args_for(abstract: Any) -> Any:
        # strict=False: pad/truncate the ZeRO dims to this mesh's storage padding (checked above)
        shardings = jax.tree.map(lambda a: a.sharding, abstract)
        return ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(
            abstract, shardings, strict=False))

    items = {"params": args_for(trainer.storage)}
    if not meta["params_only"]:
        items["opt_state"] = args_for(trainer.opt_abstract)
    t = time.perf_counter()
    mngr = _manager(directory)
    try:
        out = mngr.restore(step, args=ocp.args.Composite(**items))
        params = out["params"]
        opt_state = out["opt_state"] if not meta["params_only"] else None
        jax.block_until_ready((params, opt_state))
    except Exception as e:  # orbax/tensorstore errors are long; keep the cause, name the step and the way out
        older = [s for s in steps if s < step]
        hint = (f"; the previous checkpoint, step {older[-1]}, may still be good: --resume {directory / str(older[-1])}"
                if older else "")
        raise UnreadableCheckpoint(f"{where} is unreadable (truncated or corrupt?): {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:400] if str(e) else ''}{hint}") from e
    finally:
        mngr.close()
    return Restored(params, opt_state, meta, step, time.perf_counter() - t)


def load_init(path: str | Path, trainer) -> tuple[Any, str]:
    """``--init-from``: (params in ``trainer``'s shardings, a description) from a JAX checkpoint (its params
    only, whatever optimizer state it holds) or a Hugging Face Llama directory (config.json checked against
    the run's model config)."""
    path = Path(path)
    if (path / hf.CONFIG).is_file():
        where = str(path / hf.CONFIG)
        hf.check_against(hf.model_fields(json.loads((path / hf.CONFIG).read_text()), where), trainer.cfg.model,
                         where)
        _, tensors = hf.read(path)
        params = unflatten(hf.to_flat(tensors, trainer.cfg.model, np.float32, where=str(path)))

        def put(a: np.ndarray, s: jax.ShapeDtypeStruct) -> jax.Array:
            a = np.pad(a, [(0, t - n) for n, t in zip(a.shape, s.shape, strict=True)])  # ZeRO storage padding
            return jax.device_put(a.astype(s.dtype), s.sharding)

        return jax.tree.map(put, params, trainer.storage), f"Hugging Face checkpoint {path}"
    r = restore(path, trainer)
    return r.params, f"checkpoint step {r.step} in {path} (its params)"


def restore_newest_readable(directory: str | Path, trainer) -> Restored:
    """``--resume auto``: the newest finished step that restores, saying which newer ones were unreadable.

    Only unreadable steps are skipped; a checkpoint that does not fit the model is refused as by ``restore``.
    """
    directory, _ = resolve_dir(directory)
    steps = steps_in(directory)
    if not steps:
        raise CheckpointError(f"no finished checkpoint in {directory}")
    bad = []
    for step in reversed(steps):
        try:
            r = restore(directory, trainer, step)
        except UnreadableCheckpoint as e:
            bad.append(step)
            print(f"warning: --resume auto: {e}", file=sys.stderr, flush=True)
            continue
        if bad:
            print(f"warning: --resume auto: newer checkpoint step(s) {bad} unreadable; resumed from step {step}, "
                  "the newest readable one", file=sys.stderr, flush=True)
        return r
    raise CheckpointError(f"--resume auto: none of the checkpoints {steps} in {directory} is readable; start a new "
                          "run with another --name, or repair or remove them")


def set_aside_after(directory: str | Path, step: int) -> Path | None:
    """Resuming from ``step`` starts a new branch: the old branch's finished steps after it are moved (renames,
    nothing deleted) into ``<directory>/abandoned-<time>/``, so the new branch can save those step numbers."""
    from runtime.rundir import set_aside

    return set_aside(Path(directory), [str(s) for s in steps_in(directory) if s > step])


def restore_numpy(directory: str | Path, step: int | None = None) -> tuple[dict, dict[str, Any]]:
    """Params only, as host numpy arrays in their *logical* shapes (no mesh needed): for export."""
    ocp = _ocp()
    directory, step_from_path = resolve_dir(directory)
    steps = steps_in(directory)
    step = step if step is not None else (step_from_path if step_from_path is not None else
                                          (steps[-1] if steps else None))
    if step is None or step not in steps:
        raise CheckpointError(f"no finished checkpoint{'' if step is None else f' step {step}'} in {directory}")
    meta = read_meta(directory, step)
    ckptr = ocp.PyTreeCheckpointer()
    path = (directory / str(step) / "params").absolute()
    try:
        meta_tree = ckptr.metadata(path)
    except Exception as e:
        ckptr.close()
        raise CheckpointError(f"checkpoint step {step} in {directory}: its params metadata cannot be read "
                              f"({_why(e)}); it is "
                              "truncated or corrupt: use another step (--step)") from None
    tree = getattr(meta_tree, "item_metadata", meta_tree)
    tree = getattr(tree, "tree", tree)
    # one local device, whatever mesh/process count wrote it (export runs on one host, usually CPU)
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=one), tree)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target, jax.tree.map(lambda _: one, target))
    try:
        params = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
    except Exception as e:  # tensorstore/orbax on missing or cut array files: name the step, not a C++ status
        raise CheckpointError(f"checkpoint step {step} in {directory}: its params cannot be read "
                              f"({_why(e)}); it is "
                              "truncated or corrupt: use another step (--step)") from None
    finally:
        ckptr.close()
    shapes = meta["logical_shapes"]

    def logical(path, a):
        s = shapes[path_name(path)]
        return np.asarray(a)[tuple(slice(0, n) for n in s)]

    return jax.tree_util.tree_map_with_path(logical, params), meta


def save_params_only(directory: str | Path, params: dict, cfg, step: int = 0) -> Path:
    """A params-only checkpoint (e.g. imported from torch); ``--resume`` starts fresh optimizer state from it."""
    meta = {
        "format": FORMAT, "framework": "jax", "step": int(step), "consumed_samples": 0, "params_only": True,
        "logical_shapes": flat_shapes(params), "storage_shapes": flat_shapes(params), "mesh": {}, "zero": None,
        "rng": {"init_seed": cfg.train.seed, "data_seed": cfg.data.seed},
        "config": {s: v for s, v in cfg.to_dict().items() if s in ("model", "optim", "data", "parallel", "train")},
        "jax": jax.__version__, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    ck = Checkpointer(directory, use_async=False)
    ck.save(step, jax.tree.map(np.asarray, params), None, meta)
    ck.close()
    return Path(directory)


def model_torch_shapes(model_cfg) -> dict[str, list[int]]:
    """torch_ref ``Llama`` state_dict shapes of a model config (the mapping of ``weightmap/jaxtorch.py``)."""
    from jax_impl.model import init_params

    return torch_shapes(jax.eval_shape(lambda: init_params(model_cfg, 0)))


def _torch_file(cmd: str, src: Path, out: Path) -> None:
    """``python -m torch_ref.convert CMD SRC OUT`` (torch's file format, names unchanged), or a CheckpointError
    with its message; this package never imports torch."""
    root = str(Path(__file__).resolve().parents[1])  # torch_ref from this source tree, whatever the cwd
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-m", "torch_ref.convert", cmd, str(src), str(out)], capture_output=True,
                       text=True, env=env)
    if r.returncode == 0:
        return
    if "No module named 'torch'" in r.stderr:
        alt = "--to npz or --to hf" if cmd == "to-pt" else "--from hf"
        raise CheckpointError(f"a torch state_dict file needs PyTorch, which this environment lacks; use {alt}, "
                              "or run this where torch is installed")
    lines = r.stderr.strip().splitlines() or ["(no output)"]
    raise CheckpointError(lines[-1].removeprefix("error: "))


def _load_state_dict(path: str, scratch: Path) -> dict[str, np.ndarray]:
    """A torch state_dict file's arrays by name (read by ``torch_ref.convert`` in a subprocess, through a
    temporary .npz in ``scratch``), or a CheckpointError saying what is wrong with it."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such file (a torch_ref state_dict .pt)")
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".state-") as tmp:
        npz = Path(tmp) / "state.npz"
        _torch_file("from-pt", Path(path), npz)
        with np.load(npz) as f:
            return {k: f[k] for k in f.files}


# ----------------------------------------------------------------------------- CLI
def _cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jax_impl.checkpoint", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    info = sub.add_parser("info", help="list the finished steps and the latest one's metadata")
    info.add_argument("ckpt")
    ex = sub.add_parser("export", help="a checkpoint's params -> torch_ref state_dict (.pt) or flat .npz")
    ex.add_argument("--to", choices=("torch", "npz", "hf"), default="torch",
                    help="hf: a Hugging Face Llama directory (config.json + *.safetensors); OUT must not exist")
    ex.add_argument("--dtype", choices=tuple(hf.DTYPES), default="float32", help="--to hf: the stored dtype")
    ex.add_argument("--step", type=int)
    ex.add_argument("ckpt")
    ex.add_argument("out")
    im = sub.add_parser("import", help="torch_ref state_dict (.pt) or Hugging Face Llama dir -> params-only checkpoint")
    im.add_argument("--from", dest="src", choices=("torch", "hf"), default="torch")
    im.add_argument("--preset", help="the model config the weights belong to (checked); default: tiny for "
                    "--from torch, the checkpoint's config.json for --from hf")
    im.add_argument("--step", type=int, default=0)
    im.add_argument("state")
    im.add_argument("out")
    args, rest = ap.parse_known_args(argv)
    try:
        if args.cmd in ("export", "import"):
            out = Path(args.out)
            if out.exists() and (not out.is_dir() or any(out.iterdir())):  # never overwrite weights silently
                raise CheckpointError(f"output {out} already exists; remove it or give another path")
            if not out.parent.is_dir():
                raise CheckpointError(f"output {out}: directory {out.parent} does not exist")
        if args.cmd == "info":
            d, _ = resolve_dir(args.ckpt)
            steps = steps_in(d)
            print(f"{d}: finished steps {steps}")
            if steps:
                m = read_meta(d, steps[-1])
                print(json.dumps({k: m[k] for k in ("step", "consumed_samples", "mesh", "zero", "params_only")}))
        elif args.cmd == "export":
            params, meta = restore_numpy(args.ckpt, args.step)
            if args.to == "hf":
                from configs.schema import ModelConfig

                model_cfg = ModelConfig(**meta["config"]["model"])
                hf.write(args.out, hf.from_flat(flatten(params), model_cfg, hf.DTYPES[args.dtype]), model_cfg,
                         args.dtype)
            elif args.to == "npz":
                save_npz(args.out, params)
            else:
                out = Path(args.out)
                with tempfile.TemporaryDirectory(dir=out.resolve().parent, prefix=".export-") as tmp:
                    npz = Path(tmp) / "state.npz"
                    np.savez(npz, **to_torch(params))
                    _torch_file("to-pt", npz, out)
            print(f"exported step {meta['step']} ({sum(a.size for a in jax.tree.leaves(params)):,} parameters) "
                  f"to {args.out}")
        elif args.src == "hf":
            _import_hf(args.state, args.out, args.preset, rest, args.step)
        else:
            from configs import load_config
            from configs.schema import parse_overrides

            args.preset = args.preset or "tiny"
            cfg = load_config(args.preset, parse_overrides(rest))
            state = _load_state_dict(args.state, out.resolve().parent)
            want = model_torch_shapes(cfg.model)
            bad = [f"{k}: state_dict {list(state[k].shape) if k in state else 'missing'} vs {args.preset} {v}"
                   for k, v in want.items() if k not in state or list(state[k].shape) != v]
            bad += [f"{k}: not a parameter of {args.preset}" for k in state if k not in want]
            if bad:
                raise CheckpointError(f"{args.state} does not fit preset {args.preset}:\n  " + "\n  ".join(bad[:10]))
            params = to_jax(state)
            save_params_only(args.out, params, cfg, args.step)
            print(f"wrote params-only checkpoint step {args.step} to {args.out}")
    except (CheckpointError, hf.HFError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def hf_model_config(directory: str | Path, preset: str | None, overrides: list[str]):
    """The Config to import an HF checkpoint with: the preset's (checked against config.json) or, without a
    preset, ``tiny``'s train/optim/data sections around the model config.json describes."""
    from configs import load_config
    from configs.schema import parse_overrides

    where = str(Path(directory) / hf.CONFIG)
    try:
        raw = json.loads(Path(where).read_text())
    except FileNotFoundError as e:
        raise hf.HFError(f"{directory}: no {hf.CONFIG} (a Hugging Face model directory has config.json + "
                         "*.safetensors)") from e
    except json.JSONDecodeError as e:
        raise hf.HFError(f"{where}: not JSON ({e})") from e
    fields = hf.model_fields(raw, where)
    if preset:
        cfg = load_config(preset, parse_overrides(overrides))
        hf.check_against(fields, cfg.model, where)
        return cfg
    model = {"name": Path(directory).resolve().name, **fields}
    return load_config("tiny", {**{f"model.{k}": v for k, v in model.items()}, **parse_overrides(overrides)})


def _import_hf(src: str, out: str, preset: str | None, overrides: list[str], step: int) -> None:
    cfg = hf_model_config(src, preset, overrides)
    _, tensors = hf.read(src)
    flat = hf.to_flat(tensors, cfg.model, np.float32, where=src)
    params = unflatten(flat)
    save_params_only(out, params, cfg, step)
    n = sum(a.size for a in tensors.values())
    print(f"imported {len(tensors)} tensors ({n:,} parameters) from {src} as model '{cfg.model.name}' "
          f"(vocab padded {cfg.model.vocab_size} -> {cfg.model.padded_vocab}); wrote params-only checkpoint "
          f"step {step} to {out}")


if __name__ == "__main__":
    raise SystemExit(_cli())
