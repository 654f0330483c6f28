"""Host memory: let a training process reuse its freed buffers instead of faulting in fresh pages.

Shared by both trainers (``jax_impl.devices.configure`` on CPU, and every ``torch_ref`` rank), so
the two are measured under the same allocator.

XLA:CPU allocates each execution's temporaries (~100 MiB for the bench step) with malloc and frees
them when the step ends; torch frees each activation after its backward. With glibc's defaults a
freed block goes back to the OS whenever it came from a per-thread arena whose heap has just become
empty, or from mmap (every block over 32 MiB): the next step page-faults it in again, zeroed by the
kernel. Measured at data=2, fp32, bench preset: ~57k minor faults and ~60 ms of kernel time per JAX
step. One arena, no mmap'd chunks and no trimming keep the pages mapped (docs/performance.md has the
figures for both frameworks). ``AURORA_HOST_MALLOC=system`` keeps glibc's defaults.

Known limit (docs/performance.md §12): the heap still grows for the first ~10 steps while freed buffers
fragment, and in a process holding 8 fake devices, whose threads allocate their temp buffers in a different
order each step, it kept growing for all 40 steps watched (1.5 -> 4.9 GB RSS).
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_applied = False


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 -- exists only in glibc (not musl)
        return libc
    except (OSError, AttributeError):
        return None


def reuse_host_memory() -> bool:
    """Configure glibc malloc to keep freed memory (one arena, no mmap, no trim). Returns whether it applied.

    Call it before the framework starts its worker threads (arenas are chosen per thread on first use).
    A no-op off glibc and with ``AURORA_HOST_MALLOC=system``.
    """
    global _applied
    libc = _glibc()
    if libc is None or os.environ.get("AURORA_HOST_MALLOC", "reuse") != "reuse":
        return False
    _applied = all(libc.mallopt(k, v) == 1 for k, v in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
    return _applied


def host_memory_reused() -> bool:
    """Whether this process runs with ``reuse_host_memory`` applied (recorded in each run's meta.json)."""
    return _applied


def release_host_memory() -> None:
    """Return free heap pages to the OS once, e.g. after compiling, so the compiler's peak is not kept resident."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
