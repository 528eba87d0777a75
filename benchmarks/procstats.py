"""CPU time and memory of a process tree, read from /proc (Linux only, no psutil).

CPU is ``utime + stime`` of every live process in the tree, in seconds; memory is
the sum of their ``VmRSS``. Both are read at the edges of a measurement window
and subtracted, so time a server spent starting up or in warmup does not count.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may contain spaces.
    return raw[raw.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's children file)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
        except FileNotFoundError:
            continue
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(children(p))
    return pids


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds (0 when it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # After the ")" the fields start at #3 (state): utime is #14, stime #15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


@dataclass(frozen=True)
class Sample:
    """One reading of a set of process trees."""

    cpu_s: float
    rss: int
    wall: float  # time.monotonic() of the reading

    def cpu_since(self, earlier: Sample) -> float:
        return self.cpu_s - earlier.cpu_s


def sample(pids: list[int], clock: float) -> Sample:
    """Read every tree rooted at ``pids`` (e.g. two relay nodes and Redis)."""
    cpu, rss = 0.0, 0
    for root in pids:
        for p in tree(root):
            cpu += cpu_seconds(p)
            rss += rss_bytes(p)
    return Sample(cpu, rss, clock)


def busy_seconds(cpus: list[int] | None = None) -> float:
    """CPU seconds spent busy by the whole machine, or by the given CPUs, from /proc/stat."""
    total = 0.0
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            name, *rest = line.split()
            if (cpus is None and name == "cpu") or (
                cpus is not None and name[3:].isdigit() and int(name[3:]) in cpus
            ):
                fields = [int(x) for x in rest]
                # idle and iowait are not busy; guest time is already in user/nice.
                total += sum(fields[:8]) - fields[3] - fields[4]
    return total / CLK_TCK


def wait_quiet(limit: float, *, most: float = 0.25, probe: float = 0.5) -> float:
    """Wait up to ``limit`` s until the machine does less than ``most`` cores of other work.

    Meant to be called while the servers under test are idle. Returns the busy cores
    last seen, so a run can say how loaded the machine still was.
    """
    deadline = time.monotonic() + limit
    while True:
        before = busy_seconds()
        time.sleep(probe)
        busy = (busy_seconds() - before) / probe
        if busy < most or time.monotonic() >= deadline:
            return busy
