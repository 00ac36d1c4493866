"""Timing helpers the benchmarks share: a progress reporter that times a stage's epoch loop, medians,
and how many cores other processes kept busy meanwhile."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from pathlib import Path

from ltclip.progress import Progress


class StepTimer(Progress):
    """Records, for each epoch task of a stage, its wall/CPU time and the time each step ended."""

    def __init__(self):
        self.epochs: list[dict] = []
        self.created = time.perf_counter()

    @contextlib.contextmanager
    def task(self, description: str, total: int, unit: str = "it"):
        if not description.startswith("epoch"):
            yield lambda n=1: None
            return
        marks: list[float] = []
        t0, c0 = time.perf_counter(), time.process_time()
        yield lambda n=1: marks.append(time.perf_counter())
        self.epochs.append({
            "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "steps": len(marks),
            "start_s": t0 - self.created, "step_ends_s": [m - t0 for m in marks],
        })


def median(values) -> float:
    return float(statistics.median(values))


def loadavg() -> float:
    return os.getloadavg()[0]


class OtherLoad:
    """Cores kept busy by other processes while the block runs: machine busy time (/proc/stat)
    minus this process's and its waited-for children's CPU time, over the wall time."""

    @staticmethod
    def _busy_s() -> float:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self) -> "OtherLoad":
        self._t, self._busy, self._own = time.perf_counter(), self._busy_s(), self._own_s()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._t
        others = (self._busy_s() - self._busy) - (self._own_s() - self._own)
        self.cores = max(0.0, others / wall) if wall > 0 else 0.0
