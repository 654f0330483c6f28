"""JAX params <-> torch ``state_dict`` tensors, and ``.pt`` <-> ``.npz`` for ``python -m jax_impl.checkpoint``.

The name mapping (the table, transposes and layer stacking) is ``weightmap.jaxtorch``, numpy only; this
module only wraps its arrays as torch tensors and back, so the round trip stays bitwise.

``python -m torch_ref.convert`` moves a state_dict between torch's file format and an ``.npz`` of the same
(torch) names, nothing else. ``jax_impl.checkpoint``'s ``export --to torch`` and ``import --from torch`` run it
in a subprocess, so neither package imports the other's framework:

    python -m torch_ref.convert to-pt   state.npz model.pt    # torch-named arrays -> torch.save(state_dict)
    python -m torch_ref.convert from-pt model.pt  state.npz   # torch.load(state_dict) -> torch-named arrays
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightmap.jaxtorch import to_jax, to_torch


def jax_to_torch(params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """JAX params (nested dict of arrays, ``init_params`` layout) -> torch ``state_dict`` of ``Llama``."""
    # to_torch returns fresh writable copies, so the tensors never alias the caller's (maybe read-only) buffers
    return {k: torch.from_numpy(v) for k, v in to_torch(params).items()}


def torch_to_jax(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """torch ``state_dict`` of ``Llama`` -> JAX params (nested dict of numpy arrays)."""
    return to_jax({k: v.detach().cpu().numpy() for k, v in state.items()})


class StateFileError(ValueError):
    """A state_dict file that cannot be read; the message says which and why."""


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A torch state_dict file of tensors, or a StateFileError saying what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise StateFileError(f"{path}: no such file (a torch_ref state_dict .pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a pickle, a pickle of something else
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise StateFileError(f"{path}: not a readable torch state_dict ({type(e).__name__}: {first}); it is "
                             "truncated or corrupt") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StateFileError(f"{path}: holds a {type(state).__name__}, not a state_dict of tensors")
    return state


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m torch_ref.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    to_pt = sub.add_parser("to-pt", help="an .npz of torch state_dict names -> torch.save'd state_dict")
    to_pt.add_argument("src")
    to_pt.add_argument("out")
    from_pt = sub.add_parser("from-pt", help="a torch state_dict file -> an .npz of the same names")
    from_pt.add_argument("src")
    from_pt.add_argument("out")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "to-pt":
            with np.load(args.src) as f:
                # copies: torch.save of a tensor over a read-only npz buffer would warn, and the file is closed next
                state = {k: torch.from_numpy(np.array(f[k])) for k in f.files}
            torch.save(state, args.out)
        else:
            np.savez(args.out, **{k: v.detach().cpu().numpy() for k, v in load_state_dict(args.src).items()})
    except (StateFileError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
