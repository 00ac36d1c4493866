"""Timing helpers the benchmarks share: a progress reporter that times a stage's epoch loop, medians,
how many cores other processes kept busy meanwhile, and runs measured in a fresh child process."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import statistics
import sys
import time
from pathlib import Path

from ltclip.core.progress import Progress


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


def add_child_options(parser: argparse.ArgumentParser) -> None:
    """``--threads`` and the hidden ``--child`` of a benchmark that measures runs in child processes."""
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--child", help=argparse.SUPPRESS)


def serve_child(args: argparse.Namespace, child_main) -> bool:
    """Apply ``--threads``; in a child (``--child PAYLOAD``) print ``child_main(payload)`` for
    :func:`run_child` and return True (the caller then returns)."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not args.child:
        return False
    print("RESULT " + json.dumps(child_main(json.loads(args.child))), flush=True)
    return True


def run_child(module: str, payload, label: str):
    """Run ``python -m module --child PAYLOAD`` and return what its child printed.

    Through a shell that forks: a child spawned straight from this (large) process would report
    this process's peak as its own ru_maxrss (Linux carries the parent's high-water mark over exec).
    """
    repo = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", module, "--child", json.dumps(payload)]
    proc = subprocess.Popen(["/bin/sh", "-c", '"$0" "$@"; exit $?', *cmd], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate()
    finally:
        if proc.poll() is None:  # interrupted: its own session, the shell and the python it started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"child {label} failed:\n{stderr[-4000:]}")
    line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])
