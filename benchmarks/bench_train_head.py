"""Head training speed: cached features vs the frozen encoder every step, both through the engine.

Run as ``python -m benchmarks.bench_train_head [--quick] [--rounds N] [--out DIR]``; prints Markdown
tables and writes DIR/train_head.json (default bench_out/). Weights are random (``--pretrained
none``): speed does not depend on them. Streaming a cache larger than memory is measured by
``benchmarks.bench_streaming``.

1. **Decoder head** (``create_head("decoder")``: depth 3, 4 heads, MLP ratio 0.5) on the ViT token
   sequence, per epoch, two ways on the same synthetic images, batch size, sampler order and steps.
   Both train through the one training loop, ``ltclip.engine.fit``, and both are timed the same
   way: the wall/CPU time of the engine's epoch loop (its ``epoch`` progress task: batches →
   forward → loss → backward → AdamW → LR schedule step; step losses stay on the device, checked
   for NaN every 25 steps), taken from the progress callbacks. The fixed costs outside that loop
   (the epoch's loss record, checkpoints, run files, cache fingerprint) are left out.

   - *cached*: ``run_train_head`` on the cache written once by ``run_extract``; its batches come
     from ``FeatureInputs.batches`` (float32). The whole call's wall time is in the JSON
     (``cached_stage_wall_s``). The train split only is extracted, so the stage runs no validation.
   - *encoder every step* (the paper's way): ``fit`` with the cached run's ``OptimConfig`` (optimizer,
     schedule, batch size, seed; one epoch) and sampler; the model is the same frozen open_clip
     model (same random weights, kept in eval mode, its parameters frozen) running
     ``Backbone.encode(x, tokens=True)`` under ``torch.no_grad()`` on every batch, followed by the
     same head; the training source yields batches of images decoded and preprocessed into one
     tensor in RAM beforehand, so the encoder forward is timed, not PNG decoding (which the paper's
     way would pay on top every epoch). The epoch splits into the encoder's forward (timed around
     ``encode`` inside the model) + the rest of the loop ("head": head step, batch indexing, the
     engine's bookkeeping).

   Methods run interleaved, round after round (after one untimed warm-up step each), the cached way
   for ``cached_epochs`` epochs per round and the encoder way for one; the median and the best
   epoch (wall time) are reported; process CPU times are in the JSON. The extraction's wall time
   (PNG decoding, model build and class text embeddings included) gives the break-even point:
   extraction / (encoder-every-step epoch − cached epoch).
2. The same for a **linear head** on the pooled embedding (cached ``embeds`` vs
   ``Backbone.encode(x)``, i.e. ``encode_image``, every step).

FLOP prediction of the ratio "encoder every step / cached", per image (MACs, ``ltclip.models.heads``)::

    ratio = (V + 3·H) / (3·H)

where ``V = vit_flops(visual, px)`` is the frozen encoder's forward (no backward: it is frozen and
nothing upstream needs its gradients), ``H = head_flops(head, [1, ...])`` the head's forward and
``3·H`` its forward + backward (backward ≈ 2 × forward: gradients for activations and for weights).
Data loading, optimizer, normalisation and activation costs are left out of both.

Timings need a quiet machine: torch's intra-op threads (one per core) slow down badly when other
processes keep the cores busy. The tables show how many cores other processes kept busy during
each measurement (from /proc/stat) and warn when it exceeds 0.5; ``--threads 1`` is the fallback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_eval import machine_info
from benchmarks.timing import OtherLoad, StepTimer, median
from ltclip.config import DataConfig, ExtractConfig, TrainHeadConfig, from_flat

# A CPU-feasible ViT whose encoder dominates a step, as ViT-B/16's does: 128 px, 16 px patches
# (64 patches + CLS), width 384, 8 blocks (6 heads of 64).
BENCH_MODEL = "ltclip-bench-vit-w384"
BENCH_CONFIG = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 128, "layers": 8, "width": 384, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}
TINY_MODEL = "ltclip-tiny-vit-64"
REFERENCE_MODEL = "ViT-B-16"  # FLOP prediction only (built without weights)
REFERENCE_CLASSES = {"ImageNet-LT": 1000, "iNaturalist 2018": 8142}

# ``train_images``: target size of the synthetic train split (long-tailed, imbalance 10, 16 classes).
FULL = {
    "models": {BENCH_MODEL: {"train_images": 512}, TINY_MODEL: {"train_images": 1024}},
    "classes": 16, "imbalance": 10.0, "batch_size": 64, "cached_epochs": 2, "rounds": 3,
}
QUICK = {
    "models": {BENCH_MODEL: {"train_images": 32}, TINY_MODEL: {"train_images": 128}},
    "classes": 16, "imbalance": 10.0, "batch_size": 32, "cached_epochs": 2, "rounds": 1,
}


# ------------------------------------------------------------------ helpers


def register_bench_model(work: Path) -> Path:
    """Write BENCH_CONFIG as ``work/<name>.json`` and register it with open_clip."""
    import open_clip

    path = work / f"{BENCH_MODEL}.json"
    path.write_text(json.dumps(BENCH_CONFIG, indent=2))
    if BENCH_MODEL not in open_clip.list_models():
        open_clip.add_model_config(path)
    return path


def pick_max_per_class(classes: int, imbalance: float, target: int, batch: int) -> int:
    """``max_per_class`` whose long-tailed train split has about ``target`` images, preferring whole
    batches within 1/8 of the target."""
    from ltclip.data.synthetic import synthetic_train_counts

    def cost(m: int):
        n = sum(synthetic_train_counts(classes, imbalance, m))
        return (abs(n - target) > target / 8, n % batch != 0, abs(n - target))

    return min(range(1, 2 * target + 1), key=cost)


# ------------------------------------------------------------------ the paper's way, as the engine's model and source


class FrozenEncoderHead(torch.nn.Module):
    """The frozen encoder on every batch (no autograd graph, always in eval mode), then the head.

    Only the head's parameters require gradients (``load_backbone`` freezes the encoder), so only
    they reach the engine's optimizer. ``encoder_s`` sums the encoder's forward time.
    """

    def __init__(self, backbone, head: torch.nn.Module, tokens: bool):
        super().__init__()
        self.encoder, self.head, self.tokens = backbone.model, head, tokens
        self._encode = backbone.encode  # runs self.encoder
        self.encoder_s = 0.0

    def train(self, mode: bool = True) -> "FrozenEncoderHead":
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        with torch.no_grad():
            embeds, tokens = self._encode(images, tokens=self.tokens)
        self.encoder_s += time.perf_counter() - t
        return self.head(tokens if self.tokens else embeds)


class ImageSource:
    """The engine's training rows for the paper's way: images preprocessed into RAM beforehand."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray):
        self.images, self.labels = images, labels
        self._labels = torch.from_numpy(np.asarray(labels))

    def batches(self, order, batch_size, epoch, positions):
        for start in range(0, len(order), batch_size):
            idx = torch.from_numpy(order[start : start + batch_size])
            yield self.images[idx], self._labels[idx]


# ------------------------------------------------------------------ 1 + 2: cached vs encoder every step


def flop_prediction(visual, px: int, head, head_input: tuple) -> dict:
    from ltclip.models.cost import head_flops, vit_flops

    v = vit_flops(visual, px)
    h = head_flops(head, (1, *head_input))
    return {"vit_fwd_macs": int(v), "head_fwd_macs": int(h), "head_train_macs": int(3 * h),
            "predicted_ratio": (v + 3 * h) / (3 * h)}



def bench_model(name: str, size: dict, rounds: int, work: Path) -> dict:
    from ltclip.data.registry import load_dataset
    from ltclip.data.synthetic import make_synthetic
    from ltclip.engine import RunEnv, fit
    from ltclip.methods.task import Task
    from ltclip.methods.losses import LOSSES
    from ltclip.models.backbone import load_backbone
    from ltclip.models.cost import count_params
    from ltclip.models.heads import HeadInputs, create_head
    from ltclip.stages.extract import run_extract
    from ltclip.stages.train_head import run_train_head
    from ltclip.artifacts.store import FeatureCache

    batch, classes, cached_epochs = size["batch_size"], size["classes"], size["cached_epochs"]
    backbone = load_backbone(name, "none")
    px = backbone.preprocess_cfg["size"]
    px = px[0] if isinstance(px, (tuple, list)) else px
    root = work / f"synthetic_{name}"
    max_per_class = pick_max_per_class(classes, size["imbalance"], size["models"][name]["train_images"], batch)
    make_synthetic(root, classes=classes, imbalance=size["imbalance"], max_per_class=max_per_class, val_per_class=1,
                   test_per_class=1, size=px, seed=0, workers=2)

    features = work / f"features_{name}"
    ecfg = ExtractConfig(data=DataConfig(dataset="synthetic", data_root=str(root)), out=str(features),
                         splits=("train",), model=name, pretrained="none", tokens=True, batch_size=batch, workers=0,
                         device="cpu")
    t = time.perf_counter()
    run_extract(ecfg)
    extract_s = time.perf_counter() - t

    dataset = load_dataset("synthetic", root)
    n = len(dataset.split("train"))
    t = time.perf_counter()
    images = torch.stack([backbone.preprocess(dataset.open_image("train", i)) for i in range(n)])
    decode_s = time.perf_counter() - t
    with FeatureCache(features / "train.h5") as cache:
        labels = cache.labels
        assert np.array_equal(labels, dataset.split("train").labels)
        token_shape, embed_dim = cache.token_shape, cache.embed_dim
        counts = cache.class_counts()
        check = np.arange(min(batch, n))
        cached_tokens = cache.read_tokens(check)[:, 0].astype(np.float32)
    with torch.inference_mode():
        _, fresh = backbone.encode(images[check], tokens=True)
    token_diff = float(np.abs(fresh.numpy() - cached_tokens).max())
    token_scale = float(np.abs(cached_tokens).max())

    steps_per_epoch = math.ceil(n / batch)
    head_inputs = {"decoder": tuple(token_shape), "linear": (embed_dim,)}
    source = ImageSource(images, labels)

    def head_config(kind: str, tag: str, steps: int | None = None) -> TrainHeadConfig:
        return from_flat(TrainHeadConfig, {
            "features": str(features), "out": str(work / f"run_{name}_{kind}_{tag}"), "head": kind,
            "epochs": cached_epochs, "steps": steps, "batch_size": batch, "device": "cpu", "seed": 0,
        }, owner="bench_train_head")

    def new_head(kind: str, seed: int = 0):
        torch.manual_seed(seed)  # the stage seeds the same way before building its head
        return create_head(kind, HeadInputs(classes, embed_dim, token_shape))

    def encoder_way(kind: str, steps: int | None = None) -> dict:
        """One epoch (or ``steps``) of the paper's way, trained by the engine as the cached run is."""
        cfg = head_config(kind, "encoder")  # the cached run's settings; never run itself
        method, optim = cfg.method, cfg.optim
        model = FrozenEncoderHead(backbone, new_head(kind, optim.seed), tokens=kind == "decoder")
        timer = StepTimer()
        fit(model, Task(method.loss, LOSSES.parse(method.loss, method.loss_opts), counts), source,
            dataclasses.replace(optim, epochs=1, steps=steps), sampler=method.sampler, num_classes=classes,
            env=RunEnv(device="cpu", progress=timer))
        (epoch,) = timer.epochs
        return {**epoch, "encoder_s": model.encoder_s, "head_s": epoch["wall_s"] - model.encoder_s}

    def cached_way(kind: str, tag: str, steps: int | None = None) -> dict:
        timer = StepTimer()
        t = time.perf_counter()
        run_train_head(head_config(kind, tag, steps), timer)
        return {"stage_wall_s": time.perf_counter() - t, "epochs": timer.epochs}

    results: dict = {}
    for kind in ("decoder", "linear"):  # warm-up: first-call allocations, untimed
        encoder_way(kind, steps=1)
        cached_way(kind, "warmup", steps=1)
        results[kind] = {"cached_epochs": [], "cached_stage_wall_s": [], "encoder_epochs": []}
    for r in range(rounds):
        for kind in ("decoder", "linear"):
            c = cached_way(kind, f"r{r}")
            results[kind]["cached_epochs"] += c["epochs"]
            results[kind]["cached_stage_wall_s"].append(c["stage_wall_s"])
            results[kind]["encoder_epochs"].append(encoder_way(kind))

    for kind, res in results.items():
        head = new_head(kind)
        ce, ee = res["cached_epochs"], res["encoder_epochs"]
        res.update({
            "head_params": count_params(head),
            "cached_wall_s": median([e["wall_s"] for e in ce]),
            "cached_best_s": min(e["wall_s"] for e in ce),
            "encoder_best_s": min(e["wall_s"] for e in ee),
            "cached_cpu_s": median([e["cpu_s"] for e in ce]),
            "encoder_wall_s": median([e["wall_s"] for e in ee]),
            "encoder_cpu_s": median([e["cpu_s"] for e in ee]),
            "encoder_forward_s": median([e["encoder_s"] for e in ee]),
            "encoder_head_s": median([e["head_s"] for e in ee]),
            "flops": flop_prediction(backbone.visual, px, head, head_inputs[kind]),
        })
        res["measured_ratio_wall"] = res["encoder_wall_s"] / res["cached_wall_s"]
        res["measured_ratio_cpu"] = res["encoder_cpu_s"] / res["cached_cpu_s"]
        res["measured_ratio_best"] = res["encoder_best_s"] / res["cached_best_s"]
        saved = res["encoder_wall_s"] - res["cached_wall_s"]
        res["break_even_epochs"] = extract_s / saved if saved > 0 else None
        f = res["flops"]
        res["achieved_gflops"] = {
            "encoder_forward": 2 * f["vit_fwd_macs"] * n / res["encoder_forward_s"] / 1e9,
            "head_train_cached": 2 * f["head_train_macs"] * n / res["cached_wall_s"] / 1e9,
        }
    return {
        "image_px": px, "train_images": n, "classes": classes, "max_per_class": max_per_class, "batch_size": batch,
        "steps_per_epoch": steps_per_epoch, "token_shape": list(token_shape), "embed_dim": embed_dim,
        "visual_params": count_params(backbone.visual), "extract_s": extract_s, "decode_s": decode_s,
        "cached_vs_encoder_tokens_max_abs_diff": token_diff, "tokens_max_abs": token_scale, "heads": results,
    }


def reference_prediction() -> list[dict]:
    """ViT-B/16 at 224 px (random weights; only shapes matter) with the decoder and a linear head."""
    import open_clip

    from ltclip.models.heads import HeadInputs, create_head

    model = open_clip.create_model(REFERENCE_MODEL, pretrained=None)
    visual = model.visual
    px = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    tokens = (visual.grid_size[0] * visual.grid_size[1] + 1, visual.transformer.width)
    embed_dim = visual.output_dim
    rows = []
    for dataset, classes in REFERENCE_CLASSES.items():
        for kind, shape in (("decoder", tokens), ("linear", (embed_dim,))):
            head = create_head(kind, HeadInputs(classes, embed_dim, tokens))
            rows.append({"model": REFERENCE_MODEL, "image_px": px, "token_shape": list(tokens), "head": kind,
                         "classes": classes, "dataset": dataset, **flop_prediction(visual, px, head, shape)})
    del model
    return rows


# ------------------------------------------------------------------ report


def speed_table(report: dict) -> str:
    rows = [
        "| model (px; tokens × width) | head | train images / batch / steps | cached s/epoch: median (best) "
        "| encoder every step s/epoch: median (best) [encoder + head] | measured ratio: median (best) "
        "| FLOP-predicted ratio | extract once s (break-even epochs) | cores busy with other work |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, m in report["models"].items():
        for kind, r in m["heads"].items():
            be = r["break_even_epochs"]
            rows.append(
                f"| {model} ({m['image_px']}; {' × '.join(map(str, m['token_shape']))}) | {kind} "
                f"| {m['train_images']} / {m['batch_size']} / {m['steps_per_epoch']} "
                f"| {r['cached_wall_s']:.3f} ({r['cached_best_s']:.3f}) "
                f"| {r['encoder_wall_s']:.2f} ({r['encoder_best_s']:.2f}) "
                f"[{r['encoder_forward_s']:.2f} + {r['encoder_head_s']:.3f}] "
                f"| {r['measured_ratio_wall']:.1f} ({r['measured_ratio_best']:.1f}) "
                f"| {r['flops']['predicted_ratio']:.1f} "
                f"| {m['extract_s']:.1f} ({'–' if be is None else f'{be:.1f}'}) | {m['other_cores']:.1f} |"
            )
    return "\n".join(rows)


def flop_table(report: dict) -> str:
    rows = [
        "| model | px | tokens × width | head | classes | V: encoder fwd GMAC/img | H: head fwd MMAC/img "
        "| 3H: head train MMAC/img | predicted ratio (V + 3H) / 3H |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    entries = [
        {"model": model, "image_px": m["image_px"], "token_shape": m["token_shape"], "head": kind,
         "classes": m["classes"], **r["flops"]}
        for model, m in report["models"].items() for kind, r in m["heads"].items()
    ] + report["reference"]
    for e in entries:
        rows.append(
            f"| {e['model']} | {e['image_px']} | {' × '.join(map(str, e['token_shape']))} | {e['head']} "
            f"| {e['classes']:,} "
            f"| {e['vit_fwd_macs'] / 1e9:.3f} | {e['head_fwd_macs'] / 1e6:.3f} | {e['head_train_macs'] / 1e6:.3f} "
            f"| {e['predicted_ratio']:,.1f} |"
        )
    return "\n".join(rows)



def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (under a minute)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 3, quick: 1)")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for train_head.json")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's, one per core)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = QUICK if args.quick else FULL
    rounds = args.rounds or size["rounds"]
    logging.getLogger().setLevel(logging.ERROR)  # random-weights warnings, once per model build
    from ltclip.models.backbone import register_tiny_configs

    register_tiny_configs()
    load_before = os.getloadavg()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_train_head_", dir="/tmp") as tmp:
        work = Path(tmp)
        register_bench_model(work)
        sections, models = {}, {}
        for name in size["models"]:
            t = time.perf_counter()
            with OtherLoad() as other:
                models[name] = bench_model(name, size, rounds, work)
            models[name]["other_cores"] = other.cores
            sections[name] = time.perf_counter() - t
        t = time.perf_counter()
        reference = reference_prediction()
        sections["reference FLOPs"] = time.perf_counter() - t
    machine = {**machine_info(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    report = {"size": size, "rounds": rounds, "bench_model_config": BENCH_CONFIG, "machine": machine,
              "wall_s": time.perf_counter() - start, "sections_s": sections, "models": models, "reference": reference}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_head.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{machine['cpu_model']}, {machine['nproc']} cores, torch {machine['torch']} ({torch.get_num_threads()} "
          f"threads); load average {load_before[0]:.1f} before, {machine['loadavg_after'][0]:.1f} after; "
          f"{report['wall_s']:.0f} s in all\n")
    print("Per epoch, median over epochs; the encoder-every-step column splits into encoder forward + the rest "
          "(head step and loop):\n")
    print(speed_table(report))
    print("\nFLOP prediction, per image, forward multiply-accumulates; backward ≈ 2 × forward:\n")
    print(flop_table(report))
    busy = {k: v["other_cores"] for k, v in models.items() if v["other_cores"] > 0.5}
    if busy:
        print("\nWARNING: other processes kept cores busy during: "
              + ", ".join(f"{k} ({v:.1f})" for k, v in busy.items())
              + f"; torch's {torch.get_num_threads()} intra-op threads slow down badly when the cores are "
              "oversubscribed, so those timings are distorted: rerun on a quiet machine (or with --threads 1).")
    return report


if __name__ == "__main__":
    main()
