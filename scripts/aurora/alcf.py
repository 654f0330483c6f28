"""What ALCF's Aurora documentation prescribes for a job: the queues and the oneCCL/libfabric/Level Zero
settings, each with its source. Read from the ALCF user guide (github.com/argonne-lcf/user-guides, the
pages behind docs.alcf.anl.gov) as of commit 7d04a3f (2026-08-19); check them again before submitting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from configs import ConfigError

GUIDE = "https://docs.alcf.anl.gov/aurora"
SOURCES = {
    "queues": f"{GUIDE}/running-jobs-aurora/ (Queues; Placement)",
    "oneccl-min": f"{GUIDE}/data-science/frameworks/oneCCL/ ('Minimal set', tested up to 1024 nodes)",
    "oneccl-tune": f"{GUIDE}/data-science/frameworks/oneCCL/ (list to tune from)",
    "oneccl-app": f"{GUIDE}/data-science/frameworks/oneCCL/ ('might be application-dependent' list)",
    "pytorch": f"{GUIDE}/data-science/frameworks/pytorch/ (tile-as-device; CPU bindings; xccl backend)",
    "binding": f"{GUIDE}/running-jobs-aurora/ (Binding MPI ranks to GPUs, gpu_tile_compact.sh)",
}


# ----------------------------------------------------------------------------- queues
@dataclass(frozen=True)
class Queue:
    name: str
    min_nodes: int
    max_nodes: int
    max_walltime_s: int
    note: str


MIN_WALLTIME_S = 5 * 60  # every queue: "Time Min 5 min"
HOUR = 3600
# ALCF "Running Jobs on Aurora", Queues table. prod is a routing queue: its execution queue, and so the
# walltime limit, follows the node count (small 256-1024 nodes <= 12 h, medium 1025-1999 <= 18 h, large >= 2000
# <= 24 h); 10,624 is the theoretical maximum. visualization (by request only) is left out.
QUEUES = {
    "debug": Queue("debug", 1, 2, 1 * HOUR, "non-exclusive nodes; 1 job per user"),
    "debug-scaling": Queue("debug-scaling", 2, 256, 1 * HOUR, "1 job per user"),
    "capacity": Queue("capacity", 1, 16, 168 * HOUR, "2 jobs running per user; 512 nodes over all its jobs"),
    "prod": Queue("prod", 256, 10_624, 24 * HOUR, "routes to small (<= 1024 nodes, 12 h), medium (<= 1999, 18 h), "
                  "large (24 h)"),
}
PROD_TIERS = ((1024, 12 * HOUR), (1999, 18 * HOUR), (10_624, 24 * HOUR))
# "if your job is 64 nodes or less you can save switch hops if all your nodes are in the same rack";
# place=scatter:group=tier0 guarantees one rack (a job larger than a rack would never start)
RACK_NODES = 64


def max_walltime_s(queue: Queue, nodes: int) -> int:
    if queue.name == "prod":
        return next(limit for top, limit in PROD_TIERS if nodes <= top)
    return queue.max_walltime_s


def parse_walltime(text: str) -> int:
    """PBS's ``[[HH:]MM:]SS`` -> seconds (``06:00:00``, ``30:00`` = 30 minutes, ``90`` = 90 seconds)."""
    if not re.fullmatch(r"\d+(:\d{1,2}){0,2}", text.strip()):
        raise ConfigError(f"--walltime {text!r} is not PBS's [[HH:]MM:]SS, e.g. 06:00:00")
    secs = 0
    for part in text.strip().split(":"):
        secs = secs * 60 + int(part)
    return secs


def hms(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _limits() -> str:
    return "; ".join(f"{q.name} {q.min_nodes}-{q.max_nodes} nodes for <= {hms(q.max_walltime_s)}"
                     + (" (<= 12:00:00 up to 1024 nodes)" if q.name == "prod" else "") for q in QUEUES.values())


def choose_queue(nodes: int, walltime_s: int, queue: str = "auto") -> str:
    """The queue for ``nodes`` x ``walltime_s`` (``auto``: the first that fits of debug, debug-scaling, capacity,
    prod), or a ConfigError naming ALCF's limits and the fix."""
    if walltime_s < MIN_WALLTIME_S:
        raise ConfigError(f"--walltime {hms(walltime_s)} is under every Aurora queue's minimum of "
                          f"{hms(MIN_WALLTIME_S)}")
    if queue == "auto":
        order = ("debug", "debug-scaling", "capacity", "prod")
        fits = [q for q in order if QUEUES[q].min_nodes <= nodes <= QUEUES[q].max_nodes
                and walltime_s <= max_walltime_s(QUEUES[q], nodes)]
        if not fits:
            raise ConfigError(f"no Aurora queue takes {nodes} nodes for {hms(walltime_s)} ({_limits()}): shorten "
                              "--walltime to 01:00:00 (debug-scaling), or use <= 16 nodes (capacity) or >= 256 (prod)")
        return fits[0]
    if queue not in QUEUES:
        raise ConfigError(f"--queue {queue!r} is not one of auto, {', '.join(QUEUES)} (scripts/aurora/alcf.py "
                          "holds ALCF's queue table)")
    q = QUEUES[queue]
    if not q.min_nodes <= nodes <= q.max_nodes:
        raise ConfigError(f"--queue {queue} takes {q.min_nodes}-{q.max_nodes} nodes, not {nodes} ({_limits()}); "
                          "--queue auto picks one that fits")
    limit = max_walltime_s(q, nodes)
    if walltime_s > limit:
        raise ConfigError(f"--queue {queue} allows at most {hms(limit)} for {nodes} nodes, not --walltime "
                          f"{hms(walltime_s)} ({_limits()})")
    return queue


# ----------------------------------------------------------------------------- environment
@dataclass(frozen=True)
class EnvSetting:
    name: str
    value: str
    source: str  # a key of SOURCES
    why: str  # "choice:" where the page offers the value to try rather than requires it


ENV = (
    EnvSetting("CCL_PROCESS_LAUNCHER", "pmix", "oneccl-min", "oneCCL learns ranks from PALS's PMIx"),
    EnvSetting("CCL_ATL_TRANSPORT", "mpi", "oneccl-min", "oneCCL's transport over Aurora MPICH"),
    EnvSetting("CCL_KVS_MODE", "mpi", "oneccl-min", "key-value store through MPI, not TCP sockets"),
    EnvSetting("FI_MR_CACHE_MONITOR", "userfaultfd", "oneccl-min",
               "libfabric memory-registration cache monitor; the page's application-dependent list offers "
               "`disabled` instead: the minimal (functional) set wins"),
    EnvSetting("CCL_KVS_CONNECTION_TIMEOUT", "600", "oneccl-tune", "choice: seconds to wait for the KVS at start"),
    EnvSetting("FI_CXI_DEFAULT_CQ_SIZE", "1048576", "oneccl-app", "choice: Slingshot completion-queue entries"),
    EnvSetting("FI_CXI_CQ_FILL_PERCENT", "30", "oneccl-app", "choice: completion-queue fill before flow control"),
    EnvSetting("FI_CXI_OFLOW_BUF_SIZE", "8388608", "oneccl-app", "choice: overflow buffer bytes (was misspelt OVFLOW)"),
    EnvSetting("ZE_FLAT_DEVICE_HIERARCHY", "FLAT", "pytorch",
               "each of the 12 tiles is a device (the frameworks module's default; the JAX job sets it itself)"),
    EnvSetting("ZE_ENABLE_PCI_ID_DEVICE_ORDER", "1", "binding",
               "device indices in PCI order (as ALCF's gpu_tile_compact.sh sets): tiles 0-5 should be socket 0's "
               "GPUs, beside ranks 0-5's cores (untested on hardware)"),
)
MISSPELT = ("FI_CXI_OVFLOW_BUF_SIZE",)  # names that once reached the job and do nothing

# CPU binding for 12 ranks per node: 4 cores each, 6 per socket, cores 0 and 52 (the OS's) and the last cores
# of each socket (oneCCL's default worker threads) left free (ALCF PyTorch page)
CPU_BIND_12 = "list:4-7:8-11:12-15:16-19:20-23:24-27:56-59:60-63:64-67:68-71:72-75:76-79"
# one rank per node: every core but 0 and 52 ("reserved for system services" since March 2025, running-jobs page)
CPU_BIND_1 = "list:1-51,53-103"
