"""``python -m jax_impl.init_weights CONFIG_JSON OUT.npz``: a run's JAX initial weights as a flat-name ``.npz``.

``jax_impl.model.init_params(model, seed)`` for the model section and ``train.seed`` of a run directory's
``config.json`` (or a bare ``Config.to_dict()``), computed on the CPU (the same weights on any device count),
written uncompressed (``weightmap.npz.save_npz``) so readers can map each member in place.
``torch_ref.train --init jax`` runs this in a subprocess to start from the JAX run's exact weights without
importing JAX; ``--seed`` overrides the config's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np


class InitWeightsError(ValueError):
    """A config file this command cannot read; the message says which and why."""


def read_model(path: Path) -> tuple[dict[str, Any], int]:
    """(model section, train.seed) of a run directory's config.json or a ``Config.to_dict()`` JSON."""
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise InitWeightsError(f"{path}: cannot read it ({e.strerror}); give a run directory's config.json") from None
    except json.JSONDecodeError as e:
        raise InitWeightsError(f"{path}: not JSON ({e}); give a run directory's config.json") from None
    cfg = doc.get("config", doc) if isinstance(doc, dict) else None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict) or "seed" not in cfg.get("train", {}):
        raise InitWeightsError(f"{path}: no model section and train.seed; give a run directory's config.json")
    return cfg["model"], int(cfg["train"]["seed"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jax_impl.init_weights", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", type=Path, help="a run directory's config.json")
    ap.add_argument("out", type=Path, help="the .npz to write (flat JAX names: embed, layers.wq, ...)")
    ap.add_argument("--seed", type=int, help="the init seed (default: the config's train.seed)")
    args = ap.parse_args(argv)
    # the CPU, before JAX starts: the weights must not depend on which accelerator this machine has
    os.environ["JAX_PLATFORMS"] = "cpu"
    from configs.schema import ModelConfig

    try:
        model, seed = read_model(args.config)
        model_cfg = ModelConfig(**model)
    except (InitWeightsError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax

    from jax_impl.model import init_params
    from weightmap.npz import save_npz

    save_npz(args.out, jax.tree.map(np.asarray, init_params(model_cfg, seed if args.seed is None else args.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
