"""CPU threads per training process: the cores this process may use, shared by the processes of its node.

PyTorch's default is one intra-op thread per core it can see, in every process, so N processes
on a node oversubscribe its cores N times; and in a container the cores it sees are the host's,
not the container's CPU limit. torchrun sets ``OMP_NUM_THREADS=1`` for several processes, which
leaves cores idle when there are more cores than processes. Here the count is the cores
available (the affinity mask, capped by a cgroup CPU quota) divided by the processes per node;
a user's ``OMP_NUM_THREADS`` always wins.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

THREADS_ENV = "OMP_NUM_THREADS"
_CGROUP = Path("/sys/fs/cgroup")


def _cgroup_cpu_limit(root: Path = _CGROUP) -> float | None:
    """The CPU quota of this process's (namespaced) cgroup in cores, v2 or v1; ``None`` without one."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # v2: "max 100000" or "200000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())  # v1: -1 when unlimited
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """The cores this process may run on: its affinity mask, capped by a container's CPU quota (rounded up)."""
    cores = len(os.sched_getaffinity(0))
    limit = _cgroup_cpu_limit()
    return cores if limit is None else max(1, min(cores, math.ceil(limit)))


def threads_per_process(procs_per_node: int, cores: int | None = None) -> int:
    """Intra-op threads for each of ``procs_per_node`` processes sharing ``cores`` (default: those available)."""
    return max(1, (cores if cores is not None else available_cores()) // procs_per_node)


def user_threads() -> str | None:
    """``$OMP_NUM_THREADS`` when the user (or a launcher acting for them) set it."""
    return os.environ.get(THREADS_ENV) or None


def describe(threads: int, procs_per_node: int, cores: int | None = None) -> str:
    cores = cores if cores is not None else available_cores()
    return (f"{threads} CPU thread(s) per process: {cores} core(s) available / {procs_per_node} process(es) on this "
            f"node; set {THREADS_ENV} to choose")
