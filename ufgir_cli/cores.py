"""How many intra-op threads and data-loader workers a run gets: from the cores this process may
actually use, not the machine's, decided when the run starts (a recipe leaves both unset, so the
same recipe fits a laptop and a compute node, and its run key does not depend on the machine).

torch defaults to one thread per physical core of the machine. In a container, under ``taskset``, or
beside data-loader workers that is more threads than cores, and the threads spin against each other:
on two cores with another process busy, the CPU demo's epoch took 57.6 s at the default and 3.2 s
with one thread. So the count starts from the CPUs in the affinity mask, is capped by a cgroup CPU
quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), and leaves one core to each data-loader
worker and to each other local rank under torchrun.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP) -> float | None:
    """CPUs' worth of time the cgroup may use per period, or None when unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by the cgroup quota (at least 1)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        n = min(n, math.ceil(quota))
    return max(n, 1)


def intra_op_threads(requested: int | None, workers: int, local_world: int = 1) -> int:
    """``requested`` when set (> 0); else the available cores shared by the local ranks, less one per
    data-loader worker, at least 1."""
    if requested:
        return requested
    return max(available_cores() // max(local_world, 1) - workers, 1)


def data_workers(requested: int | None, local_world: int = 1) -> int:
    """``requested`` when set (0 loads in the training process); else half of this rank's share of the
    available cores, at most 4 (2 cores: 1 worker beside 1 compute thread; 16 cores: 4 workers)."""
    if requested is not None:
        return requested
    return min(4, available_cores() // (2 * max(local_world, 1)))
