"""The CPUs this process may really use: its CPU affinity, bounded by its cgroup's CPU quota.

`os.cpu_count()` counts the machine's CPUs; a node in a container started with `cpus: 0.5`, or
pinned with taskset, may use far fewer, and more inference threads than usable cores is a cliff,
not a slope (measured: two 2-thread nodes on 2 cores decoded at 0.8-10 tokens/s, per-token
p99 above 5 s).
The node's default thread count, and the cap on a topology's `n_threads`, come from here.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable


def _affinity_count() -> int:
    """The CPUs this process may be scheduled on (taskset, cpuset, a container's --cpuset-cpus)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS): every CPU counts
        return max(1, os.cpu_count() or 1)


def _read_first_line(path: pathlib.Path) -> str | None:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.readline().strip()
    except (OSError, UnicodeDecodeError):  # not there, or not readable: that cgroup has no say
        return None


def _cgroup_dirs(root: pathlib.Path, proc_cgroup: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
    """("v1" | "v2", folder) of every place this process's CPU quota may be read: the cgroup
    root itself (a container sees its own cgroup there) and the path /proc/self/cgroup names."""
    found = [("v2", root), ("v1", root / "cpu"), ("v1", root / "cpu,cpuacct")]
    try:
        lines = proc_cgroup.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError):  # no /proc (not Linux): only the root is tried
        lines = []
    for line in lines:
        _id, _sep, rest = line.partition(":")
        controllers, _sep, path = rest.partition(":")
        relative = path.lstrip("/")
        if not relative:
            continue
        if controllers == "":
            found.append(("v2", root / relative))
        elif "cpu" in controllers.split(","):
            found.append(("v1", root / controllers / relative))
    return found


def cgroup_cpu_limit(
    root: pathlib.Path = pathlib.Path("/sys/fs/cgroup"),
    proc_cgroup: pathlib.Path = pathlib.Path("/proc/self/cgroup"),
) -> float | None:
    """The CPUs this process's cgroup CPU quota allows (0.5 in a container started with
    `cpus: 0.5`), the smallest found in cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us` /
    `cpu.cfs_period_us`; None when no quota applies."""
    limits: list[float] = []
    for version, folder in _cgroup_dirs(root, proc_cgroup):
        if version == "v2":
            quota, _sep, period = (_read_first_line(folder / "cpu.max") or "").partition(" ")
        else:
            quota = _read_first_line(folder / "cpu.cfs_quota_us") or ""
            period = _read_first_line(folder / "cpu.cfs_period_us") or ""
        try:
            quota_us, period_us = int(quota), int(period)
        except ValueError:  # "max", -1 written as text, or no file: no quota here
            continue
        if quota_us > 0 and period_us > 0:
            limits.append(quota_us / period_us)
    return min(limits) if limits else None


def usable_cpu_count(
    *,
    affinity: Callable[[], int] = _affinity_count,
    quota: Callable[[], float | None] = cgroup_cpu_limit,
) -> int:
    """The CPUs this process may really use: those it may run on, bounded by its cgroup's CPU
    quota (whole CPUs of it: 1.5 allows 1), and at least 1."""
    count = max(1, affinity())
    limit = quota()
    if limit is not None:
        count = min(count, max(1, int(limit)))
    return count
