"""The JAX <-> torch name mapping (weightmap, numpy only) and how the JAX initial weights reach torch_ref.

torch_ref never imports JAX: ``--init jax`` runs ``python -m jax_impl.init_weights`` as a subprocess, and
the .npz it writes must hold exactly what ``jax_impl.model.init_params`` returns in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import load_config
from jax_impl import init_weights
from jax_impl.model import init_params
from runtime.rundir import write_config
from weightmap import jaxtorch
from weightmap.npz import load_npz, npz_members, save_npz

ROOT = Path(__file__).resolve().parents[1]


def jax_params(model, seed: int) -> dict:
    return jax.tree.map(np.asarray, init_params(model, seed))


def assert_bitwise(got: dict, want: dict) -> None:
    g, w = jaxtorch.flatten(got), jaxtorch.flatten(want)
    assert sorted(g) == sorted(w)
    for k in w:
        assert g[k].dtype == w[k].dtype and g[k].shape == w[k].shape, k
        assert g[k].tobytes() == w[k].tobytes(), k


def test_torch_names_round_trip_is_bitwise_without_torch():
    cfg = load_config("tiny").model
    params = jax_params(cfg, 3)
    state = jaxtorch.to_torch(params)
    assert len(state) == 3 + 9 * cfg.n_layers
    assert state["head.weight"].shape == (cfg.padded_vocab, cfg.hidden)
    np.testing.assert_array_equal(state["layers.1.w_down.weight"], params["layers"]["w_down"][1].T)
    assert all(a.flags.c_contiguous and a.flags.writeable for a in state.values())  # torch.from_numpy-ready
    assert {k: list(v.shape) for k, v in state.items()} == jaxtorch.torch_shapes(params)
    assert_bitwise(jaxtorch.to_jax(state), params)
    assert_bitwise(jaxtorch.unflatten(jaxtorch.flatten(params)), params)


def test_npz_hand_off_is_bitwise_and_mappable(tmp_path):
    params = jax_params(load_config("tiny").model, 1)
    path = save_npz(tmp_path / "w.npz", params)
    assert_bitwise(load_npz(path), params)
    members = npz_members(path)
    assert set(members) == set(jaxtorch.flatten(params))
    assert np.array_equal(members["layers.wq"].array()[1], params["layers"]["wq"][1])


def test_init_weights_cli_writes_init_params_of_the_run_config(tmp_path, capsys):
    cfg = load_config("tiny", {"train.seed": 5, "model.n_layers": 3})
    write_config(tmp_path, cfg)
    assert init_weights.main([str(tmp_path / "config.json"), str(tmp_path / "w.npz")]) == 0
    assert_bitwise(load_npz(tmp_path / "w.npz"), jax_params(cfg.model, 5))
    assert init_weights.main([str(tmp_path / "config.json"), str(tmp_path / "s.npz"), "--seed", "6"]) == 0
    assert_bitwise(load_npz(tmp_path / "s.npz"), jax_params(cfg.model, 6))
    (tmp_path / "bad.json").write_text(json.dumps({"model": {}}))
    assert init_weights.main([str(tmp_path / "bad.json"), str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert "no model section and train.seed; give a run directory's config.json" in err and "Traceback" not in err
    assert not (tmp_path / "x.npz").exists()


def test_torch_ref_gets_the_jax_init_without_importing_jax(tmp_path):
    """What ``torch_ref.train --init jax`` writes into its run directory, from a process that never has JAX:
    the same bits as ``init_params`` here."""
    cfg = load_config("tiny", {"train.seed": 2})
    write_config(tmp_path, cfg)
    code = ("import sys; from pathlib import Path; from torch_ref import train as t; "
            f"t.write_jax_init(Path({str(tmp_path / 'config.json')!r}), Path({str(tmp_path / 'init.npz')!r})); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jax_impl', 'flax', 'optax')); "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert_bitwise(load_npz(tmp_path / "init.npz"), jax_params(cfg.model, 2))


def test_torch_ref_refuses_init_jax_where_jax_is_missing(tmp_path, monkeypatch, capsys):
    import importlib.util

    from torch_ref import train as torch_train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jax" else real(name, *a))
    assert "has no JAX" in torch_train.jax_init_unavailable()
    with pytest.raises(SystemExit) as e:
        torch_train.main(["--preset", "tiny", "--steps", "1", "--out-dir", str(tmp_path), "--name", "r"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--init jax (the default)" in err and "--init torch" in err and "--init-from" in err
    assert not (tmp_path / "r").exists()  # refused before the run directory


def test_init_from_npz_is_checked_and_copied(tmp_path):
    from torch_ref import train as torch_train

    cfg = load_config("tiny")
    src = save_npz(tmp_path / "w.npz", jax_params(cfg.model, 0))
    torch_train.write_init_from(src, cfg, tmp_path / "init_params.npz")
    assert (tmp_path / "init_params.npz").read_bytes() == src.read_bytes()
    other = save_npz(tmp_path / "o.npz", jax_params(load_config("tiny", {"model.n_layers": 1}).model, 0))
    with pytest.raises(torch_train.InitFromError, match=r"flat JAX names.*layers\.attn_norm"):
        torch_train.write_init_from(other, cfg, tmp_path / "x.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(torch_train.InitFromError, match=r"not an uncompressed \.npz"):
        torch_train.write_init_from(tmp_path / "junk.npz", cfg, tmp_path / "y.npz")


def test_checkpoint_cli_torch_file_round_trip_is_bitwise(tmp_path, capsys):
    """``export --to torch`` / ``import --from torch`` leave torch's file format to ``python -m torch_ref.convert``
    (a subprocess); the state_dict holds torch_ref's names and the JAX bits, and comes back unchanged."""
    import torch

    from jax_impl import checkpoint
    from torch_ref.convert import jax_to_torch

    cfg = load_config("tiny")
    params = jax_params(cfg.model, 4)
    checkpoint.save_params_only(tmp_path / "ck", params, cfg, 2)
    assert checkpoint._cli(["export", "--to", "torch", str(tmp_path / "ck"), str(tmp_path / "m.pt")]) == 0
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    want = jax_to_torch(params)
    assert list(state) == list(want)
    assert all(torch.equal(state[k], want[k]) and state[k].dtype == want[k].dtype for k in want)
    assert checkpoint._cli(["import", str(tmp_path / "m.pt"), str(tmp_path / "back"), "--preset", "tiny"]) == 0
    assert_bitwise(checkpoint.restore_numpy(tmp_path / "back")[0], params)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch files left behind
    torch.save({k: v for k, v in want.items() if k != "embed.weight"}, tmp_path / "short.pt")
    assert checkpoint._cli(["import", str(tmp_path / "short.pt"), str(tmp_path / "o"), "--preset", "tiny"]) == 2
    assert "embed.weight: state_dict missing vs tiny" in capsys.readouterr().err


def test_checkpoint_cli_without_torch_names_the_other_formats(tmp_path, monkeypatch, capsys):
    from jax_impl import checkpoint

    fake = tmp_path / "notorch" / "torch"  # shadows torch in the subprocess: an environment without it
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    monkeypatch.setenv("PYTHONPATH", f"{fake.parent}:{ROOT}")
    cfg = load_config("tiny")
    checkpoint.save_params_only(tmp_path / "ck", jax_params(cfg.model, 0), cfg, 1)
    assert checkpoint._cli(["export", "--to", "torch", str(tmp_path / "ck"), str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert "needs PyTorch, which this environment lacks; use --to npz or --to hf" in err and "Traceback" not in err
    assert not (tmp_path / "m.pt").exists()


def test_torch_ref_names_a_failed_jax_init_and_the_alternatives(tmp_path, monkeypatch, capsys):
    from torch_ref import train as torch_train

    fake = tmp_path / "brokenjax" / "jax"  # JAX present but broken: the subprocess fails, the launcher says so
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('this JAX is broken')\n")
    monkeypatch.setenv("PYTHONPATH", f"{fake.parent}{os.pathsep}{ROOT}")
    with pytest.raises(SystemExit) as e:
        torch_train.main(["--preset", "tiny", "--steps", "1", "--mesh", "data=1", "--out-dir", str(tmp_path / "runs"),
                          "--name", "r"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --init jax: `-m jax_impl.init_weights")
    assert "pass --init torch or --init-from instead" in err and "this JAX is broken" in err
