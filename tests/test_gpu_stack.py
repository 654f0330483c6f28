"""benchmarks/gpu_stack.py: the pinned CUDA stack is the pinned CPU stack's versions, and its parts, carried one
call at a time, join back into the same wheels (or are refused, naming what to carry)."""

import importlib.metadata
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_stack


def test_pinned_stack_is_the_installed_cpu_stack_plus_the_cuda_plugin():
    specs = dict(s.split("==") for s in gpu_stack.pinned_stack())
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint"):
        assert specs[name] == importlib.metadata.version(name)  # what the tests here run on
    assert specs["jax-cuda13-plugin"] == specs["jax-cuda13-pjrt"] == specs["jax"]


def test_pinned_stack_refuses_a_cuda_extra_at_another_jax_version(tmp_path):
    text = (gpu_stack.ROOT / "pyproject.toml").read_text().replace('"jax[cuda13]==0.10.2"', '"jax[cuda13]==0.11.2"')
    (tmp_path / "pyproject.toml").write_text(text)
    with pytest.raises(SystemExit, match=r"cuda extra pins jax 0\.11\.2"):
        gpu_stack.pinned_stack(tmp_path / "pyproject.toml")


@pytest.fixture
def packed(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    blobs = {f"pkg{i}-1.0-py3-none-any.whl": bytes(range(256)) * (7 + 5 * i) for i in range(3)}
    for name, data in blobs.items():
        (wheels / name).write_bytes(data)
    out = tmp_path / ".gpu-stack"
    manifest = gpu_stack.pack(sorted(wheels.iterdir()), out, part_bytes=1500)
    return out, manifest, blobs


def _call(tmp_path: Path, out: Path, k: int) -> Path:
    """The working tree of the k-th call: only its own part travels."""
    tree = tmp_path / f"tree-{k}" / ".gpu-stack"
    shutil.copytree(out / f"call-{k}", tree / f"call-{k}")
    return tree


def test_parts_carried_one_call_at_a_time_install_the_same_wheels(tmp_path, packed):
    out, manifest, blobs = packed
    n = len(manifest["parts"])
    assert n == -(-manifest["bytes"] // 1500) >= 3
    assert all(p["bytes"] <= 1500 for p in manifest["parts"])
    installed = {}

    def install(wheels, site):
        installed.update({w.name: w.read_bytes() for w in wheels})
        installed["site"] = site

    stash, site = tmp_path / "stash", tmp_path / "site"
    for k in range(1, n + 1):
        rc = gpu_stack.receive(_call(tmp_path, out, k), stash, site, install=install)
        assert rc == (0 if k == n else gpu_stack.MISSING_EXIT)
        assert bool(installed) == (k == n)
    assert installed.pop("site") == site
    assert installed == blobs


def test_a_missing_part_is_named_and_installs_nothing(tmp_path, packed, capsys):
    out, _, _ = packed
    calls = []
    for k in (1, 3):
        assert gpu_stack.receive(_call(tmp_path, out, k), tmp_path / "stash", tmp_path / "site",
                                 install=lambda w, s: calls.append(w)) == gpu_stack.MISSING_EXIT
    assert "still missing call-2" in capsys.readouterr().out
    assert calls == []


def test_a_damaged_part_is_refused(tmp_path, packed):
    out, _, _ = packed
    tree = _call(tmp_path, out, 2)
    part = tree / "call-2" / gpu_stack.PART
    part.write_bytes(b"x" + part.read_bytes()[1:])
    with pytest.raises(SystemExit, match=r"call-2/part: sha256 .* carry it again"):
        gpu_stack.receive(tree, tmp_path / "stash", tmp_path / "site", install=lambda w, s: None)


@pytest.mark.parametrize("earlier_call", [False, True])
def test_a_part_of_another_pack_is_refused(tmp_path, packed, earlier_call):
    """Beside a part of this pack in the same call, or after this pack's parts came in an earlier call."""
    out, _, _ = packed
    if earlier_call:
        gpu_stack.receive(_call(tmp_path, out, 1), tmp_path / "stash", tmp_path / "site", install=lambda w, s: None)
    (tmp_path / "w2").mkdir()
    (tmp_path / "w2" / "other-1.0-py3-none-any.whl").write_bytes(b"other" * 1000)
    gpu_stack.pack(sorted((tmp_path / "w2").iterdir()), tmp_path / "pack2", part_bytes=1500)
    tree = _call(tmp_path, out, 2)
    shutil.copytree(tmp_path / "pack2" / "call-1", tree / "call-1")
    with pytest.raises(SystemExit, match="another pack"):
        gpu_stack.receive(tree, tmp_path / "stash", tmp_path / "site", install=lambda w, s: None)


def test_receive_with_nothing_says_what_to_carry(tmp_path):
    with pytest.raises(SystemExit, match=r"no part under .* carry \.gpu-stack/call-1"):
        gpu_stack.receive(tmp_path / ".gpu-stack", tmp_path / "stash", tmp_path / "site")


def test_pack_refuses_a_part_size_that_is_not_positive():
    with pytest.raises(SystemExit, match=r"--part-mib 0\.0: give a positive size"):
        gpu_stack.main(["pack", "--part-mib", "0"])

