"""Extraction speed: the raw model forward vs the `ltclip extract` pipeline, with and without decoding.

Run as ``python -m benchmarks.bench_extract [--quick] [--repeats N] [--out DIR]``; prints Markdown
tables and writes DIR/extract.json (default bench_out/). For each model, on the same images:

- ``decode``: PNG decode + the model's preprocessing in this process (no forward), with torch's
  default intra-op threads and with one thread (what a DataLoader worker uses);
- ``forward``: ``Backbone.encode(tokens=True)`` on the pre-decoded tensors in memory, same batches;
- ``extract, pre-decoded``: the extract stage's split loop (DataLoader, fp16 conversion, block
  buffering, HDF5 writes with a flush + fsync per block) fed the same in-memory tensors;
- ``extract, PNG, workers 0 / 2``: the same loop decoding the synthetic PNGs;
- ``run_extract``: the whole stage (model build, the split, class text embeddings).

Methods run interleaved, round after round; the table gives the median and best time and the
median over rounds of forward time / method time (a paired ratio, robust to load that changes
between rounds). Weights are random (``--pretrained none``): speed does not depend on them. Peak
RSS is this process's, sampled every 5 ms (DataLoader workers are not included).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np
import torch

from benchmarks.bench_eval import PeakRSS, machine_info
from ltclip.config import DataConfig, ExtractConfig
from ltclip.data.registry import load_dataset
from ltclip.data.synthetic import make_synthetic
from ltclip.core.distributed import DistContext
from ltclip.models.backbone import load_backbone, register_tiny_configs
from ltclip.core.progress import Progress
from ltclip.stages.extract import _extract_split, run_extract

# A CPU-feasible ViT whose compute dominates: 8×8 patches + CLS, width 256, 6 blocks.
BENCH_MODEL = "ltclip-bench-vit-w256"
BENCH_CONFIG = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 128, "layers": 6, "width": 256, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}
# images per model (the synthetic test split); batch and block sizes are `ltclip extract`'s defaults
FULL = {"images": {"ltclip-tiny-vit-64": 2048, BENCH_MODEL: 512}, "classes": 16, "batch_size": 256, "block_size": 1024}
QUICK = {"images": {"ltclip-tiny-vit-64": 256, BENCH_MODEL: 64}, "classes": 16, "batch_size": 64, "block_size": 96}
SPLIT = "test"


def register_bench_model() -> None:
    """Register BENCH_CONFIG with open_clip (it reads the file once, so a temporary one will do)."""
    import open_clip

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{BENCH_MODEL}.json"
        path.write_text(json.dumps(BENCH_CONFIG))
        open_clip.add_model_config(path)


def interleaved(methods: dict[str, Callable[[], object]], repeats: int, after: Callable[[str, object], None]) -> dict:
    """Run every method once per round for ``repeats`` rounds: times, median, best and peak RSS per
    method. ``after(name, result)`` runs untimed after each call."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    peak: dict[str, float] = {}
    extra: dict[str, float] = {}
    for _ in range(repeats):
        for name, fn in methods.items():
            with PeakRSS() as mem:
                start = time.perf_counter()
                result = fn()
                times[name].append(time.perf_counter() - start)
            peak[name] = max(peak.get(name, 0.0), mem.peak_mib)
            extra[name] = max(extra.get(name, 0.0), mem.peak_mib - mem.start_mib)
            after(name, result)
    return {
        name: {"median_s": statistics.median(t), "best_s": min(t), "times_s": t, "peak_rss_mib": peak[name],
               "extra_rss_mib": extra[name]}
        for name, t in times.items()
    }


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def forward(backbone, images: torch.Tensor, batch_size: int) -> np.ndarray:
    """The raw model forward over ``images`` in batches; returns the embeddings as float16."""
    embeds = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            emb, _ = backbone.encode(images[start : start + batch_size], tokens=True)
            embeds.append(emb)
    return torch.cat(embeds).numpy().astype(np.float16)


def stored_bytes(path: Path) -> dict:
    """Per output dataset: shape, bytes on disk per row, and the theoretical float16 bytes per row."""
    out = {}
    with h5py.File(path, "r") as h5:
        n = h5["embeds"].shape[0]
        for name in ("embeds", "tokens"):
            ds = h5[name]
            out[name] = {
                "shape_per_image": list(ds.shape[1:]),
                "bytes_per_image": ds.id.get_storage_size() / n,
                "theoretical_bytes": int(np.prod(ds.shape[1:])) * 2,
            }
    st = path.stat()
    out["file"] = {"bytes_per_image": st.st_size / n, "allocated_bytes_per_image": st.st_blocks * 512 / n}
    return out


def bench_model(name: str, size: dict, repeats: int, work: Path) -> dict:
    """Every method for one model; see the module docstring."""
    n, batch = size["images"][name], size["batch_size"]
    backbone = load_backbone(name, "none")
    px = backbone.preprocess_cfg["size"]
    px = px[0] if isinstance(px, (tuple, list)) else px
    root = work / f"synthetic_{px}px"
    make_synthetic(root, classes=size["classes"], imbalance=1.0, max_per_class=1, val_per_class=1,
                   test_per_class=n // size["classes"], size=px, seed=0, workers=2)
    dataset = load_dataset("synthetic", root)
    n = len(dataset.split(SPLIT))

    def decode() -> torch.Tensor:
        return torch.stack([backbone.preprocess(dataset.open_image(SPLIT, i)) for i in range(n)])

    def decode_one_thread() -> torch.Tensor:
        with torch_threads(1):
            return decode()

    images = decode()
    in_memory = dataclasses.replace(dataset, open_image=lambda split, i: images[i])
    as_is = dataclasses.replace(backbone, preprocess=lambda x: x)  # the views pass the tensors through
    cfg = ExtractConfig(data=DataConfig(dataset="synthetic", data_root=str(root)), out="", splits=(SPLIT,), model=name,
                        pretrained="none", tokens=True, batch_size=batch, workers=0, device="cpu",
                        block_size=size["block_size"])

    def split_loop(data, model, workers: int) -> Callable[[], Path]:
        def run() -> Path:
            out = Path(tempfile.mkdtemp(dir=work))
            _extract_split(dataclasses.replace(cfg, workers=workers), data, SPLIT, model, torch.device("cpu"),
                           DistContext(), out, Progress())
            return out / f"{SPLIT}.h5"

        return run

    def whole_stage() -> Path:
        out = Path(tempfile.mkdtemp(dir=work))
        run_extract(dataclasses.replace(cfg, out=str(out)))
        return out / f"{SPLIT}.h5"

    methods = {
        "decode": decode,
        "decode, 1 torch thread": decode_one_thread,
        "forward": lambda: forward(backbone, images, batch),
        "extract, pre-decoded": split_loop(in_memory, as_is, 0),
        "extract, PNG, workers 0": split_loop(dataset, backbone, 0),
        "extract, PNG, workers 2": split_loop(dataset, backbone, 2),
        "run_extract, workers 0": whole_stage,
    }
    last: dict[str, object] = {}

    def keep_last(method: str, result) -> None:
        old = last.get(method)
        if isinstance(old, Path):
            shutil.rmtree(old.parent)
        last[method] = result

    forward(backbone, images[:batch], batch)  # warm-up: first-call allocations
    results = interleaved(methods, repeats, keep_last)
    reference = last["forward"].astype(np.float32)
    base = results["forward"]
    for method, r in results.items():
        r["images_per_s"], r["images_per_s_best"] = n / r["median_s"], n / r["best_s"]
        # paired: each round's forward against the same round's method, then the median over rounds
        r["vs_forward"] = statistics.median(f / t for f, t in zip(base["times_s"], r["times_s"]))
        if isinstance(last[method], Path):
            with h5py.File(last[method], "r") as h5:
                r["max_abs_diff_vs_forward"] = float(np.abs(h5["embeds"][()].astype(np.float32) - reference).max())
    return {
        "images": n,
        "image_px": px,
        "parameters_visual": sum(p.numel() for p in backbone.visual.parameters()),
        "results": results,
        "bytes": stored_bytes(last["extract, PNG, workers 0"]),
    }


def speed_table(report: dict) -> str:
    rows = [
        "| model | images | method | median s | images/s (median) | images/s (best) | vs forward (paired) "
        "| peak RSS MiB (+) | max abs diff vs forward |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, m in report["models"].items():
        for method, r in m["results"].items():
            diff = r.get("max_abs_diff_vs_forward")
            rows.append(
                f"| {model} ({m['image_px']} px) | {m['images']:,} | {method} | {r['median_s']:.2f} "
                f"| {r['images_per_s']:,.0f} "
                f"| {r['images_per_s_best']:,.0f} | {r['vs_forward']:.2f} "
                f"| {r['peak_rss_mib']:.0f} (+{r['extra_rss_mib']:.0f}) "
                f"| {'' if diff is None else f'{diff:.1e}'} |"
            )
    return "\n".join(rows)


def bytes_table(report: dict) -> str:
    rows = [
        "| model | output | per image | stored B/image | theoretical B/image | whole file B/image (allocated) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for model, m in report["models"].items():
        b = m["bytes"]
        for name in ("embeds", "tokens"):
            shape = " × ".join(map(str, b[name]["shape_per_image"]))
            rows.append(
                f"| {model} | {name} | {shape} fp16 | {b[name]['bytes_per_image']:,.0f} "
                f"| {b[name]['theoretical_bytes']:,} | {b['file']['bytes_per_image']:,.0f} "
                f"({b['file']['allocated_bytes_per_image']:,.0f}) |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per method (median reported)")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for extract.json")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    logging.getLogger().setLevel(logging.ERROR)  # random-weights warnings, once per model build
    register_tiny_configs()
    register_bench_model()
    load_before = os.getloadavg()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        models = {name: bench_model(name, size, args.repeats, Path(tmp)) for name in size["images"]}
    machine = {**machine_info(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    report = {"size": size, "repeats": args.repeats, "machine": machine, "wall_s": time.perf_counter() - start,
              "models": models}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "extract.json").write_text(json.dumps(report, indent=2) + "\n")
    load = f"load average {load_before[0]:.1f} before, {machine['loadavg_after'][0]:.1f} after"
    print(f"{machine['cpu_model']}, {machine['nproc']} cores, torch {machine['torch']} "
          f"({machine['torch_threads']} threads); {load}\n")
    print(speed_table(report))
    print()
    print(bytes_table(report))
    return report


if __name__ == "__main__":
    main()
