"""The two implementations never import each other's framework: every module is parsed, no import runs.

torch_ref must run where JAX is absent (the torch-only stack), jax_impl where torch is absent, and weightmap
(the name mapping both use) in either. They exchange weights as files, through subprocesses
(``python -m jax_impl.init_weights``, ``python -m torch_ref.convert``, ``python -m jax_impl.checkpoint``).
Launcher variables (RANK, PMI_RANK, PALS_RANKID, ...) have one reader, ``runtime.launcher_env``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JAX_SIDE = ("jax", "jaxlib", "jax_impl", "flax", "optax", "orbax")
TORCH_SIDE = ("torch", "torch_ref", "deepspeed")
FORBIDDEN = {"torch_ref": JAX_SIDE, "jax_impl": TORCH_SIDE, "weightmap": JAX_SIDE + TORCH_SIDE}


def imported_modules(src: str) -> list[tuple[int, str]]:
    """(line, module) of every import in ``src``: statements at any depth (inside functions too), and
    ``importlib.import_module("x")`` / ``__import__("x")`` with a literal name."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                out.append((node.lineno, node.args[0].value))
    return out


def violations(package: str, banned: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, mod in imported_modules(path.read_text()):
            if mod.split(".")[0] in banned:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_nothing_of_the_other_side(package):
    assert list((ROOT / package).rglob("*.py")), f"{package}/ has no modules: the scan would prove nothing"
    assert violations(package, FORBIDDEN[package]) == []


def test_the_scan_finds_every_kind_of_import():
    src = ("import os\nimport jax.numpy as jnp\nfrom torch_ref.convert import x\nfrom . import y\n"
           "def f():\n    import optax\n    importlib.import_module('flax.nnx')\n    __import__('orbax')\n")
    assert [m for _, m in imported_modules(src)] == ["os", "jax.numpy", "torch_ref.convert", "optax", "flax.nnx",
                                                     "orbax"]


def launcher_var_reads(src: str, names: frozenset[str]) -> list[tuple[int, str]]:
    """(line, name) where ``src`` reads one of ``names``: ``x.get("N")``, ``getenv("N")``, ``x["N"]`` (load)."""
    out = []
    for node in ast.walk(ast.parse(src)):
        key = None
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            if (f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")) in ("get", "getenv", "pop"):
                key = node.args[0].value
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            key = getattr(node.slice, "value", None)
        if isinstance(key, str) and key in names:
            out.append((node.lineno, key))
    return out


def test_only_runtime_launcher_env_reads_launcher_variables():
    from runtime import launcher_env as le

    names = frozenset((*le.RANK_VARS, *le.SIZE_VARS, *le.LOCAL_RANK_VARS, *le.LOCAL_SIZE_VARS))
    assert launcher_var_reads('os.environ.get("PMI_RANK"); env["RANK"] = "0"; e["LOCAL_RANK"]', names) == [
        (1, "PMI_RANK"), (1, "LOCAL_RANK")]
    bad = []
    for path in sorted(ROOT.glob("*/**/*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", ".venv") or rel.parts[0].startswith(".") or rel == Path("runtime/launcher_env.py"):
            continue
        bad += [f"{rel}:{line} reads {name}" for line, name in launcher_var_reads(path.read_text(), names)]
    assert bad == [], "read them through runtime.launcher_env.read()"
