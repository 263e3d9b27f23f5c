"""CPU use during a run: the whole machine (``/proc/stat``) and each process of the stack
(``/proc/<pid>/stat``), so a report can say when the cores, not the simulated engines,
were the bottleneck.

The client, the gateway and the simulated workers share this machine's cores; a TTFT
measured while a core is saturated measures the machine. ``CpuMeter`` takes a snapshot
when a run starts and one when it ends; ``usage`` turns the two into the machine's busy
share (all cores) and each process's use in cores (1.0 = one core busy the whole run).
``bottleneck`` is the report's flag. Linux only; elsewhere the figures are None.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")
MACHINE_BUSY_LIMIT = 0.90  # the whole machine's busy share
PROCESS_CORE_LIMIT = 0.90  # one process (single-threaded event loop) in cores


def parse_proc_stat(text: str) -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from ``/proc/stat``'s ``cpu`` line.

    Total is user..steal (guest time is already inside user and nice); idle and iowait
    are not busy."""
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            values = [int(v) for v in parts[1:9]]
            values += [0] * (8 - len(values))
            total = sum(values)
            idle = values[3] + values[4]
            return total - idle, total
    raise ValueError("no aggregate 'cpu' line in /proc/stat")


def parse_pid_stat(text: str) -> int:
    """utime + stime (clock ticks) from ``/proc/<pid>/stat``; the command name may hold
    spaces and parentheses, so fields are counted after its last ')'."""
    rest = text[text.rindex(")") + 1 :].split()
    # rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(rest[11]) + int(rest[12])


@dataclass(frozen=True)
class CpuSnapshot:
    at: float  # time.monotonic()
    machine: tuple[int, int] | None  # (busy, total) jiffies
    processes: dict[str, int | None]  # name -> utime+stime ticks (None: gone or unreadable)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def snapshot(pids: Mapping[str, int], proc: Path = PROC) -> CpuSnapshot:
    stat = _read(proc / "stat")
    machine = parse_proc_stat(stat) if stat is not None else None
    processes: dict[str, int | None] = {}
    for name, pid in pids.items():
        text = _read(proc / str(pid) / "stat")
        processes[name] = parse_pid_stat(text) if text is not None else None
    return CpuSnapshot(time.monotonic(), machine, processes)


@dataclass
class CpuUsage:
    wall_s: float
    machine_busy: float | None  # share of all cores' time busy, 0..1
    cpus: int
    process_cores: dict[str, float] = field(default_factory=dict)  # cores used on average

    def to_json(self) -> dict[str, object]:
        return {
            "wall_s": self.wall_s,
            "machine_busy": self.machine_busy,
            "cpus": self.cpus,
            "process_cores": self.process_cores,
        }


def usage(before: CpuSnapshot, after: CpuSnapshot, ticks_per_s: float, cpus: int) -> CpuUsage:
    wall = after.at - before.at
    busy = None
    if before.machine and after.machine and after.machine[1] > before.machine[1]:
        busy = (after.machine[0] - before.machine[0]) / (after.machine[1] - before.machine[1])
    cores = {}
    for name, t0 in before.processes.items():
        t1 = after.processes.get(name)
        if t0 is not None and t1 is not None and wall > 0:
            cores[name] = (t1 - t0) / ticks_per_s / wall
    return CpuUsage(wall, busy, cpus, cores)


def bottleneck(cpu: Mapping[str, object] | None) -> list[str]:
    """Why the cores, not the simulated engines, limited a run (empty: they did not).
    Takes ``CpuUsage.to_json()``: the machine busier than 90 %, or one process (the
    gateway, the load client, a worker: each one event loop) above 0.9 of a core."""
    if not cpu:
        return []
    reasons = []
    busy = cpu.get("machine_busy")
    cores = cpu.get("process_cores")
    if isinstance(busy, float) and busy > MACHINE_BUSY_LIMIT:
        ours = sum(c for c in cores.values() if isinstance(c, float)) if isinstance(cores, dict) else None
        cpus = cpu.get("cpus")
        share = f" ({ours:.2f} of its {cpus} cores in this run's processes)" if ours is not None and cpus else ""
        reasons.append(f"machine {100 * busy:.0f}% busy{share}")
    if isinstance(cores, dict):
        for name, c in cores.items():
            if isinstance(c, float) and c > PROCESS_CORE_LIMIT:
                reasons.append(f"{name} at {c:.2f} cores")
    return reasons


class CpuMeter:
    """Start/stop around a run: ``start()`` then ``stop()`` -> ``CpuUsage``."""

    def __init__(self, pids: Mapping[str, int], proc: Path = PROC):
        self.pids, self.proc = dict(pids), proc
        self._before: CpuSnapshot | None = None

    def start(self) -> None:
        self._before = snapshot(self.pids, self.proc)

    def stop(self) -> CpuUsage:
        if self._before is None:
            raise RuntimeError("CpuMeter.stop() before start()")
        after = snapshot(self.pids, self.proc)
        return usage(self._before, after, float(os.sysconf("SC_CLK_TCK")), os.cpu_count() or 1)
