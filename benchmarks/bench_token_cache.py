"""Token-cache formats: size, extraction time, decoder epoch time and accuracy against float16 tokens.

Run as ``python -m benchmarks.bench_token_cache [--quick] [--out DIR]``; prints Markdown tables and
writes DIR/token_cache.json (default bench_out/).

The backbone is the toy CLIP of ``ltclip pretrain-toy`` (a tiny ViT, 17 tokens × 64, pretrained on
the CPU; trained here first if absent) on a long-tailed synthetic image set. Each format is
extracted by ``run_extract`` (timed), then the paper's decoder is trained on it through the engine
(``ltclip.engine.fit``, the same seed and settings for every format) and scored on the test split:
top-1 and balanced accuracy, and the fraction of test images whose prediction equals the float16
model's. Two more float16 seeds show the seed-to-seed spread, and a float16 run in the
block-shuffled order (train-head's ``--read-blocks``, :class:`~ltclip.data.samplers.BlockShuffledSampler`) shows what that
order costs in accuracy. The last table projects bytes per image and cache sizes for ViT-B/16 and
ViT-L/14 on ImageNet-LT, Places-LT and iNaturalist 2018 (arithmetic from each format's stored shape).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_eval import machine_info
from benchmarks.timing import StepTimer

FULL = {"classes": 20, "imbalance": 10, "max_per_class": 150, "val_per_class": 5, "test_per_class": 30, "epochs": 12,
        "batch_size": 64, "block_rows": 64, "pool_blocks": 4, "pca_sample": 512}
QUICK = {"classes": 10, "imbalance": 10, "max_per_class": 40, "val_per_class": 2, "test_per_class": 10, "epochs": 2,
         "batch_size": 32, "block_rows": 16, "pool_blocks": 2, "pca_sample": 64}
# name -> extract options (the ``--token-*`` fields of ExtractConfig)
FORMATS = {
    "float16 (reference)": {},
    "int8, scale per token": {"token_dtype": "int8"},
    "int8, scale per channel": {"token_dtype": "int8", "token_scale": "channel"},
    "fp8 (e4m3), scale per token": {"token_dtype": "fp8"},
    "pool 2×2": {"token_pool": 2},
    "PCA 32": {"token_pca": 32},
    "PCA 16": {"token_pca": 16},
    "pool 2×2 + int8": {"token_pool": 2, "token_dtype": "int8"},
    "pool 2×2 + PCA 16 + int8": {"token_pool": 2, "token_pca": 16, "token_dtype": "int8"},
}
# (tokens, width, patch grid, embed dim) of the reference models at 224 px; train-split sizes
MODELS = {"ViT-B/16": (197, 768, 14, 512), "ViT-L/14": (257, 1024, 16, 768)}
DATASETS = {"ImageNet-LT": 115_846, "Places-LT": 62_500, "iNaturalist 2018": 437_513}
PROJECTED = [("float16", {}), ("int8", {"dtype": "int8"}), ("fp8", {"dtype": "fp8"}), ("pool 2×2, int8", {"pool": 2, "dtype": "int8"}),
             ("PCA 256, int8", {"pca": 256, "dtype": "int8"}), ("pool 2×2, PCA 256, int8", {"pool": 2, "pca": 256, "dtype": "int8"})]


def bytes_per_image(fmt, seq: tuple[int, int], embed_dim: int) -> int:
    """Stored bytes of one image's row: float16 embedding, token values, float32 scales."""
    from ltclip.artifacts.store.tokens import STORED_DTYPES

    tokens, width = fmt.stored_shape(seq)
    scales = fmt.scale_shape(seq)
    return 2 * embed_dim + tokens * width * STORED_DTYPES[fmt.dtype].itemsize + (4 * scales[0] if scales else 0)


def projections() -> list[dict]:
    from ltclip.artifacts.store import TokenFormat

    rows = []
    for model, (tokens, width, grid, embed) in MODELS.items():
        for name, opts in PROJECTED:
            fmt = TokenFormat.from_options(**opts)
            per_image = bytes_per_image(fmt, (tokens, width), embed)
            rows.append({"model": model, "format": name, "stored_tokens": list(fmt.stored_shape((tokens, width))),
                         "bytes_per_image": per_image, **{d: per_image * n for d, n in DATASETS.items()}})
    return rows


def train_decoder(features: Path, s: dict, seed: int, block_order: bool = False) -> dict:
    """The decoder trained on ``features/train.h5`` through the engine; test accuracy and epoch times."""
    from ltclip.config import OptimConfig
    from ltclip.artifacts.feature_batches import FeatureInputs
    from ltclip.engine import RunEnv, fit
    from ltclip.methods.task import Task
    from ltclip.evaluation.metrics import average_views
    from ltclip.models.heads import HeadInputs, create_head
    from ltclip.artifacts.runs import RunModel
    from ltclip.stages.common import CacheSource, read_ahead
    from ltclip.artifacts.store import FeatureCache

    with FeatureCache(features / "train.h5") as train, FeatureCache(features / "test.h5") as test:
        counts = train.class_counts()
        torch.manual_seed(seed)
        head = create_head("decoder", HeadInputs(train.num_classes, train.embed_dim, train.token_shape))
        inputs = FeatureInputs(train, "tokens")
        blocks = (s["block_rows"], s["pool_blocks"]) if block_order else None  # train-head's --read-blocks/--shuffle-pool
        source = CacheSource(inputs, seed, read_ahead(blocks, s["batch_size"]))
        timer = StepTimer()
        cfg = OptimConfig(epochs=s["epochs"], batch_size=s["batch_size"], lr=1e-3, seed=seed, warmup=1.0)
        fit(head, Task("ce", {}, counts), source, cfg, num_classes=train.num_classes, env=RunEnv(progress=timer, block_order=blocks))
        logits = average_views(RunModel(head, class_counts=counts).predict(FeatureInputs(test, "tokens")))
        labels = test.labels
    pred = logits.argmax(1)
    per_class = [float((pred[labels == c] == c).mean()) for c in np.unique(labels)]
    return {"top1": float((pred == labels).mean() * 100), "balanced_accuracy": float(np.mean(per_class) * 100),
            "pred": pred, "epoch_s": float(np.median([e["wall_s"] for e in timer.epochs]))}


def run(s: dict, work: Path, toy_dir: Path) -> dict:
    from ltclip.artifacts.cache_info import describe_cache
    from ltclip.config import DataConfig, ExtractConfig
    from ltclip.data.synthetic import make_synthetic
    from ltclip.core.progress import Progress
    from ltclip.stages.extract import run_extract
    from ltclip.stages.toy_clip import pretrain_toy_clip

    toy = pretrain_toy_clip(toy_dir)
    checkpoint = str(toy_dir / "toy_clip.pt")
    root = work / "images"
    make_synthetic(root, classes=s["classes"], imbalance=s["imbalance"], max_per_class=s["max_per_class"],
                   val_per_class=s["val_per_class"], test_per_class=s["test_per_class"], size=32, seed=0)
    results = {}
    for name, opts in FORMATS.items():
        out = work / f"feat{len(results)}"
        cfg = ExtractConfig(out=str(out), data=DataConfig(dataset="synthetic", data_root=str(root)), model=toy["settings"]["model"],
                            pretrained=checkpoint, device="cpu", workers=0, batch_size=128,
                            **opts, **({"token_pca_sample": s["pca_sample"]} if "token_pca" in opts else {}))
        t0 = time.perf_counter()
        run_extract(cfg, Progress())
        extract_s = time.perf_counter() - t0
        train_file = next(f for f in describe_cache(out)["files"] if f["file"] == "train.h5")
        trained = train_decoder(out, s, seed=0)
        results[name] = {"options": opts, "extract_s": extract_s, "bytes_per_image": train_file["bytes_per_image"],
                         "train_rows": train_file["rows"], "stored_tokens": train_file["stored_tokens"], **trained,
                         "features": str(out)}
    ref = results["float16 (reference)"]
    for r in results.values():
        r["agreement"] = float((r.pop("pred") == ref["pred"]).mean() * 100) if r is not ref else 100.0
    ref.pop("pred")
    ref_dir = Path(ref["features"])
    seeds = {seed: train_decoder(ref_dir, s, seed) for seed in (1, 2)}
    block = train_decoder(ref_dir, s, seed=0, block_order=True)
    for r in (*seeds.values(), block):
        r.pop("pred")
    return {"toy_clip": {"model": toy["settings"]["model"], "steps": toy["steps"], "checkpoint_sha256": toy["checkpoint_sha256"]},
            "formats": results,
            "float16_other_seeds": seeds, "block_order": block, "projections": projections()}


def tables(report: dict) -> str:
    fmt = report["formats"]
    ref = fmt["float16 (reference)"]
    lines = ["| format | stored tokens | bytes / image | vs float16 | extract s | decoder epoch s | top-1 | balanced acc. "
             "| vs float16 (balanced) | same prediction as float16 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in fmt.items():
        lines.append(f"| {name} | {' × '.join(map(str, r['stored_tokens']))} | {r['bytes_per_image']:,} "
                     f"| {r['bytes_per_image'] / ref['bytes_per_image']:.2f} | {r['extract_s']:.1f} | {r['epoch_s']:.2f} "
                     f"| {r['top1']:.1f} | {r['balanced_accuracy']:.1f} | {r['balanced_accuracy'] / ref['balanced_accuracy']:.3f} "
                     f"| {r['agreement']:.1f}% |")
    spread = [ref["balanced_accuracy"]] + [r["balanced_accuracy"] for r in report["float16_other_seeds"].values()]
    b = report["block_order"]
    lines += ["", f"float16 decoder, seeds 0/1/2: balanced accuracy {' / '.join(f'{v:.1f}' for v in spread)} "
              f"(spread {max(spread) - min(spread):.1f} points).",
              f"Block-shuffled order (seed 0): top-1 {b['top1']:.1f}, balanced accuracy {b['balanced_accuracy']:.1f} "
              f"vs {ref['balanced_accuracy']:.1f} in the fully random order; epoch {b['epoch_s']:.2f} s vs {ref['epoch_s']:.2f} s.", ""]
    lines += ["| model | format | stored tokens | bytes / image | " + " | ".join(DATASETS) + " |",
              "|---|---|---|---:|" + "---:|" * len(DATASETS)]
    for p in report["projections"]:
        lines.append(f"| {p['model']} | {p['format']} | {' × '.join(map(str, p['stored_tokens']))} | {p['bytes_per_image']:,} | "
                     + " | ".join(f"{p[d] / 1e9:,.1f} GB" for d in DATASETS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a minute)")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for token_cache.json")
    parser.add_argument("--toy-clip", type=Path, default=None, help="folder of the toy CLIP (default: OUT/toy-clip)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger().setLevel(logging.ERROR)
    s = QUICK if args.quick else FULL
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_token_cache_", dir="/tmp") as tmp:
        results = run(s, Path(tmp), args.toy_clip or args.out / "toy-clip")
    report = {"size": s, "machine": machine_info(), "wall_s": time.perf_counter() - start, **results}
    for r in report["formats"].values():
        r.pop("features")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "token_cache.json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    print(f"{m['cpu_model']}, {m['nproc']} cores, torch {m['torch']}; {report['wall_s']:.0f} s in all; toy CLIP "
          f"{report['toy_clip']['model']} ({report['toy_clip']['steps']} steps)\n")
    print(tables(report))
    return report


if __name__ == "__main__":
    main()
