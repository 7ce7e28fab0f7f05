"""How many CPU threads each process of a run computes with, and the one place torch is told.

PyTorch's default is every core of the machine. On a shared machine that is the wrong count: its OpenMP threads
wait for one another at every op, so one thread descheduled by another process stalls the rest (the embedded
model decoded at 0.9 tok/s with 2 threads on a 2-core machine whose other core was busy, 14 with 1). The default
here is the physical cores this process may run on (its CPU affinity, the cgroup's CPU quota, hyperthread
siblings counted once) less the cores other processes keep busy, measured over a short sample of /proc/stat
while this process sleeps, and divided among the run's processes; at least 1. ModelConfig.num_threads
(`--threads`) overrides it.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SAMPLE_SECONDS = 0.1  # long enough for a few scheduler ticks; paid once per process
_SYS_CPU = Path("/sys/devices/system/cpu")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


@dataclass(slots=True, frozen=True)
class CpuCores:
    num_cores: int  # physical cores this process may use
    num_busy: float  # cores other processes kept busy during the sample (0 where it cannot be measured)

    @property
    def num_free(self) -> int:
        return max(1, self.num_cores - round(self.num_busy))


def default_num_threads(cores: CpuCores, world_size: int = 1) -> int:
    """Threads for each of world_size processes sharing these cores."""
    return max(1, cores.num_free // world_size)


def set_num_threads(num_threads: int) -> None:
    """The only call to torch.set_num_threads in the package."""
    torch.set_num_threads(num_threads)


@functools.cache
def measure_cpu_cores() -> CpuCores:
    """This machine's usable physical cores and how many of them others keep busy (cached: once a process)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    num_cores = min(_physical_cores(cpus), _cgroup_quota() or len(cpus))
    return CpuCores(num_cores=max(1, num_cores), num_busy=_busy_cores(cpus))


def _physical_cores(cpus: list[int]) -> int:
    """Distinct (package, core) pairs among cpus; the logical count where the topology is not readable."""
    cores = set()
    for cpu in cpus:
        topology = _SYS_CPU / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text()))
        except OSError:
            return len(cpus)
    return len(cores) or len(cpus)


def _cgroup_quota() -> int | None:
    """cgroup v2's cpu.max as whole cores ("max": none)."""
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else max(1, int(quota) // int(period))


def _busy_cores(cpus: list[int]) -> float:
    """Cores of `cpus` busy (not idle or waiting on I/O) over SAMPLE_SECONDS; this process sleeps meanwhile, so it
    is other processes' load. 0 without /proc/stat."""
    before, start = _cpu_times(cpus), time.monotonic()
    if before is None:
        return 0.0
    time.sleep(SAMPLE_SECONDS)
    after, seconds = _cpu_times(cpus), time.monotonic() - start
    if after is None:
        return 0.0
    busy_ticks = (after[0] - before[0]) - (after[1] - before[1])  # (total, idle) deltas
    return max(0.0, busy_ticks / os.sysconf("SC_CLK_TCK") / seconds)


def _cpu_times(cpus: list[int]) -> tuple[int, int] | None:
    """(total, idle + iowait) clock ticks summed over cpus, from /proc/stat."""
    wanted = {f"cpu{cpu}" for cpu in cpus}
    total = idle = 0
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, *ticks = line.split()
        if name in wanted:
            values = [int(t) for t in ticks[:8]]  # user nice system idle iowait irq softirq steal
            total, idle = total + sum(values), idle + values[3] + values[4]
    return total, idle
