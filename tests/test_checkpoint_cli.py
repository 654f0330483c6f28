"""``python -m jax_impl.checkpoint import/export`` on bad input: one message, exit 2, nothing overwritten."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from configs import load_config
from jax_impl import checkpoint
from jax_impl.model import init_params


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ck") / "checkpoints"
    cfg = load_config("tiny")
    checkpoint.save_params_only(d, jax.tree.map(np.asarray, init_params(cfg.model, 0)), cfg, 3)
    return d


@pytest.fixture(scope="module")
def pt(ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pt") / "model.pt"
    assert checkpoint._cli(["export", "--to", "torch", str(ckpt), str(out)]) == 0
    return out


def _fails(capsys, *argv: str) -> str:
    assert checkpoint._cli(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_export_refuses_missing_and_corrupt_checkpoints(ckpt, tmp_path, capsys):
    err = _fails(capsys, "export", str(tmp_path / "nope"), str(tmp_path / "a.pt"))
    assert "the path does not exist" in err
    # a copy of the checkpoint whose array files are cut to nothing
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    for f in (bad / "3" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(f.read_bytes()[:10])
    err = _fails(capsys, "export", str(bad), str(tmp_path / "b.pt"))
    assert "checkpoint step 3" in err and "truncated or corrupt" in err
    assert not (tmp_path / "b.pt").exists()


def test_export_and_import_refuse_an_existing_output(ckpt, pt, tmp_path, capsys):
    out = tmp_path / "there.pt"
    out.write_bytes(b"keep me")
    err = _fails(capsys, "export", str(ckpt), str(out))
    assert f"output {out} already exists" in err and out.read_bytes() == b"keep me"
    (tmp_path / "ckout").mkdir()
    (tmp_path / "ckout" / "x").write_text("keep")
    err = _fails(capsys, "import", str(pt), str(tmp_path / "ckout"), "--preset", "tiny")
    assert "already exists" in err and (tmp_path / "ckout" / "x").read_text() == "keep"


@pytest.mark.parametrize("how,msg", [
    ("missing", "no such file"),
    ("truncated", "not a readable torch state_dict"),
    ("garbage", "not a readable torch state_dict"),
    ("not-a-dict", "not a state_dict of tensors"),
])
def test_import_refuses_missing_truncated_or_corrupt_input(pt, tmp_path, capsys, how, msg):
    src = tmp_path / "in.pt"
    if how == "truncated":
        src.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    elif how == "garbage":
        src.write_bytes(b"\x00not a zip or a pickle" * 10)
    elif how == "not-a-dict":
        import torch

        torch.save([1, 2, 3], src)
    err = _fails(capsys, "import", str(src), str(tmp_path / "out"), "--preset", "tiny")
    assert msg in err
    assert not (tmp_path / "out").exists()
