"""Weights as an uncompressed ``.npz`` of the flat JAX names (``embed``, ``layers.wq``, ...), numpy only.

The file both trainers exchange: ``torch_ref.train --init jax`` gets the JAX initial weights as one
(``python -m jax_impl.init_weights`` writes it into the run directory), ``--init-from`` reads one, and
``python -m jax_impl.checkpoint export --to npz`` writes one. A torch worker never loads it whole:
``npz_members`` maps each member in place, and ``torch_ref.weights.NpzInit`` reads one parameter's shard at a
time from those maps.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from weightmap.jaxtorch import flatten, unflatten


def save_npz(path: str | Path, params: Mapping[str, Any]) -> Path:
    """Nested JAX params -> an uncompressed ``.npz`` of the flat names (``np.savez``: members stored, mappable)."""
    path = Path(path)
    np.savez(path, **flatten(params))
    return path


def load_npz(path: str | Path) -> dict[str, Any]:
    """A flat-name ``.npz`` -> nested JAX params (numpy, read whole)."""
    with np.load(path) as f:
        return unflatten({k: f[k] for k in f.files})


@dataclass(frozen=True)
class NpzMember:
    """Where one array of an uncompressed ``.npz`` lies in the file: ``array()`` maps it read-only, copying nothing."""

    path: Path
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool

    def array(self) -> np.ndarray:
        # a fresh map per call: the pages a reader touched leave the process when its array is dropped
        if 0 in self.shape:  # np.memmap cannot map zero bytes
            return np.zeros(self.shape, self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape or (1,),
                         order="F" if self.fortran_order else "C").reshape(self.shape)


def npz_members(path: str | Path) -> dict[str, NpzMember]:
    """The arrays of an ``np.savez`` file (stored, not deflated) by key, located without reading their data."""
    path = Path(path)
    out: dict[str, NpzMember] = {}
    with zipfile.ZipFile(path) as z, path.open("rb") as f:
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{path}: member {info.filename} is compressed; the shard-by-shard reader needs an "
                                 "uncompressed .npz (write it with weightmap.npz.save_npz / np.savez)")
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                raise ValueError(f"{path}: no local file header for {info.filename} at byte {info.header_offset}")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            out[info.filename[:-4]] = NpzMember(path, f.tell(), tuple(shape), np.dtype(dtype), bool(fortran))
    return out
