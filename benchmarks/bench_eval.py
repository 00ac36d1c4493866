"""Evaluation and retrieval speed: `evaluate` on large logits; exact kNN with faiss vs numpy vs torch.

Run as ``python -m benchmarks.bench_eval [--quick] [--out DIR]``; prints a Markdown table and
writes DIR/eval.json (default bench_out/). Peak RSS is sampled while each method runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import torch

from ltclip.evaluation.metrics import evaluate
from ltclip.evaluation.retrieval import normalise, search

FULL = {"eval_rows": 50_000, "eval_classes": 1_000, "db": 100_000, "queries": 10_000, "dim": 512, "k": 10}
QUICK = {"eval_rows": 5_000, "eval_classes": 100, "db": 5_000, "queries": 500, "dim": 64, "k": 10}


class PeakRSS:
    """Resident set size (MiB) of this process at the start and its peak while the block runs,
    sampled every 5 ms."""

    def __enter__(self) -> "PeakRSS":
        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.start_mib = self.start / 2**20
        self.peak_mib = max(self.peak, self._proc.memory_info().rss) / 2**20


def measure(fn: Callable[[], object], repeats: int) -> tuple[dict, object]:
    """Median and all wall times (s) of ``fn`` over ``repeats`` runs, RSS, and its last result."""
    times = []
    with PeakRSS() as rss:
        for _ in range(repeats):
            start = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - start)
    stats = {"median_s": statistics.median(times), "times_s": times, "rss_start_mib": rss.start_mib}
    return {**stats, "peak_rss_mib": rss.peak_mib, "extra_rss_mib": rss.peak_mib - rss.start_mib}, result


def numpy_knn(queries: np.ndarray, db: np.ndarray, k: int, block: int = 256) -> np.ndarray:
    """Exact top-k inner product: blocked matmul + argpartition, then a sort of the k survivors."""
    out = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), block):
        sims = queries[start : start + block] @ db.T
        part = np.argpartition(sims, db.shape[0] - k, axis=1)[:, -k:]
        order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1, kind="stable")
        out[start : start + block] = np.take_along_axis(part, order, axis=1)
    return out


def machine_info() -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    model = models[0] if models else platform.processor()
    try:
        import faiss

        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = None
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "faiss": faiss_version,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def run(size: dict, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    n, c = size["eval_rows"], size["eval_classes"]
    logits = rng.standard_normal((n, c), dtype=np.float32) * 3
    labels = rng.integers(0, c, n)
    counts = np.maximum(1, (500 * 0.99 ** np.arange(c)).astype(int))
    results = {"evaluate": measure(lambda: evaluate(logits, labels, counts), repeats)[0]}
    del logits

    db = normalise(rng.standard_normal((size["db"], size["dim"]), dtype=np.float32))
    queries = normalise(rng.standard_normal((size["queries"], size["dim"]), dtype=np.float32))
    k = size["k"]
    knn = {
        "numpy": lambda: numpy_knn(queries, db, k),
        "torch": lambda: search(queries, db, k, backend="torch")[1],
    }
    if importlib.util.find_spec("faiss") is not None:
        knn["faiss"] = lambda: search(queries, db, k, backend="faiss")[1]
    neighbours = {}
    for name, fn in knn.items():
        results[f"knn_{name}"], neighbours[name] = measure(fn, repeats)
    for name, idx in neighbours.items():
        results[f"knn_{name}"]["same_neighbours_as_numpy"] = float((idx == neighbours["numpy"]).mean())
    results["process_max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return results


def rss(r: dict) -> str:
    return f"{r['peak_rss_mib']:.0f} (+{r['extra_rss_mib']:.0f})"


def table(size: dict, results: dict) -> str:
    rows = [
        "| benchmark | size | median s | peak RSS MiB (+ over inputs) | same neighbours |",
        "|---|---|---:|---:|---:|",
        f"| evaluate | {size['eval_rows']:,} x {size['eval_classes']:,} logits "
        f"| {results['evaluate']['median_s']:.3f} | {rss(results['evaluate'])} | |",
    ]
    knn_size = f"{size['queries']:,} queries, {size['db']:,} x {size['dim']} db, k={size['k']}"
    for key, r in results.items():
        if key.startswith("knn_"):
            rows.append(
                f"| kNN {key[4:]} | {knn_size} | {r['median_s']:.3f} | {rss(r)} "
                f"| {100 * r['same_neighbours_as_numpy']:.2f}% |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (median reported)")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for eval.json")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    results = run(size, args.repeats)
    report = {"size": size, "repeats": args.repeats, "machine": machine_info(), "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    info = report["machine"]
    versions = f"numpy {info['numpy']}, torch {info['torch']}, faiss {info['faiss']}"
    print(f"{info['cpu_model']}, {info['nproc']} cores; {versions}\n")
    print(table(size, results))
    return report


if __name__ == "__main__":
    main()
