"""Head training speed and memory: cached features vs the frozen encoder every step; streamed caches.

Run as ``python -m benchmarks.bench_train_head [--quick] [--rounds N] [--out DIR]``; prints Markdown
tables and writes DIR/train_head.json (default bench_out/). Weights are random (``--pretrained
none``): speed does not depend on them.

1. **Decoder head** (``create_head("decoder")``: depth 3, 4 heads, MLP ratio 0.5) on the ViT token
   sequence, per epoch, two ways on the same synthetic images, batch size, sampler order and steps:

   - *cached*: ``run_train_head`` on the cache written once by ``run_extract``. The time is that of
     the stage's own epoch loop (``FeatureInputs.batches`` → float32 → head forward → loss →
     backward → AdamW → LR scheduler → ``loss.item()``), taken from the stage's progress callbacks;
     the stage's fixed costs outside the loop (checkpoint per epoch, run files, cache fingerprint)
     are left out; the whole call's wall time is in the JSON (``cached_stage_wall_s``). The train
     split only is extracted, so the stage runs no validation.
   - *encoder every step* (the paper's way): the same frozen open_clip model (same random weights)
     runs ``Backbone.encode(x, tokens=True)`` in ``torch.inference_mode()`` on every batch, then the
     same head, loss and optimizer step as the stage's loop. Images are decoded and preprocessed
     into one tensor in RAM beforehand, so the encoder forward is timed, not PNG decoding (which
     the paper's way would pay on top every epoch).

   Methods run interleaved, round after round (after one untimed warm-up step each); the median and
   the best epoch (wall time) are reported; process CPU times are in the JSON. The extraction's
   wall time (PNG decoding, model build and class text embeddings included) gives the break-even
   point: extraction / (encoder-every-step epoch − cached epoch).
2. The same for a **linear head** on the pooled embedding (cached ``embeds`` vs ``encode_image``
   every step).
3. **Streaming**: a synthetic token cache written with ``FeatureWriter`` (full: 20,000 × 197 × 128
   float16, 1 GB) is trained on for a fixed number of steps by ``run_train_head`` with
   ``max_ram`` = 1/4 of the cache (streamed) and without a cap (in RAM), each in its own process
   (started through a forking shell, so its ``ru_maxrss`` is its own, not this process's): peak
   RSS (psutil, every 5 ms), ``ru_maxrss`` and VmHWM, and steady-state batches/s. The reader alone
   (``FeatureInputs.batches`` without a model) is measured the same way, in the stage's order (the
   instance sampler's permutation) and in contiguous rows, next to a reference reader that is not
   the stage's (one ``os.preadv`` per row at the dataset's file offset). *Cold* runs drop the file
   from the page cache first (``posix_fadvise(DONTNEED)``), *warm* runs read it whole first; the
   file's page-cache residency (``mincore``) before each run and the bytes the process really read
   from the block device (``read_bytes`` in ``/proc/self/io``) are reported, so a page-cache-fed
   number cannot pass for a disk-fed one. The virtual disk's host may cache too; read_bytes only
   shows what this machine's kernel fetched from the device.

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
import contextlib
import ctypes
import json
import logging
import math
import mmap
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_eval import PeakRSS, machine_info
from ltclip.config import DataConfig, ExtractConfig, TrainHeadConfig
from ltclip.progress import Progress

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
    "stream": {"rows": 20_000, "tokens": 197, "width": 128, "embed_dim": 64, "classes": 100, "block_size": 1024,
               "batch_size": 64, "train_steps": 32, "reader_batches": 100, "skip_steps": 2, "ram_fraction": 0.25,
               "reader_runs": True},
}
QUICK = {
    "models": {BENCH_MODEL: {"train_images": 32}, TINY_MODEL: {"train_images": 128}},
    "classes": 16, "imbalance": 10.0, "batch_size": 32, "cached_epochs": 2, "rounds": 1,
    "stream": {"rows": 2_000, "tokens": 197, "width": 128, "embed_dim": 64, "classes": 100, "block_size": 256,
               "batch_size": 32, "train_steps": 5, "reader_batches": 20, "skip_steps": 2, "ram_fraction": 0.25,
               "reader_runs": False},
}
MiB = 2**20
VIT_B16_BATCH_BYTES = 256 * 197 * 768 * 2  # one batch of ViT-B/16 token sequences, float16


# ------------------------------------------------------------------ helpers


def register_bench_model(work: Path) -> Path:
    """Write BENCH_CONFIG as ``work/<name>.json`` and register it with open_clip."""
    import open_clip

    path = work / f"{BENCH_MODEL}.json"
    path.write_text(json.dumps(BENCH_CONFIG, indent=2))
    if BENCH_MODEL not in open_clip.list_models():
        open_clip.add_model_config(path)
    return path


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


def pick_max_per_class(classes: int, imbalance: float, target: int, batch: int) -> int:
    """``max_per_class`` whose long-tailed train split has about ``target`` images, preferring whole
    batches within 1/8 of the target."""
    from ltclip.data.synthetic import synthetic_train_counts

    def cost(m: int):
        n = sum(synthetic_train_counts(classes, imbalance, m))
        return (abs(n - target) > target / 8, n % batch != 0, abs(n - target))

    return min(range(1, 2 * target + 1), key=cost)


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


# ------------------------------------------------------------------ page cache and disk reads


def page_cache_fraction(path: Path) -> float | None:
    """Fraction of ``path``'s pages resident in this machine's page cache (``mincore``), or None."""
    size = path.stat().st_size
    if size == 0:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = os.sysconf("SC_PAGE_SIZE")
    pages = (size + page - 1) // page
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return None
        vec = (ctypes.c_ubyte * pages)()
        rc = libc.mincore(addr, size, vec)
        libc.munmap(addr, size)
        return None if rc != 0 else float((np.frombuffer(vec, np.uint8) & 1).mean())
    finally:
        os.close(fd)


def drop_page_cache(path: Path) -> None:
    """Write back and evict ``path`` from the page cache (cold reads follow)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_page_cache(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(16 * MiB):
            pass


def vm_hwm_mib() -> float | None:
    """The kernel's high-water mark of this process's resident memory (VmHWM), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def device_read_bytes() -> int | None:
    """Bytes this process has caused to be fetched from the block device so far."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


# ------------------------------------------------------------------ 1 + 2: cached vs encoder every step


def encoder_epoch(backbone, head, images, labels, order, batch, optimizer, scheduler, counts_t, tokens: bool,
                  epoch: int, epochs: int, max_steps: int | None = None) -> dict:
    """One epoch of the paper's way: frozen encoder forward on every batch, then the stage's step."""
    from ltclip.losses import compute_loss

    head.train()
    enc_s = head_s = 0.0
    steps = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, len(order), batch):
        if max_steps is not None and steps >= max_steps:
            break
        idx = order[start : start + batch]
        t1 = time.perf_counter()
        with torch.inference_mode():
            emb, tok = backbone.encode(images[idx], tokens=tokens)
        x = (tok if tokens else emb).clone()  # inference tensors cannot be saved for backward
        t2 = time.perf_counter()
        logits = head(x)
        loss = compute_loss("ce", logits, torch.from_numpy(labels[idx]), counts_t, epoch=epoch, total_epochs=epochs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss.item()
        enc_s += t2 - t1
        head_s += time.perf_counter() - t2
        steps += 1
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "encoder_s": enc_s,
            "head_s": head_s, "steps": steps}


def flop_prediction(visual, px: int, head, head_input: tuple) -> dict:
    from ltclip.models.heads import head_flops, vit_flops

    v = vit_flops(visual, px)
    h = head_flops(head, (1, *head_input))
    return {"vit_fwd_macs": int(v), "head_fwd_macs": int(h), "head_train_macs": int(3 * h),
            "predicted_ratio": (v + 3 * h) / (3 * h)}


def bench_model(name: str, size: dict, rounds: int, work: Path) -> dict:
    from ltclip.data.registry import load_dataset
    from ltclip.data.samplers import create_sampler
    from ltclip.data.synthetic import make_synthetic
    from ltclip.models.backbone import load_backbone
    from ltclip.models.heads import count_params, create_head
    from ltclip.stages.extract import run_extract
    from ltclip.stages.train_head import lr_factor, run_train_head
    from ltclip.store import FeatureCache

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

    counts_t = torch.as_tensor(counts, dtype=torch.float32)
    steps_per_epoch = math.ceil(n / batch)
    head_inputs = {"decoder": tuple(token_shape), "linear": (embed_dim,)}

    def new_head(kind: str):
        torch.manual_seed(0)  # the stage seeds the same way before building its head
        return create_head(kind, num_classes=classes, embed_dim=embed_dim, token_shape=token_shape)

    def encoder_way(kind: str):
        head = new_head(kind)
        opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps_per_epoch, 0, "cosine"))
        sampler = create_sampler("instance", labels, classes, seed=0, total_epochs=1)
        sampler.set_epoch(0)
        order = np.fromiter(iter(sampler), dtype=np.int64, count=len(sampler))
        return lambda max_steps=None: encoder_epoch(backbone, head, images, labels, order, batch, opt, sched, counts_t,
                                                    kind == "decoder", 0, 1, max_steps)

    def cached_way(kind: str, tag: str, steps: int | None = None):
        timer = StepTimer()
        cfg = TrainHeadConfig(features=str(features), out=str(work / f"run_{name}_{kind}_{tag}"), head=kind,
                              epochs=cached_epochs, steps=steps, batch_size=batch, device="cpu", seed=0)
        t = time.perf_counter()
        run_train_head(cfg, timer)
        return {"stage_wall_s": time.perf_counter() - t, "epochs": timer.epochs}

    results: dict = {}
    for kind in ("decoder", "linear"):  # warm-up: first-call allocations, untimed
        encoder_way(kind)(max_steps=1)
        cached_way(kind, "warmup", steps=1)
        results[kind] = {"cached_epochs": [], "cached_stage_wall_s": [], "encoder_epochs": []}
    for r in range(rounds):
        for kind in ("decoder", "linear"):
            c = cached_way(kind, f"r{r}")
            results[kind]["cached_epochs"] += c["epochs"]
            results[kind]["cached_stage_wall_s"].append(c["stage_wall_s"])
            results[kind]["encoder_epochs"].append(encoder_way(kind)())

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

    from ltclip.models.heads import create_head

    model = open_clip.create_model(REFERENCE_MODEL, pretrained=None)
    visual = model.visual
    px = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    tokens = (visual.grid_size[0] * visual.grid_size[1] + 1, visual.transformer.width)
    embed_dim = visual.output_dim
    rows = []
    for dataset, classes in REFERENCE_CLASSES.items():
        for kind, shape in (("decoder", tokens), ("linear", (embed_dim,))):
            head = create_head(kind, num_classes=classes, embed_dim=embed_dim, token_shape=tokens)
            rows.append({"model": REFERENCE_MODEL, "image_px": px, "token_shape": list(tokens), "head": kind,
                         "classes": classes, "dataset": dataset, **flop_prediction(visual, px, head, shape)})
    del model
    return rows


# ------------------------------------------------------------------ 3: streamed vs in-RAM


def write_stream_cache(path: Path, s: dict) -> dict:
    from ltclip.store import FeatureWriter

    rng = np.random.default_rng(0)
    rows, classes = s["rows"], s["classes"]
    labels = rng.permutation(np.arange(rows) % classes)
    writer = FeatureWriter.open(
        path, num_rows=rows, embed_dim=s["embed_dim"], block_size=s["block_size"],
        attrs={"dataset": "bench-stream", "model": "synthetic", "split": "train"}, labels=labels,
        classnames=[f"class {i}" for i in range(classes)], token_shape=(s["tokens"], s["width"]),
    )
    t = time.perf_counter()
    with writer:
        for block in writer.pending_blocks():
            lo, hi = writer.block_range(block)
            tokens = rng.standard_normal((hi - lo, s["tokens"], s["width"]), dtype=np.float32).astype(np.float16)
            embeds = rng.standard_normal((hi - lo, s["embed_dim"]), dtype=np.float32).astype(np.float16)
            writer.write_block(block, embeds, tokens)
        writer.finalise()
    return {"write_s": time.perf_counter() - t, "file_bytes": path.stat().st_size,
            "token_bytes": rows * s["tokens"] * s["width"] * 2}


def pread_batches(cache, order: np.ndarray, batch: int):
    """Reference reader, not the stage's: the same batches as a streamed ``FeatureInputs.batches``
    (same prefetch thread, float32 output), but each row read with one ``os.preadv`` straight from
    the contiguous dataset's file offset instead of one h5py read per row."""
    import h5py

    from ltclip.data.feature_batches import _prefetched

    with h5py.File(cache.path, "r") as f:
        ds = f["tokens"]
        offset, row_shape = ds.id.get_offset(), ds.shape[1:]
    row_bytes = int(np.prod(row_shape)) * 2
    fd = os.open(cache.path, os.O_RDONLY)

    def load(start: int):
        idx = order[start : start + batch]
        buf = np.empty((len(idx), *row_shape), np.float16)
        for i, row in enumerate(idx.tolist()):
            os.preadv(fd, [memoryview(buf[i]).cast("B")], offset + row * row_bytes)
        return torch.from_numpy(buf).float(), torch.from_numpy(cache.labels[idx]), idx

    try:
        yield from _prefetched(load, range(0, len(order), batch), 2)
    finally:
        os.close(fd)


def child_main(spec: dict) -> dict:
    """One streamed/in-RAM measurement in a fresh process (so RSS and ru_maxrss are its own)."""
    logging.getLogger().setLevel(logging.ERROR)
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    from ltclip.data.feature_batches import FeatureInputs
    from ltclip.data.samplers import create_sampler
    from ltclip.stages.train_head import run_train_head
    from ltclip.store import FeatureCache

    s, features = spec["stream"], Path(spec["features"])
    max_ram = spec["max_ram"]
    out: dict = {}
    io0 = device_read_bytes()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        if spec["what"] == "train":
            timer = StepTimer()
            cfg = TrainHeadConfig(features=str(features), out=spec["out"], head="decoder", epochs=1,
                                  steps=s["train_steps"], batch_size=s["batch_size"], device="cpu", seed=0,
                                  max_ram=None if max_ram is None else str(max_ram))
            info = run_train_head(cfg, timer)["info"]
            ends = timer.epochs[0]["step_ends_s"]
            skip = s["skip_steps"]
            out.update(in_ram=info["inputs_in_ram"], steps=len(ends), setup_s=timer.epochs[0]["start_s"],
                       steady_batches_per_s=(len(ends) - skip) / (ends[-1] - ends[skip - 1]),
                       first_steps_s=ends[:skip], epoch_cpu_s=timer.epochs[0]["cpu_s"])
        else:
            cache = FeatureCache(features / "train.h5")
            inputs = FeatureInputs(cache, "tokens", max_ram)
            setup = time.perf_counter() - t0
            k, batch = s["reader_batches"], s["batch_size"]
            if spec["order"] == "contiguous":
                start = int(np.random.default_rng(1).integers(0, cache.num_rows - k * batch + 1))
                order = np.arange(start, start + k * batch)
            else:  # the stage's order: the instance sampler's permutation
                sampler = create_sampler("instance", cache.labels, cache.num_classes, seed=0, total_epochs=1)
                sampler.set_epoch(0)
                order = np.fromiter(iter(sampler), dtype=np.int64, count=len(sampler))[: k * batch]
            marks = []
            tb = time.perf_counter()
            if spec["via"] == "pread":
                batches = pread_batches(cache, order, batch)
            else:
                batches = inputs.batches(order, batch, np.zeros(len(order), np.int64))
            for x, _, _ in batches:
                marks.append(time.perf_counter())
            skip = 1
            out.update(in_ram=inputs.in_ram and spec["via"] != "pread", batches=len(marks), setup_s=setup,
                       steady_batches_per_s=(len(marks) - skip) / (marks[-1] - marks[skip - 1]),
                       first_batch_s=marks[0] - tb, mib_per_s=(len(marks) - skip) * batch * inputs.nbytes
                       / cache.num_rows / (marks[-1] - marks[skip - 1]) / MiB)
            cache.close()
        out["wall_s"] = time.perf_counter() - t0
    io1 = device_read_bytes()
    out.update(rss_start_mib=mem.start_mib, peak_rss_mib=mem.peak_mib,
               ru_maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, vm_hwm_mib=vm_hwm_mib(),
               device_read_mib=None if io0 is None or io1 is None else (io1 - io0) / MiB)
    return out


def run_child(spec: dict) -> dict:
    repo = Path(__file__).resolve().parent.parent
    # Through a shell that forks: a child spawned straight from this (large) process would report
    # this process's peak as its own ru_maxrss (Linux carries the parent's high-water mark over exec).
    cmd = [sys.executable, "-m", "benchmarks.bench_train_head", "--child", json.dumps(spec)]
    proc = subprocess.run(["/bin/sh", "-c", '"$0" "$@"; exit $?', *cmd], cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {spec['label']} failed:\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def bench_stream(s: dict, work: Path, threads: int) -> dict:
    root = work / "stream"
    root.mkdir()
    path = root / "train.h5"
    free = shutil.disk_usage(work).free
    written = write_stream_cache(path, s)
    cap = int(written["token_bytes"] * s["ram_fraction"])
    runs = [
        # (label, what, cache state, order, max_ram, reader)
        ("reader, streamed, cold", "reader", "cold", "sampler", cap, "stage"),
        ("reader, streamed, cold, contiguous rows", "reader", "cold", "contiguous", cap, "stage"),
        ("reader, streamed, warm", "reader", "warm", "sampler", cap, "stage"),
        ("reader, in RAM", "reader", "warm", "sampler", None, "stage"),
        ("reference reader (os.preadv per row), cold", "reader", "cold", "sampler", cap, "pread"),
        ("reference reader (os.preadv per row), warm", "reader", "warm", "sampler", cap, "pread"),
        ("train, streamed, cold", "train", "cold", "sampler", cap, "stage"),
        ("train, streamed, warm", "train", "warm", "sampler", cap, "stage"),
        ("train, in RAM", "train", "warm", "sampler", None, "stage"),
    ]
    if not s["reader_runs"]:
        runs = [r for r in runs if r[1] != "reader"]
    results = {}
    for i, (label, what, state, order, max_ram, via) in enumerate(runs):
        (drop_page_cache if state == "cold" else warm_page_cache)(path)
        resident = page_cache_fraction(path)
        spec = {"label": label, "what": what, "order": order, "max_ram": max_ram, "via": via, "stream": s,
                "threads": threads,
                "features": str(root), "out": str(work / f"stream_run_{i}")}
        load = loadavg()
        with OtherLoad() as other:
            r = run_child(spec)
        results[label] = {**r, "what": what, "cache_state": state, "order": order, "max_ram": max_ram,
                          "page_cache_before": resident, "page_cache_after": page_cache_fraction(path),
                          "loadavg_before": load, "loadavg_after": loadavg(), "other_cores": other.cores}
    for label, r in results.items():
        r["vs_in_ram"] = r["steady_batches_per_s"] / results[f"{r['what']}, in RAM"]["steady_batches_per_s"]
    return {"free_bytes_before": free, **written, "max_ram": cap, "runs": results}


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


def stream_table(report: dict) -> str:
    st = report["stream"]
    rows = [
        "| run | inputs | file in page cache before | MiB read from device | steady batches/s (MiB/s) | vs in RAM "
        "| set-up s | peak RSS MiB (start) | ru_maxrss MiB (VmHWM) | cores busy with other work |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    for label, r in st["runs"].items():
        rate = f"{r['steady_batches_per_s']:.2f}"
        if r.get("mib_per_s") is not None:
            rate += f" ({r['mib_per_s']:,.0f})"
        rows.append(
            f"| {label} | {'in RAM' if r['in_ram'] else 'streamed'} | {fmt(r['page_cache_before'], '.0%')} "
            f"| {fmt(r['device_read_mib'], ',.0f')} | {rate} | {r['vs_in_ram']:.2f} "
            f"| {r['setup_s']:.1f} | {r['peak_rss_mib']:,.0f} ({r['rss_start_mib']:,.0f}) "
            f"| {r['ru_maxrss_mib']:,.0f} ({fmt(r['vm_hwm_mib'], ',.0f')}) | {r['other_cores']:.1f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (under a minute)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 3, quick: 1)")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for train_head.json")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print("RESULT " + json.dumps(child_main(json.loads(args.child))), flush=True)
        return {}
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
        t = time.perf_counter()
        stream = bench_stream(size["stream"], work, torch.get_num_threads())
        sections["streaming"] = time.perf_counter() - t
    machine = {**machine_info(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
               "tmp_free_gib_before": stream["free_bytes_before"] / 2**30}
    report = {"size": size, "rounds": rounds, "bench_model_config": BENCH_CONFIG, "machine": machine,
              "wall_s": time.perf_counter() - start, "sections_s": sections, "models": models, "reference": reference,
              "stream": stream}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_head.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{machine['cpu_model']}, {machine['nproc']} cores, torch {machine['torch']} ({torch.get_num_threads()} "
          f"threads); load average {load_before[0]:.1f} before, {machine['loadavg_after'][0]:.1f} after; "
          f"{machine['tmp_free_gib_before']:.0f} GiB free on /tmp; {report['wall_s']:.0f} s in all\n")
    print("Per epoch, median over epochs; the encoder-every-step column splits into encoder forward + head step:\n")
    print(speed_table(report))
    print("\nFLOP prediction, per image, forward multiply-accumulates; backward ≈ 2 × forward:\n")
    print(flop_table(report))
    st = stream
    print(f"\nDecoder on a {st['file_bytes'] / MiB:,.0f} MiB token cache ({size['stream']['rows']:,} × "
          f"{size['stream']['tokens']} × {size['stream']['width']} float16), streamed with max_ram "
          f"{st['max_ram'] / MiB:,.0f} MiB; batch {size['stream']['batch_size']}, {size['stream']['train_steps']} "
          f"train steps / {size['stream']['reader_batches']} reader batches, first {size['stream']['skip_steps']} "
          "train steps (1 reader batch) excluded from batches/s:\n")
    print(stream_table(report))
    batch_mib = VIT_B16_BATCH_BYTES / MiB
    rates = {label: r["mib_per_s"] / batch_mib for label, r in st["runs"].items() if r.get("mib_per_s")}
    if rates:
        print(f"\nAt these read rates one ViT-B/16 token batch (256 × 197 × 768 float16 = {batch_mib:.0f} MiB) "
              "arrives " + ", ".join(f"{v:.1f}/s ({k})" for k, v in rates.items()) + ".")
    busy = {k: v["other_cores"] for k, v in {**models, **st["runs"]}.items() if v["other_cores"] > 0.5}
    if busy:
        print("\nWARNING: other processes kept cores busy during: "
              + ", ".join(f"{k} ({v:.1f})" for k, v in busy.items())
              + f"; torch's {torch.get_num_threads()} intra-op threads slow down badly when the cores are "
              "oversubscribed, so those timings are distorted: rerun on a quiet machine (or with --threads 1).")
    return report


if __name__ == "__main__":
    main()
