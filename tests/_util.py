"""Helpers shared by tests."""

import jax
import numpy as np


def assert_tree_close(actual, expected, rtol: float) -> None:
    """Leaf-wise closeness, relative to each leaf's scale (max |expected|).

    Element-wise rtol alone fails on entries near zero, where summation order decides the
    last bits; scaling the tolerance by the tensor's magnitude keeps the check strict.
    """
    def check(path, a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape, f"{jax.tree_util.keystr(path)}: shape {a.shape} != {b.shape}"
        scale = max(np.abs(b).max(), 1e-30)
        err = np.abs(a - b).max() / scale
        assert err <= rtol, f"{jax.tree_util.keystr(path)}: max |diff| / max |ref| = {err:.3g} > {rtol}"

    jax.tree_util.tree_map_with_path(check, actual, expected)
