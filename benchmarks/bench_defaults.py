"""Each head's default recipe against the best of a learning-rate × epochs grid around it.

Run as ``python -m benchmarks.bench_defaults [--classes N] [--heads linear,...] [--out DIR]``; prints a Markdown table and
writes DIR/defaults.json (default bench_out/).

Data. Long-tailed Gaussian features (``ltclip.data.gaussian``: unit-variance classes around means
on the sphere of radius ``SEPARATION``) with three class-count profiles, each cut to ``--classes``
evenly spaced ranks of its sorted counts (the profile's shape and its head and tail counts kept):

- ``places_lt``: the real Places-LT train counts (tests/fixtures/places_lt_train_counts.json).
- ``imagenet_lt`` and ``inat18``: their train files are not here, so a profile with the published
  number of classes, largest and smallest class and total (ImageNet-LT 1,000 / 1,280 / 5 / 115,846;
  iNaturalist 2018 8,142 / 1,000 / 2 / 437,513) and an assumed shape:
  ``n(r) = max · (min / max) ** ((r / (C - 1)) ** p)`` over ranks r, ``p`` solved so the counts sum
  to the total.

Val and test are balanced (``VAL_PER_CLASS``, ``TEST_PER_CLASS``). Features are "raw" (as drawn)
or "unit" (rows L2-normalised before they are written); the decoder reads ``TOKENS`` tokens of the
width, the first the class sample, the others noise. Every run goes through
``ltclip.recipes.resolve.stage_one_config`` (the option layering ``train-head`` uses) and
``run_train_head``, and is scored by ``RunModel.predict`` + ``ltclip.evaluation.metrics.evaluate`` on test.

Grid. For each head, loss (CE, Balanced Softmax), profile and width: the default (nothing but
``--head`` and ``--loss`` given; the lr and epochs it resolves to, for its loss and cache size, are
read back from the run's ``config.json``) on raw and on unit-norm features, and on raw features
(lr, epochs) at the default's (lr / 3, epochs), (3 lr, epochs) and (lr, 2 epochs) (``GRID``).
"Best" is the highest test balanced accuracy of these four (an optimistic reference: chosen on
test, not val).

``--scales`` measures the linear and MLP heads' logit scale instead (``SCALES``: none, 16 fixed, 16
learned, and 30 learned under SGD) on unit-norm features, with each head's AdamW defaults (no scale
at the unscaled head's lr) and with the papers' SGD step, lr 0.05; writes DIR/scales.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_eval import machine_info
from ltclip.recipes.resolve import stage_one_config
from ltclip.artifacts.feature_batches import FeatureInputs
from ltclip.data.gaussian import gaussian_lt
from ltclip.evaluation.metrics import average_views, evaluate
from ltclip.artifacts.runs import load_run
from ltclip.stages.train_head import run_train_head
from ltclip.artifacts.store import FeatureCache, write_arrays

PLACES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "places_lt_train_counts.json"
PUBLISHED = {"imagenet_lt": (1000, 1280, 5, 115_846), "inat18": (8142, 1000, 2, 437_513)}
SEPARATION, VAL_PER_CLASS, TEST_PER_CLASS, TOKENS = 4.2, 20, 50, 4
LOSSES = ("ce", "balanced_softmax")
GRID = ((1 / 3, 1), (3, 1), (1, 2))  # (lr, epochs) as multiples of the head's defaults, besides the default itself
# (head, widths): the MLP's hidden layer is as wide as its input, so it stops at 256 on 2 cores
PLAN = (("linear", (32, 768)), ("cosine", (32, 768)), ("mlp", (32, 256)), ("decoder", (32,)))


def published_profile(classes: int, largest: int, smallest: int, total: int) -> np.ndarray:
    """Counts from ``largest`` down to ``smallest`` summing to about ``total`` (the exponent by bisection)."""
    rank = np.arange(classes) / (classes - 1)

    def counts(p):
        return np.maximum(smallest, np.round(largest * (smallest / largest) ** (rank ** p))).astype(np.int64)

    lo, hi = 0.05, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if counts(mid).sum() > total else (mid, hi)
    return counts((lo + hi) / 2)


def profile(name: str, classes: int) -> np.ndarray:
    full = (np.asarray(json.loads(PLACES.read_text())["counts"]) if name == "places_lt"
            else published_profile(*PUBLISHED[name]))
    ordered = np.sort(full)[::-1]
    return ordered[np.linspace(0, len(ordered) - 1, classes).astype(int)]


def write_features(root: Path, counts: np.ndarray, dim: int, unit: bool, tokens: bool, seed: int = 0) -> Path:
    _, splits = gaussian_lt(seed, counts, dim, SEPARATION, {"val": VAL_PER_CLASS, "test": TEST_PER_CLASS})
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed + 1)
    for split, (x, y) in splits.items():
        if unit:
            x = x / np.linalg.norm(x, axis=1, keepdims=True)
        seq = None
        if tokens:
            seq = rng.standard_normal((len(y), TOKENS, dim)).astype(np.float32)
            seq[:, 0] = x
        write_arrays(root / f"{split}.h5", x, y, [f"class {i}" for i in range(len(counts))],
                     {"dataset": "gaussian", "split": split, "model": "gaussian"}, seq)
    return root


def test_balanced_accuracy(features: Path, out: Path, counts, values: dict) -> float:
    run_train_head(stage_one_config({"features": str(features), "out": str(out), "device": "cpu", **values}))
    run = load_run(out)
    with FeatureCache(features / "test.h5") as cache:
        logits = average_views(run.model.predict(FeatureInputs(cache, run.model.head.input)))
        return float(evaluate(logits, cache.labels, counts)["balanced_accuracy"])


def bench(root: Path, profiles: list[str], classes: int, heads: list[str]) -> list[dict]:
    rows, k = [], 0
    for name in profiles:
        counts = profile(name, classes)
        for head, widths in (p for p in PLAN if p[0] in heads):
            for dim in widths:
                raw = write_features(root / f"{name}-{head}-{dim}-raw", counts, dim, False, head == "decoder")
                unit = write_features(root / f"{name}-{head}-{dim}-unit", counts, dim, True, head == "decoder")
                for loss in LOSSES:
                    start = time.perf_counter()
                    row = {"profile": name, "classes": classes, "train_rows": int(counts.sum()), "head": head, "dim": dim,
                           "loss": loss, "grid": {}}
                    for kind, features in (("raw", raw), ("unit", unit)):
                        k += 1
                        row[f"default_{kind}"] = test_balanced_accuracy(features, root / f"r{k}", counts, {"head": head, "loss": loss})
                        if kind == "raw":  # the default as resolved for this loss and cache (what the run saved)
                            own = json.loads((root / f"r{k}" / "config.json").read_text())["optim"]
                            row.update(default_lr=own["lr"], default_epochs=own["epochs"])
                    row["grid"][f"{own['lr']:g}/{own['epochs']}"] = row["default_raw"]
                    for lr, epochs in GRID:
                        k += 1
                        lr, epochs = lr * own["lr"], epochs * own["epochs"]
                        row["grid"][f"{lr:g}/{epochs}"] = test_balanced_accuracy(
                            raw, root / f"r{k}", counts, {"head": head, "loss": loss, "lr": lr, "epochs": epochs})
                    best = max(row["grid"], key=row["grid"].get)
                    row.update(best=best, best_acc=row["grid"][best], gap=row["grid"][best] - row["default_raw"],
                               seconds=time.perf_counter() - start)
                    rows.append(row)
                    print(f"{name} {head} {dim} {loss}: default {row['default_raw']:.1f} (unit {row['default_unit']:.1f}), "
                          f"best {row['best_acc']:.1f} at lr/epochs {best} [{row['seconds']:.0f}s]", file=sys.stderr, flush=True)
    return rows


# The linear and MLP heads' logit scale (--scales): no scale at the unscaled head's lr (the scaled default's × UNSCALED_LR),
# a fixed and a learned scale of 16 at the defaults, and under the papers' SGD step a learned 30 besides
SCALE_PLAN = (("linear", (32, 768)), ("mlp", (32, 256)))
UNSCALED_LR = {"linear": {"ce": 16, "balanced_softmax": 16}, "mlp": {"ce": 8, "balanced_softmax": 4}}
SCALES = {"none": ("scale=0",), "16 fixed": ("scale=16", "learn_scale=false"), "16 learned": ("scale=16",),
          "30 learned": ("scale=30",)}
OPTIMIZERS = {"adamw": {}, "sgd 0.05": {"optimizer": "sgd", "lr": 0.05}}


def bench_scales(root: Path, profiles: list[str], classes: int) -> list[dict]:
    """Balanced accuracy of each (profile, head, width, loss, optimizer) under each logit scale, unit-norm features."""
    rows, k = [], 0
    for name in profiles:
        counts = profile(name, classes)
        for head, widths in SCALE_PLAN:
            for dim in widths:
                unit = write_features(root / f"scales-{name}-{head}-{dim}", counts, dim, True, False)
                for loss in LOSSES:
                    for optimizer, values in OPTIMIZERS.items():
                        row = {"profile": name, "head": head, "dim": dim, "loss": loss, "optimizer": optimizer}
                        for scale, opts in SCALES.items():
                            if scale == "30 learned" and optimizer == "adamw":
                                continue
                            given = {"head": head, "loss": loss, "head_opts": opts, **values}
                            if scale == "none" and optimizer == "adamw":
                                given["lr"] = stage_one_config({"features": "f", "out": "o", **given}).optim.lr * UNSCALED_LR[head][loss]
                            k += 1
                            row[scale] = test_balanced_accuracy(unit, root / f"s{k}", counts, given)
                        rows.append(row)
                        print(" ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()), file=sys.stderr, flush=True)
    return rows


def scale_table(rows: list[dict]) -> str:
    lines = [f"| profile | head | width | loss | optimizer | {' | '.join(SCALES)} |", "|---|---|---:|---|---|" + "---:|" * len(SCALES)]
    for r in rows:
        cells = " | ".join(f"{r[s]:.1f}" if s in r else "" for s in SCALES)
        lines.append(f"| {r['profile']} | {r['head']} | {r['dim']} | {r['loss']} | {r['optimizer']} | {cells} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = ["| profile (classes, rows) | head | width | loss | default lr / epochs | default, raw | default, unit-norm | best of grid (lr / epochs) | gap |",
             "|---|---|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['profile']} ({r['classes']}, {r['train_rows']:,}) | {r['head']} | {r['dim']} | {r['loss']} | "
                     f"{r['default_lr']:g} / {r['default_epochs']} | {r['default_raw']:.1f} | {r['default_unit']:.1f} | "
                     f"{r['best_acc']:.1f} ({r['best']}) | {r['gap']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=40, help="evenly spaced ranks kept of each profile")
    parser.add_argument("--profiles", default="places_lt,imagenet_lt,inat18")
    parser.add_argument("--heads", default=",".join(h for h, _ in PLAN), help="heads to measure (default: all)")
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--scales", action="store_true", help="compare the linear and MLP heads' logit scales instead")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.scales:
        with tempfile.TemporaryDirectory() as tmp:
            rows = bench_scales(Path(tmp), args.profiles.split(","), args.classes)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "scales.json").write_text(json.dumps({"machine": machine_info(), "rows": rows, "wall_s": time.perf_counter() - start}, indent=2) + "\n")
        print(scale_table(rows))
        return {"rows": rows}
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench(Path(tmp), args.profiles.split(","), args.classes, args.heads.split(","))
    info = machine_info()
    report = {"machine": info, "rows": rows, "wall_s": time.perf_counter() - start,
              "setup": {"separation": SEPARATION, "val_per_class": VAL_PER_CLASS, "test_per_class": TEST_PER_CLASS,
                        "tokens": TOKENS, "classes": args.classes, "plan": PLAN}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "defaults.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{info['cpu_model']}, {info['nproc']} cores, torch 1 thread; {report['wall_s']:.0f} s in all\n")
    print(table(rows))
    within = sum(r["gap"] <= 2.0 for r in rows)
    print(f"\nDefault within 2 points of the grid's best: {within} of {len(rows)} (head, loss, profile, width) cells.")
    return report


if __name__ == "__main__":
    main()
