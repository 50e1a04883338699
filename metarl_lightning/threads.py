"""How many CPU cores this process may really use, and the torch threads of each training phase.

``os.cpu_count()`` is the machine's cores; a rank may get fewer: a CPU affinity mask (taskset,
SLURM's cgroup binding) or a CFS quota (docker ``--cpus``, Kubernetes limits). Running more intra-op
threads than the cores one has makes every OpenMP barrier wait for a thread that is not
scheduled, which is how a shared machine makes an update several times slower (issue 15).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_quota_cores(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in cores (``None``: no quota or no cgroup to read).

    cgroup v2 (``cpu.max``: ``"QUOTA PERIOD"`` or ``"max PERIOD"``) and v1 (``cpu.cfs_quota_us``,
    ``-1`` for none, over ``cpu.cfs_period_us``).
    """
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = root / "cpu" / "cpu.cfs_quota_us"
        if v1.is_file():
            quota_us = int(v1.read_text())
            return None if quota_us <= 0 else quota_us / int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None


def usable_cores(root: Path = CGROUP_ROOT) -> int:
    """Cores this process may run on: its affinity mask, capped by the cgroup quota (rounded up)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_quota_cores(root)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def stat_fields(path: Path) -> list[str]:
    """The fields of a ``/proc/PID/stat`` (or ``/proc/PID/task/TID/stat``) after the command name.

    The name is in parentheses and may itself hold spaces and ``)``, so the split is after the last
    ``)``: index 0 is the state (field 3 of proc(5)), 1 the parent pid, 11 and 12 utime and stime.
    """
    return path.read_text().rsplit(")", 1)[1].split()


def runnable_elsewhere(proc: Path = Path("/proc")) -> int:
    """Threads running or runnable on this machine now that are not this process's own.

    ``procs_running`` of ``/proc/stat`` (the whole machine, the reader included) minus this
    process's threads in state ``R``. A busy job next to the run shows up here at once, unlike the
    one-minute load average. 0 where ``/proc`` cannot be read.
    """
    try:
        running = next(int(line.split()[1]) for line in (proc / "stat").read_text().splitlines() if line.startswith("procs_running"))
        own = 0
        for task in (proc / "self" / "task").iterdir():
            try:
                own += stat_fields(task / "stat")[0] == "R"
            except OSError:  # the thread ended while we read
                continue
    except (OSError, StopIteration, ValueError):
        return 0
    return max(0, running - own)


def learner_threads(cores: int, local_ranks: int = 1, busy_elsewhere: int = 0) -> int:
    """Torch intra-op threads for the learner phase (adaptation and update) of one rank.

    Args:
        cores: usable cores of this process (``usable_cores()``).
        local_ranks: ranks on this node sharing those cores.
        busy_elsewhere: threads of other processes running now (``runnable_elsewhere()``).

    The rank's share of the cores, less the ones other jobs keep busy, and at least 1. The env
    workers wait while the learner updates, so they take none; the acting step runs on one thread
    beside them (the collector's ``acting_threads``). On the 2-core box (two runs), 2 threads were
    +15% and -4% against 1 when quiet, but kept only 0.63-0.73 of their share under a 2-process
    load, where 1 thread kept all of it (docs/benchmarks.md): the choice is made again at every
    meta-iteration.
    """
    share = max(1, cores // max(1, local_ranks))
    return max(1, min(share, cores - busy_elsewhere))
