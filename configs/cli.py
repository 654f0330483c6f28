"""The command-line surface both trainers share: the same flags, the same config resolution."""

from __future__ import annotations

import argparse
from typing import Any

from configs.schema import PLATFORMS, Config, ConfigError, load_config, parse_overrides

SHORTHANDS = {  # flag -> config key
    "mesh": "parallel.mesh", "zero": "parallel.zero", "mbs": "parallel.mbs", "gas": "parallel.gas",
    "steps": "train.steps", "dtype": "train.dtype", "platform": "train.platform", "wandb": "train.wandb",
    "name": "train.name", "out_dir": "train.out_dir", "seed": "train.seed",
    # run options (configs.schema.RUN_OPTION_SECTIONS); a trainer refuses the keys it does not honour
    "ckpt_every": "checkpoint.every", "ckpt_every_s": "checkpoint.every_s", "ckpt_keep": "checkpoint.keep",
    "ckpt_dir": "checkpoint.dir", "on_nonfinite": "nonfinite.action", "max_skips": "nonfinite.max_skips",
    "watchdog_factor": "watchdog.factor", "watchdog_min_s": "watchdog.min_s", "watchdog_first_s": "watchdog.first_s",
}


def trainer_parser(prog: str, doc: str | None, platform_help: str = "auto: an installed accelerator, else cpu"
                   ) -> argparse.ArgumentParser:
    """The flags of ``jax_impl.train`` and ``torch_ref.train``; anything else is a dotted override."""
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="configs/presets/<name>.toml or a path (default: small)")
    ap.add_argument("--mesh", help="e.g. fsdp=96, data=8,fsdp=12, data=2,fsdp=2,tensor=2 (axes left out are 1); auto: "
                    "the planner picks mesh, ZeRO, hpZ/MiCS, mbs/gas and pipeline schedule at parallel.gbs")
    ap.add_argument("--nodes", type=int, help="with --mesh auto: plan a job on N nodes of --cluster (default: the "
                    "devices this process sees)")
    ap.add_argument("--cluster", help="with --mesh auto: compare/clusters/<name>.toml or a path (default aurora)")
    ap.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage")
    ap.add_argument("--mbs", type=int, help="micro batch per data-parallel rank")
    ap.add_argument("--gas", type=int, help="gradient accumulation steps")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--dtype", choices=("fp32", "bf16"))
    ap.add_argument("--platform", choices=(*PLATFORMS, "sycl"), help=platform_help + " (sycl: old name of xpu)")
    ap.add_argument("--wandb", choices=("online", "offline", "disabled"))
    ap.add_argument("--name", help="run name (directory under --out-dir)")
    ap.add_argument("--out-dir", dest="out_dir")
    ap.add_argument("--seed", type=int)
    # shorthands of the run-option keys (--checkpoint.every=N etc. set the same keys); the old spellings
    # --ckpt.every and --train.ckpt_* are config-key aliases (configs.schema.KEY_ALIASES)
    ck = ap.add_argument_group("checkpoints: [checkpoint] every, every_s, keep, dir")
    ck.add_argument("--ckpt-every", dest="ckpt_every", type=int,
                    help="save every N steps and at the last step (default 0: only on SIGTERM/SIGINT)")
    ck.add_argument("--ckpt-every-s", dest="ckpt_every_s", type=float,
                    help="also save when this many seconds passed since the last save (decided by process 0, "
                         "agreed by all) and at the last step; default 0: off")
    ck.add_argument("--ckpt-keep", dest="ckpt_keep", type=int, help="finished checkpoints kept (default 2)")
    ck.add_argument("--ckpt-dir", dest="ckpt_dir",
                    help="default <run dir>/checkpoints; must be shared by all processes")
    rs = ap.add_argument_group("failure handling: [nonfinite] action, max_skips; [watchdog] factor, min_s, first_s")
    rs.add_argument("--on-nonfinite", choices=("stop", "skip"),
                    help="non-finite loss or gradient norm: stop (exit 3, default) or skip the step's update")
    rs.add_argument("--max-skips", type=int, help="with skip: stop after this many in a row (default 10)")
    rs.add_argument("--watchdog-factor", type=float,
                    help="a step longer than this x the median step ends the run (exit 75) with all stacks "
                         "(default 10)")
    rs.add_argument("--watchdog-min-s", type=float, help="never fire before this many seconds (default 120)")
    rs.add_argument("--watchdog-first-s", type=float,
                    help="limit for the first steps (compilation, first collectives; default 3600); 0 disables "
                         "the watchdog")
    return ap


def resolve_config(ap: argparse.ArgumentParser, argv: list[str] | None, validate: bool = True
                   ) -> tuple[Config, argparse.Namespace]:
    """Parse flags + ``--section.key=value`` overrides into a resolved Config."""
    args, rest = ap.parse_known_args(argv)
    overrides: dict[str, Any] = {key: getattr(args, flag) for flag, key in SHORTHANDS.items()
                                 if getattr(args, flag) is not None}
    overrides.update(parse_overrides(rest))
    auto = args.mesh == "auto"
    if auto:  # the planner sets these; a value given beside auto would be silently replaced
        given = [f"--{k.split('.')[1]}" for k in ("parallel.zero", "parallel.mbs", "parallel.gas") if k in overrides]
        if given:
            raise ConfigError(f"--mesh auto chooses the ZeRO stage, mbs and gas itself; drop {', '.join(given)} "
                              "(or give the layout with an explicit --mesh)")
        del overrides["parallel.mesh"]
    elif args.nodes is not None or args.cluster is not None:
        raise ConfigError("--nodes/--cluster size a --mesh auto job; add --mesh auto, or drop them")
    if args.nodes is not None and args.nodes < 1:
        raise ConfigError(f"--nodes {args.nodes} must be >= 1")
    # with auto the layout is validated once the planner has set it
    return load_config(args.preset, overrides, validate=validate and not auto), args


def layout_label(cfg: Config) -> str:
    """``pp2+zero1+tp2``-style name of a config's layout, the same in both frameworks' metadata."""
    return cfg.layout().label
