"""Host memory: the allocator a training process runs under, shared by both trainers.

Both trainers (``jax_impl.train`` and every ``torch_ref`` rank) and the benchmark scripts run under the same
policy, so the two frameworks are measured under the same allocator. ``AURORA_HOST_MALLOC`` picks it:

``tcmalloc`` (default)
    gperftools' tcmalloc (Debian/Ubuntu ``libtcmalloc-minimal4``; ``make`` installs it when it can), loaded
    with ``LD_PRELOAD``: the command-line entry points re-execute themselves once with it
    (:func:`reexec_with_allocator`), and ``compare.report`` starts its trainers with it
    (:func:`allocator_env`). Where the library is missing, or in a process that started without it (a test
    calling ``main()`` in-process), the ``reuse`` policy applies instead.
``reuse``
    glibc malloc with one arena, no mmap'd chunks and no trimming, set by ``mallopt`` before the framework
    starts its threads: a step's freed buffers stay mapped instead of being page-faulted in again every step.
``system``
    glibc's defaults.

Why tcmalloc (docs/performance.md, "The host allocator"): XLA:CPU allocates each execution's temporaries
(~128 MiB per device for the bench step) with ``posix_memalign(64, n)``, which glibc 2.36 serves by asking its heap for
``n + 64 + 32`` bytes. A freed temp buffer between two live ones leaves a hole of exactly its own size, too
small for the next step's identical request, so under ``reuse`` the heap grows by a temp buffer at a time
(an 8-device process: 1.5 -> 4.9 GB RSS over 40 steps, still growing). tcmalloc reuses the freed spans: RSS
stays flat from the first step, and the step is a few per cent faster. Without the ``reuse`` settings glibc
would instead mmap and unmap those buffers every step, page-faulting ~64k pages per 2-device step.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping
from pathlib import Path

POLICY_ENV = "AURORA_HOST_MALLOC"
POLICIES = ("tcmalloc", "reuse", "system")
TCMALLOC_ENV = "AURORA_TCMALLOC"  # an explicit path to the tcmalloc shared library
_REEXEC_ENV = "AURORA_HOST_MALLOC_REEXEC"  # set in the re-executed process: never re-execute twice
_TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib",
             "/lib/x86_64-linux-gnu", "/lib64")

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_applied = False


def policy(env: Mapping[str, str] | None = None) -> str:
    """The host allocator policy from ``AURORA_HOST_MALLOC`` in ``env`` (default: this process's environment;
    unset: ``tcmalloc``)."""
    value = (os.environ if env is None else env).get(POLICY_ENV, "tcmalloc").strip().lower() or "tcmalloc"
    if value not in POLICIES:
        raise ValueError(f"{POLICY_ENV}={value!r} is not a host allocator policy; use one of {', '.join(POLICIES)} "
                         "(runtime/hostmem.py)")
    return value


def tcmalloc_library() -> str | None:
    """Path of the tcmalloc shared library: ``AURORA_TCMALLOC`` if set, else the first one found in the usual
    library directories; None when there is none (or off Linux)."""
    explicit = os.environ.get(TCMALLOC_ENV)
    if explicit:
        if not Path(explicit).is_file():
            raise ValueError(f"{TCMALLOC_ENV}={explicit!r} is not a file; point it at libtcmalloc_minimal.so.4 or "
                             f"unset it (or set {POLICY_ENV}=reuse)")
        return explicit
    if not sys.platform.startswith("linux"):
        return None
    for d in _LIB_DIRS:
        for name in _TCMALLOC_NAMES:
            if (Path(d) / name).is_file():
                return str(Path(d) / name)
    return None


def tcmalloc_active() -> bool:
    """Whether this process's malloc is tcmalloc (preloaded; its extension API is then globally visible)."""
    try:
        return hasattr(ctypes.CDLL(None), "MallocExtension_ReleaseFreeMemory")
    except OSError:
        return False


def allocator_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) for a child process that should run under the policy's allocator:
    with tcmalloc preloaded when the policy is ``tcmalloc`` and the library exists; otherwise unchanged."""
    out = dict(os.environ if env is None else env)
    if policy(out) != "tcmalloc":
        return out
    lib = tcmalloc_library()
    if lib is None:
        return out
    preload = out.get("LD_PRELOAD", "")
    if lib not in preload.replace(":", " ").split():
        out["LD_PRELOAD"] = f"{lib} {preload}".strip()
    # the 70B plan and large checkpoints allocate > 1 GiB at once: no "tcmalloc: large alloc" line per block
    out.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    return out


def reexec_with_allocator() -> None:
    """At a command-line entry point, before anything is imported: when the policy is ``tcmalloc``, the
    library exists and this process does not run on it yet, replace the process by the same command line
    with it preloaded (``os.execve``). Returns without doing anything otherwise."""
    if (policy() != "tcmalloc" or os.environ.get(_REEXEC_ENV) or tcmalloc_active()
            or tcmalloc_library() is None or not hasattr(sys, "orig_argv")):
        return
    env = allocator_env()
    env[_REEXEC_ENV] = "1"  # if the preload fails (ld.so only warns), the second process must not loop
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


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
    A no-op off glibc, under tcmalloc (glibc's malloc is then unused) and with ``AURORA_HOST_MALLOC=system``.
    """
    global _applied
    libc = _glibc()
    if libc is None or policy() == "system" or tcmalloc_active():
        return False
    _applied = all(libc.mallopt(k, v) == 1 for k, v in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
    return _applied


def host_allocator() -> str:
    """What this process runs under, for each run's meta.json: ``tcmalloc``, ``glibc-reuse`` or ``glibc``."""
    if tcmalloc_active():
        return "tcmalloc"
    return "glibc-reuse" if _applied else "glibc"


def child_allocator(env: Mapping[str, str] | None = None) -> str:
    """What a trainer process started with :func:`allocator_env` runs under (``host_allocator``'s names)."""
    p = policy(env)
    if p == "tcmalloc" and tcmalloc_library() is not None:
        return "tcmalloc"
    return "glibc" if p == "system" or not sys.platform.startswith("linux") else "glibc-reuse"


def release_host_memory() -> None:
    """Return free heap pages to the OS once, e.g. after compiling, so the compiler's peak is not kept resident."""
    if tcmalloc_active():
        ctypes.CDLL(None).MallocExtension_ReleaseFreeMemory()
        return
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
