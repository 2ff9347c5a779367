"""Statistics of a benchmark: percentiles of samples, and how busy the machine's CPUs were.

Every number the bench programs report comes through :func:`describe` (n, mean, min, max and
p50/p90/p99, linear interpolation as numpy's default), and every phase records its CPU with
:class:`CpuMeter` (the machine, our processes, everything else) so a noisy run can be told
from a clean one.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PERCENTILES = (50.0, 90.0, 99.0)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None when empty."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def describe(values: Sequence[float], scale: float = 1.0) -> dict[str, float | int | None]:
    """n, mean, p50/p90/p99, min, max of ``values`` times ``scale``."""
    scaled = [v * scale for v in values]
    out: dict[str, float | int | None] = {
        "n": len(scaled),
        "mean": statistics.fmean(scaled) if scaled else None,
        "min": min(scaled) if scaled else None,
        "max": max(scaled) if scaled else None,
    }
    for q in PERCENTILES:
        out[f"p{q:g}"] = percentile(scaled, q)
    return out


# --- CPU ---------------------------------------------------------------------------------------


def _cpu_times() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cpu_busy(sample_s: float = 1.0) -> float | None:
    """Percent of all cores busy over ``sample_s`` seconds (every process, this one too)."""
    try:
        busy0, total0 = _cpu_times()
        time.sleep(sample_s)
        busy1, total1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    return 100.0 * (busy1 - busy0) / max(1, total1 - total0)


def _proc_jiffies(pid: int) -> tuple[int, int]:
    """utime and stime of one process (and its reaped children: none here), in clock ticks."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0
    return int(fields[11]), int(fields[12])


class CpuMeter:
    """CPU used during a phase by the machine, by our processes, and by everything else.

    "Foreign" CPU (other users' processes on a shared machine) competes with the stack and the
    engine for the same cores and skews both; the report shows it per phase so a reader can
    tell a clean run from a noisy one. Percentages are of all cores (100 = every core busy).
    """

    def __init__(self, pids: Sequence[int], names: Sequence[str] = ()) -> None:
        self.pids = list(pids)
        self.names = list(names)
        self.t0 = time.perf_counter()
        self.busy0, self.total0 = _cpu_times()
        self.own0 = {pid: _proc_jiffies(pid) for pid in self.pids}

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.t0
        busy1, total1 = _cpu_times()
        now = {pid: _proc_jiffies(pid) for pid in self.pids}
        user = {pid: max(0, now[pid][0] - self.own0[pid][0]) for pid in self.pids}
        system = {pid: max(0, now[pid][1] - self.own0[pid][1]) for pid in self.pids}
        used = {pid: user[pid] + system[pid] for pid in self.pids}
        own = sum(used.values())
        total = max(1, total1 - self.total0)
        busy = 100.0 * (busy1 - self.busy0) / total
        ours = 100.0 * own / total
        out: dict[str, Any] = {
            "wall_s": wall,
            "machine_busy_pct": busy,
            "own_busy_pct": ours,
            "foreign_busy_pct": max(0.0, busy - ours),
        }
        if self.names:  # per process, in cores (1.0 = one core busy the whole phase)
            hz = os.sysconf("SC_CLK_TCK")
            out["cores_used"] = {
                name: used[pid] / hz / wall if wall > 0 else None
                for name, pid in zip(self.names, self.pids, strict=True)
            }
            # The kernel's share: on loopback a socket write also runs the receiver's side.
            out["system_share"] = {
                name: system[pid] / used[pid] if used[pid] else None
                for name, pid in zip(self.names, self.pids, strict=True)
            }
        return out


def cpu_per_token(load: dict[str, Any], tokens: int) -> dict[str, float] | None:
    """Each process's CPU time over a metered phase (``CpuMeter.stop()``) per token, in µs."""
    if not tokens or not load.get("cores_used"):
        return None
    return {
        name: cores * load["wall_s"] / tokens * 1e6
        for name, cores in load["cores_used"].items()
        if cores is not None
    }


def memory_kib(pid: int) -> dict[str, int]:
    """Resident memory of a process now (VmRSS) and at its peak (VmHWM), in KiB."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def wait_quiet(max_busy: float | None, timeout_s: float, what: str) -> None:
    """Wait (bounded) until the machine's CPUs are at most ``max_busy`` percent busy."""
    if max_busy is None:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        busy = cpu_busy(3.0)
        if busy is None or busy <= max_busy:
            return
        if time.monotonic() > deadline:
            print(f"CPU still {busy:.0f}% busy before {what}; going on", file=sys.stderr)
            return
        time.sleep(2)


def pin(pid: int, cpus: set[int]) -> None:
    """Run every thread of ``pid`` on ``cpus`` only (threads it starts later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
            os.sched_setaffinity(int(task.name), cpus)
