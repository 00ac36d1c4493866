"""Method comparison on synthetic long-tailed Gaussian features with a known Bayes-optimal accuracy.

Run as ``python -m benchmarks.bench_learning [--quick] [--seeds N] [--out DIR]``; prints a Markdown
table and writes DIR/learning.json (default bench_out/). ``--tune`` instead reruns the one-off
learning-rate / epoch sweep that fixed the settings below (validation accuracy only, on a seed
that the comparison does not use) and writes DIR/learning_tune.json.

Data. The training class counts are the real Places-LT profile (``Places_LT_train.txt`` in
``../shared/data_manifests``: 365 classes, 4,980 … 5 images per class, 62,500 in all); ``--quick``
keeps 100 classes spanning that profile. Each class is an isotropic unit-variance Gaussian in
``DIM`` dimensions around a mean drawn uniformly on the sphere of radius ``SEPARATION``; val and
test are balanced (``VAL_PER_CLASS`` / ``TEST_PER_CLASS`` per class). The features go through
``ltclip.artifacts.store.write_arrays`` (float16, as ``ltclip extract`` writes them) and every method is
trained by the real stage function ``run_train_head`` and scored by ``RunModel.predict`` +
``ltclip.evaluation.metrics.evaluate``, exactly as ``ltclip train-head`` / ``ltclip eval`` would.

Bayes optimum. With shared isotropic covariance and a balanced test set, the rule of highest
balanced accuracy is the nearest true mean. It is evaluated on the test set itself (the paired
reference the gaps are measured against) and, for a precise value, by Monte Carlo on
``BAYES_PER_CLASS`` fresh samples per class, with its standard error.

Settings (chosen once with ``--tune``, then kept for every row): stage 1 is a linear head on the
raw features (``normalize=false``), AdamW, lr ``STAGE1["lr"]``, weight decay 1e-4, batch 256,
``STAGE1["epochs"]`` epochs, cosine decay, the epoch of best validation balanced accuracy kept;
second stages (cRT, LWS, DisAlign, MARC) train ``STAGE2["epochs"]`` epochs with SGD at lr
``STAGE2["lr"]`` (the library's recipe: momentum 0.9, cosine, best validation epoch kept);
tau-norm and post-hoc logit adjustment choose τ on val. LDAM is the exception the method itself
defines: a cosine head with a fixed scale of 1 (its logits are cosines; the loss scales by s=30),
margins up to 0.5, and DRW from 80% of the epochs.
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
from ltclip.config import SecondStageConfig, TrainHeadConfig, from_flat
from ltclip.artifacts.feature_batches import FeatureInputs
from ltclip.data.gaussian import gaussian_lt, nearest_mean_logits
from ltclip.evaluation.metrics import average_views, evaluate, shot_groups
from ltclip.evaluation.retrieval import class_means, ncm_logits
from ltclip.artifacts.runs import load_run
from ltclip.methods.second_stage import TWO_STAGE
from ltclip.stages.second_stage import run_second_stage
from ltclip.stages.train_head import run_train_head
from ltclip.artifacts.store import FeatureCache, write_arrays

MANIFEST = Path(__file__).resolve().parents[1].parent / "shared" / "data_manifests" / "Places_LT_train.txt"
NUM_CLASSES = 365
QUICK_CLASSES = 100
DIM, SEPARATION = 32, 4.2  # Bayes-optimal balanced accuracy ≈ 81% for the 365-class profile
VAL_PER_CLASS, TEST_PER_CLASS, BAYES_PER_CLASS = 20, 100, 1000
SEEDS, TUNE_SEED = (0, 1), 100
METRICS = ("many", "medium", "few", "top1", "balanced_accuracy")

# Chosen by `--tune` (see `tune`): the best of its grids on the validation split of seed TUNE_SEED.
STAGE1 = {"head": "linear", "head_opts": ("normalize=false",), "optimizer": "adamw", "lr": 1e-2,
          "weight_decay": 1e-4, "batch_size": 256, "epochs": 20, "schedule": "cosine"}
STAGE2 = {"epochs": 10, "lr": 0.03, "batch_size": 256, "weight_decay": 1e-4}
LDAM_HEAD = {"head": "cosine", "head_opts": ("init_scale=1", "learn_scale=false")}

# (row, what run_train_head gets on top of STAGE1); the first row is the CE run the second stages use.
STAGE1_ROWS = [
    ("CE", {"loss": "ce"}),
    ("Focal (γ=2)", {"loss": "focal"}),
    ("CBW (1/n weights)", {"loss": "cbw"}),
    ("CB, effective number (β=0.9999)", {"loss": "cb"}),
    ("GRW (exponent 1.2)", {"loss": "grw", "loss_opts": ("exponent=1.2",)}),
    ("Balanced Softmax", {"loss": "balanced_softmax"}),
    ("Logit-adjusted loss (τ=1)", {"loss": "logit_adjusted"}),
    ("LDAM + DRW (cosine head)", {"loss": "ldam", **LDAM_HEAD}),  # drw_epoch added from the epochs
    ("LADE (α=0.1)", {"loss": "lade"}),
    ("CE + class-balanced sampler", {"loss": "ce", "sampler": "class-balanced"}),
    ("CE + square-root sampler", {"loss": "ce", "sampler": "sqrt"}),
    ("CE + progressive sampler", {"loss": "ce", "sampler": "progressive"}),
]
STAGE2_ROWS = [
    ("CE → cRT", {"two_stage": "crt"}),
    ("CE → LWS", {"two_stage": "lws"}),
    ("CE → tau-norm (τ on val)", {"two_stage": "tau-norm"}),
    ("CE → DisAlign", {"two_stage": "disalign"}),
    ("CE → MARC", {"two_stage": "marc"}),
    ("CE → NCM", {"two_stage": "ncm"}),
    ("CE → post-hoc logit adjustment (τ on val)", {"posthoc_la": True}),
]
NCM_CHECK = "NCM via ltclip.evaluation.retrieval (cross-check)"
BAYES = "Bayes optimum (nearest true mean)"


# ---------------------------------------------------------------- data
def places_counts(manifest: Path, classes: int) -> np.ndarray:
    """Per-class train counts of Places-LT, largest first; ``classes`` < 365 keeps evenly spaced ranks."""
    labels = np.loadtxt(manifest, dtype=str, usecols=1).astype(np.int64)
    counts = np.sort(np.bincount(labels, minlength=NUM_CLASSES))[::-1]
    return counts if classes >= len(counts) else counts[np.linspace(0, len(counts) - 1, classes).astype(int)]


def gaussian_splits(seed: int, counts: np.ndarray) -> tuple[np.ndarray, dict]:
    """Class means on the sphere of radius SEPARATION and (x float32, y) for train / val / test / bayes."""
    return gaussian_lt(seed, counts, DIM, SEPARATION, {"val": VAL_PER_CLASS, "test": TEST_PER_CLASS, "bayes": BAYES_PER_CLASS})


def write_cache(path: Path, x: np.ndarray, y: np.ndarray, num_classes: int) -> None:
    write_arrays(path, x, y, [f"class {i}" for i in range(num_classes)],
                 {"dataset": "gaussian-places-lt", "split": path.stem, "model": "gaussian"})


def bayes_optimum(means: np.ndarray, x: np.ndarray, y: np.ndarray, counts: np.ndarray) -> dict:
    """Balanced accuracy of the nearest true mean, with its Monte Carlo standard error (points)."""
    m = evaluate(nearest_mean_logits(x, means), y, counts)
    p = np.asarray(m["per_class"]) / 100
    n = np.asarray(m["per_class_count"])
    se = 100 * np.sqrt((p * (1 - p) / n).sum()) / len(p)
    return {**{k: m[k] for k in METRICS}, "se": float(se), "per_class_samples": int(n[0])}


# ---------------------------------------------------------------- runs
def score_on_test(run_dir: Path, features: Path, counts: np.ndarray) -> dict:
    run = load_run(run_dir)
    with FeatureCache(features / "test.h5") as cache:
        logits = average_views(run.model.predict(FeatureInputs(cache, run.model.head.input)))
        m = evaluate(logits, cache.labels, counts)
    return {**{k: m[k] for k in METRICS}, "pred": logits.argmax(1)}


def stage1_config(features: Path, out: Path, seed: int, stage1: dict, extra: dict) -> TrainHeadConfig:
    kw = {**stage1, **extra}
    if kw["loss"] == "ldam":
        kw["loss_opts"] = (f"drw_epoch={int(0.8 * kw['epochs'])}",)
    return from_flat(TrainHeadConfig, {"features": str(features), "out": str(out), "device": "cpu", "seed": seed, **kw},
                     owner="bench_learning")


def stage2_config(out: Path, ce_run: Path, seed: int, stage2: dict, extra: dict) -> SecondStageConfig:
    """A second stage's config; methods that train nothing (tau-norm, NCM, post-hoc LA) take no training options."""
    trains = extra.get("two_stage") is not None and TWO_STAGE.get(extra["two_stage"]).trains
    training = {"seed": seed, **stage2} if trains else {}
    return from_flat(SecondStageConfig, {"out": str(out), "from_run": str(ce_run), "device": "cpu", **training, **extra},
                     owner="bench_learning")


def prepare_features(root: Path, seed: int, counts: np.ndarray) -> tuple[Path, np.ndarray, dict]:
    means, splits = gaussian_splits(seed, counts)
    features = root / f"seed{seed}" / "features"
    features.mkdir(parents=True)
    for split in ("train", "val", "test"):
        write_cache(features / f"{split}.h5", *splits[split], len(counts))
    return features, means, splits


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_seed(root: Path, seed: int, counts: np.ndarray) -> dict:
    """Every row for one seed: test metrics, gap to the paired Bayes optimum, seconds."""
    features, means, splits = prepare_features(root, seed, counts)
    with FeatureCache(features / "test.h5") as cache:  # the float16 features every method sees
        x_test, y_test = cache.load_embeds()[:, 0].astype(np.float32), cache.labels
    bayes_test = bayes_optimum(means, x_test, y_test, counts)
    bayes_mc = bayes_optimum(means, *splits["bayes"], counts)
    rows: dict[str, dict] = {}

    def record(name: str, metrics: dict, seconds: float) -> None:
        metrics.pop("pred", None)
        rows[name] = {**metrics, "gap": bayes_test["balanced_accuracy"] - metrics["balanced_accuracy"], "seconds": seconds}
        log(f"seed {seed} | {name}: balanced acc {metrics['balanced_accuracy']:.1f}% "
            f"(few {metrics['few']:.1f}) in {seconds:.1f}s")

    runs = root / f"seed{seed}" / "runs"
    for i, (name, extra) in enumerate(STAGE1_ROWS):
        start = time.perf_counter()
        run_train_head(stage1_config(features, runs / f"s1_{i}", seed, STAGE1, extra))
        record(name, score_on_test(runs / f"s1_{i}", features, counts), time.perf_counter() - start)
    ce_run = runs / "s1_0"
    ncm_pred = None
    for i, (name, extra) in enumerate(STAGE2_ROWS):
        start = time.perf_counter()
        run_second_stage(stage2_config(runs / f"s2_{i}", ce_run, seed, STAGE2, extra))
        metrics = score_on_test(runs / f"s2_{i}", features, counts)
        if extra.get("two_stage") == "ncm":
            ncm_pred = metrics["pred"]
        record(name, metrics, time.perf_counter() - start)

    start = time.perf_counter()
    with FeatureCache(features / "train.h5") as cache:
        means_hat = class_means(cache.load_embeds()[:, 0], cache.labels, len(counts))
    logits = ncm_logits(x_test, means_hat)
    check = evaluate(logits, y_test, counts)
    record(NCM_CHECK, {k: check[k] for k in METRICS}, time.perf_counter() - start)
    rows[NCM_CHECK]["same_predictions_as_stage2_ncm"] = float((logits.argmax(1) == ncm_pred).mean())
    return {"seed": seed, "bayes_test": bayes_test, "bayes_mc": bayes_mc, "rows": rows}


# ---------------------------------------------------------------- aggregation and table
def aggregate(per_seed: list[dict]) -> dict:
    """Mean and half range (max − min) / 2 over seeds of every metric of every row."""
    names = list(per_seed[0]["rows"])
    out = {}
    for name in names + [BAYES]:
        out[name] = {}
        for key in (*METRICS, "gap", "seconds"):
            if name == BAYES:
                if key in ("gap", "seconds"):
                    continue
                values = np.array([s["bayes_test"][key] for s in per_seed], float)
            else:
                values = np.array([s["rows"][name][key] for s in per_seed], float)
            out[name][key] = {"mean": float(values.mean()), "spread": float((values.max() - values.min()) / 2)}
    return out


def cell(stat: dict, seeds: int, signed: bool = False) -> str:
    value = f"{stat['mean']:+.1f}" if signed else f"{stat['mean']:.1f}"
    return value if seeds == 1 else f"{value} ± {stat['spread']:.1f}"


def table(agg: dict, seeds: int) -> str:
    lines = [
        "| method | many | medium | few | all (top-1) | balanced acc. | gap to Bayes (points) | s / seed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, stats in agg.items():
        if name == BAYES:
            continue
        cells = [cell(stats[k], seeds) for k in METRICS]
        lines.append(f"| {name} | {' | '.join(cells)} | {cell(stats['gap'], seeds)} | {stats['seconds']['mean']:.1f} |")
    b = agg[BAYES]
    lines.append(f"| **{BAYES}** | {' | '.join(cell(b[k], seeds) for k in METRICS)} | 0 | |")
    return "\n".join(lines)


# ---------------------------------------------------------------- one-off sweep
TUNE_STAGE1 = [(lr, epochs) for epochs in (10, 20) for lr in (3e-3, 1e-2, 3e-2, 1e-1)]
TUNE_STAGE2 = (0.01, 0.03, 0.1, 0.3)


def val_score(run_dir: Path) -> float:
    return json.loads((run_dir / "run.json").read_text())["best"]["val_balanced_accuracy"]


def tune(root: Path, counts: np.ndarray) -> dict:
    """Stage 1: (lr, epochs) maximising CE + Balanced Softmax val balanced accuracy; stage 2: the lr
    maximising the summed val balanced accuracy of cRT, LWS, DisAlign and MARC on that CE run."""
    features, _, _ = prepare_features(root, TUNE_SEED, counts)
    s1 = []
    for i, (lr, epochs) in enumerate(TUNE_STAGE1):
        cfg = {**STAGE1, "lr": lr, "epochs": epochs}
        scores = {}
        for loss in ("ce", "balanced_softmax"):
            out = root / "tune" / f"s1_{i}_{loss}"
            run_train_head(stage1_config(features, out, TUNE_SEED, cfg, {"loss": loss}))
            scores[loss] = val_score(out)
        s1.append({"lr": lr, "epochs": epochs, **scores, "sum": sum(scores.values())})
        log(f"tune stage 1 lr={lr:g} epochs={epochs}: {scores}")
    best1 = max(s1, key=lambda r: r["sum"])
    ce_run = root / "tune" / f"s1_{s1.index(best1)}_ce"
    s2 = []
    for j, lr in enumerate(TUNE_STAGE2):
        scores = {}
        for method in ("crt", "lws", "disalign", "marc"):
            out = root / "tune" / f"s2_{j}_{method}"
            run_second_stage(stage2_config(out, ce_run, TUNE_SEED, {**STAGE2, "lr": lr}, {"two_stage": method}))
            scores[method] = val_score(out)
        s2.append({"lr": lr, "epochs": STAGE2["epochs"], **scores, "sum": sum(scores.values())})
        log(f"tune stage 2 lr={lr:g}: {scores}")
    return {"seed": TUNE_SEED, "stage1": s1, "stage2": s2, "stage1_choice": best1,
            "stage2_choice": max(s2, key=lambda r: r["sum"])}


def tune_table(result: dict) -> str:
    lines = ["| stage 1 lr | epochs | CE val bal. acc. | Balanced Softmax val bal. acc. |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['lr']:g} | {r['epochs']} | {r['ce']:.1f} | {r['balanced_softmax']:.1f} |" for r in result["stage1"]]
    lines += ["", "| stage 2 lr | cRT | LWS | DisAlign | MARC |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['lr']:g} | {r['crt']:.1f} | {r['lws']:.1f} | {r['disalign']:.1f} | {r['marc']:.1f} |" for r in result["stage2"]]
    return "\n".join(lines)


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    torch.set_num_threads(1)  # tiny ops: a second thread only adds synchronisation
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_CLASSES} classes spanning the profile, one seed")
    parser.add_argument("--seeds", type=int, default=None, help=f"data + training seeds (default {len(SEEDS)}, --quick 1)")
    parser.add_argument("--manifest", type=Path, default=MANIFEST, help="Places-LT train split file (class profile)")
    parser.add_argument("--tune", action="store_true", help="rerun the one-off lr/epoch sweep instead (val only)")
    parser.add_argument("--keep", type=Path, default=None, help="keep caches and runs in this (new) folder")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for learning.json")
    args = parser.parse_args(argv)
    if not args.manifest.is_file():
        parser.error(f"--manifest {args.manifest}: not found (the Places-LT split files live in ../shared/data_manifests)")
    counts = places_counts(args.manifest, QUICK_CLASSES if args.quick else NUM_CLASSES)
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else len(SEEDS))))
    groups = shot_groups(counts)
    setup = {
        "classes": len(counts), "train_rows": int(counts.sum()), "max_count": int(counts.max()), "min_count": int(counts.min()),
        "shot_classes": {g: int((groups == g).sum()) for g in ("many", "medium", "few")},
        "dim": DIM, "separation": SEPARATION, "val_per_class": VAL_PER_CLASS, "test_per_class": TEST_PER_CLASS,
        "bayes_mc_per_class": BAYES_PER_CLASS, "seeds": seeds, "stage1": STAGE1, "stage2": STAGE2, "ldam_head": LDAM_HEAD,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        if args.tune:
            result = tune(root, counts)
            report = {"setup": setup, "machine": info, "tune": result, "wall_s": time.perf_counter() - start}
            (args.out / "learning_tune.json").write_text(json.dumps(report, indent=2) + "\n")
            print(tune_table(result))
            return report
        per_seed = [run_seed(root, seed, counts) for seed in seeds]
    agg = aggregate(per_seed)
    bayes_mc = {k: float(np.mean([s["bayes_mc"][k] for s in per_seed])) for k in ("balanced_accuracy", "se")}
    report = {"setup": setup, "machine": info, "per_seed": per_seed, "aggregate": agg, "bayes_mc": bayes_mc,
              "wall_s": time.perf_counter() - start}
    (args.out / "learning.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{info['cpu_model']}, {info['nproc']} cores, torch {info['torch']} ({info['torch_threads']} thread); "
          f"{len(seeds)} seed(s), {report['wall_s']:.0f} s in all\n")
    print(f"{len(counts)} classes (Places-LT profile, {counts.max()}…{counts.min()} per class, "
          f"{setup['shot_classes']['many']}/{setup['shot_classes']['medium']}/{setup['shot_classes']['few']} "
          f"many/medium/few), dim {DIM}, separation {SEPARATION}; balanced test, {TEST_PER_CLASS} per class.")
    print(f"Bayes-optimal balanced accuracy: {bayes_mc['balanced_accuracy']:.2f}% ± {bayes_mc['se']:.2f} (s.e., "
          f"Monte Carlo, {BAYES_PER_CLASS} per class); on the test set "
          f"{agg[BAYES]['balanced_accuracy']['mean']:.2f}% (the gaps' reference).\n")
    print(table(agg, len(seeds)))
    check = [s["rows"][NCM_CHECK]["same_predictions_as_stage2_ncm"] for s in per_seed]
    print(f"\nNCM cross-check: ltclip.evaluation.retrieval and the second-stage NCM agree on {100 * min(check):.2f}% of test predictions.")
    return report


if __name__ == "__main__":
    main()
