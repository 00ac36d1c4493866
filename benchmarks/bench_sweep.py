"""Sweep cost: a 16-point linear-head sweep against one train-head run on the same cache.

Run as ``python -m benchmarks.bench_sweep [--quick] [--rounds N] [--out DIR]``; prints a Markdown
table and writes DIR/sweep.json (default bench_out/).

The cache is a long-tailed Gaussian set shaped like CIFAR-100-LT's CLIP features (100 classes,
imbalance 100, at most 500 rows a class: 10,899 train rows of 512-D embeddings; 20 val rows a
class). The sweep is ``lr ∈ {1e-3, 3e-3, 1e-2, 3e-2} × epochs ∈ {10, 30} × loss ∈ {ce,
balanced_softmax}`` over ``--head linear --batch-size 256`` (AdamW, cosine schedule): its 16
heads train in one pass (one group). "One run" is ``run_train_head`` of the sweep's longest point
(30 epochs), the whole stage call in both cases (cache opening, fingerprint, validation every
epoch, run files; the sweep also writes its 16 point runs, sweep.json/md and best/). The two are
timed interleaved, round after round, in this one process (median wall time), with the peak
resident memory sampled during each. Running the 16 points one by one is estimated from measured
single runs of 10 and 30 epochs: 8 × t(10) + 8 × t(30).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_eval import PeakRSS, machine_info
from benchmarks.timing import OtherLoad
from ltclip.recipes.resolve import stage_one_config
from ltclip.data.gaussian import gaussian_lt
from ltclip.stages.train_head import run_train_head
from ltclip.artifacts.store import write_arrays
from ltclip.sweep import run_sweep

FULL = {"classes": 100, "max_per_class": 500, "imbalance": 100, "dim": 512, "val_per_class": 20}
QUICK = {"classes": 20, "max_per_class": 100, "imbalance": 10, "dim": 64, "val_per_class": 10}
GRID = [("lr", [1e-3, 3e-3, 1e-2, 3e-2]), ("epochs", [10, 30]), ("loss", ["ce", "balanced_softmax"])]
BASE = {"head": "linear", "batch_size": 256, "device": "cpu"}


def write_features(folder: Path, size: dict) -> Path:
    c = size["classes"]
    counts = [round(size["max_per_class"] * size["imbalance"] ** (-i / (c - 1))) for i in range(c)]
    _, splits = gaussian_lt(0, counts, size["dim"], 1.5, {"val": size["val_per_class"]})
    folder.mkdir(parents=True)
    for split, (x, y) in splits.items():
        write_arrays(folder / f"{split}.h5", x, y, [f"class {i}" for i in range(c)], {"dataset": "gaussian", "split": split})
    return folder


def timed(fn) -> dict:
    with PeakRSS() as rss, OtherLoad() as load:
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": rss.peak_mib, "rss_start_mib": rss.start_mib, "other_cores": load.cores}


def run(size: dict, rounds: int) -> dict:
    results: dict[str, list] = {"sweep_16": [], "one_run_30": [], "one_run_10": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        features = write_features(tmp / "features", size)
        base = {**BASE, "features": str(features)}

        def one(epochs: int, name: str):
            values = {**base, "lr": 1e-2, "loss": "ce", "epochs": epochs, "out": str(tmp / name)}
            return lambda: run_train_head(stage_one_config(values))

        for r in range(rounds + 1):  # round 0 warms up (imports, first allocations) and is dropped
            for name, fn in (("sweep_16", lambda: run_sweep(base, GRID, "balanced_accuracy", tmp / f"sweep{r}")),
                             ("one_run_30", one(30, f"one30-{r}")), ("one_run_10", one(10, f"one10-{r}"))):
                stats = timed(fn)
                if r:
                    results[name].append(stats)
        record = json.loads((tmp / f"sweep{rounds}" / "sweep.json").read_text())
    summary = {name: {"median_wall_s": statistics.median(s["wall_s"] for s in runs),
                      "median_cpu_s": statistics.median(s["cpu_s"] for s in runs), "peak_rss_mib": max(s["peak_rss_mib"] for s in runs),
                      "extra_rss_mib": max(s["peak_rss_mib"] - s["rss_start_mib"] for s in runs), "rounds": runs}
               for name, runs in results.items()}
    one_by_one = 8 * summary["one_run_10"]["median_wall_s"] + 8 * summary["one_run_30"]["median_wall_s"]
    # The machine's speed drifts between rounds: the ratio within each round (measured back to back) is the steadier number.
    per_round = [s["wall_s"] / o["wall_s"] for s, o in zip(results["sweep_16"], results["one_run_30"])]
    return {"summary": summary, "ratio_sweep_vs_one_run": summary["sweep_16"]["median_wall_s"] / summary["one_run_30"]["median_wall_s"],
            "ratio_per_round": per_round, "median_ratio_per_round": statistics.median(per_round),
            "one_by_one_estimate_s": one_by_one, "groups": len(record["groups"]),
            "batched_points": sum(len(g["points"]) for g in record["groups"].values() if g["batched"]),
            "best": record["best"]}


def table(result: dict) -> str:
    s = result["summary"]
    rows = [("16-point sweep (one batched group)", s["sweep_16"]), ("one run, 30 epochs", s["one_run_30"]),
            ("one run, 10 epochs", s["one_run_10"])]
    lines = ["| what | wall time (median) | vs one 30-epoch run | CPU time (median) | peak RSS (above the start) |",
             "|---|---:|---:|---:|---:|"]
    for label, stats in rows:
        lines.append(f"| {label} | {stats['median_wall_s']:.2f} s | {stats['median_wall_s'] / s['one_run_30']['median_wall_s']:.2f}× "
                     f"| {stats['median_cpu_s']:.2f} s | {stats['peak_rss_mib']:.0f} MiB (+{stats['extra_rss_mib']:.1f}) |")
    est = result["one_by_one_estimate_s"]
    lines.append(f"| 16 points one by one (estimate: 8 × t10 + 8 × t30) | {est:.2f} s | "
                 f"{est / s['one_run_30']['median_wall_s']:.2f}× | – | – |")
    lines.append(f"\nsweep / one run within each round: median {result['median_ratio_per_round']:.2f}× "
                 f"({', '.join(f'{r:.2f}' for r in result['ratio_per_round'])})")
    others = max(r["other_cores"] for stats in s.values() for r in stats["rounds"])
    if others > 0.5:
        lines.append(f"\nwarning: other processes kept up to {others:.1f} cores busy during a measurement")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median reported), after one warm-up round")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for sweep.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = QUICK if args.quick else FULL
    result = run(size, args.rounds)
    report = {"size": size, "grid": GRID, "base": BASE, "rounds": args.rounds, "machine": machine_info(), **result}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.json").write_text(json.dumps(report, indent=2) + "\n")
    info = report["machine"]
    print(f"{info['cpu_model']}, {info['nproc']} cores, torch {info['torch']} ({info['torch_threads']} threads)\n")
    print(table(result))
    return report


if __name__ == "__main__":
    main()
