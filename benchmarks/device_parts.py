"""The measurements of :mod:`benchmarks.device_check`, one function per part: each appends rows
(``row``) and notes to the lists it is given, on ``device``, at the sizes ``size`` names."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_eval import PeakRSS, machine_info
from benchmarks.bench_finetune import Classes
from benchmarks.bench_train_head import FrozenEncoderHead, ImageSource
from benchmarks.timing import StepTimer, median
from ltclip.core.progress import Progress

TUNE_MODES = ("frozen", "adaptformer", "lora", "vpt-deep", "full")
MiB = 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Yields a dict whose ``mib`` is, after the block, its peak: CUDA allocations or the process's RSS."""
    box: dict = {}
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield box
        sync(device)
        box["mib"] = torch.cuda.max_memory_allocated(device) / MiB
    else:
        with PeakRSS() as mem:
            yield box
        box["mib"] = mem.peak_mib


def image_px(backbone) -> int:
    px = backbone.preprocess_cfg["size"]
    return px[0] if isinstance(px, (tuple, list)) else px


def unless_out_of_memory(notes: list, label: str, measure):
    """``measure()``, or None and a note when the device runs out of memory."""
    try:
        return measure()
    except torch.cuda.OutOfMemoryError:
        notes.append(f"{label}: out of device memory; skipped")
        torch.cuda.empty_cache()
        return None


def user_precision(device: torch.device) -> str:
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def device_info(device: torch.device) -> dict:
    """Where the numbers come from: the machine (:func:`machine_info`), then the CUDA version (not
    machine_info's GPU name under the same key), the date and, on CUDA, the card."""
    info = {**machine_info(), "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": str(device), "cuda": torch.version.cuda, "cpu_count": os.cpu_count(), "loadavg": os.getloadavg()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=props.total_memory / 2**30,
                    capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
    return info


def row(part: str, case: str, method: str, value: float, unit: str, peak_mib=None, relative: str = "", **extra) -> dict:
    return {"part": part, "case": case, "method": method, "value": value, "unit": unit, "peak_mib": peak_mib,
            "relative": relative, **extra}


# ------------------------------------------------------------------ extract


class TaskTimes(Progress):
    """Wall time of every progress task of a stage, by description."""

    def __init__(self):
        self.wall_s: dict[str, float] = {}

    @contextlib.contextmanager
    def task(self, description: str, total: int, unit: str = "it"):
        t = time.perf_counter()
        yield lambda n=1: None
        self.wall_s[description] = time.perf_counter() - t


def write_jpegs(root: Path, count: int, classes: int = 4):
    """``count`` 256×256 noise JPEGs as a ``custom`` dataset (train split only); its DataConfig."""
    from PIL import Image

    from ltclip.config import DataConfig

    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    lines = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(root / f"img/{i:05d}.jpg", quality=90)
        lines.append(f"img/{i:05d}.jpg {i % classes}\n")
    (root / "train.txt").write_text("".join(lines))
    (root / "classnames.txt").write_text("".join(f"c{c}\n" for c in range(classes)))
    return DataConfig(dataset="custom", data_root=str(root), train_list=str(root / "train.txt"),
                      classnames=str(root / "classnames.txt"))


def part_extract(size: dict, device: torch.device, work: Path, rows: list, notes: list) -> None:
    from torch.utils.data import DataLoader

    from ltclip.config import ExtractConfig
    from ltclip.core.distributed import DistContext, autocast, default_workers
    from ltclip.data.images import ImageSplit, worker_init
    from ltclip.data.registry import open_dataset
    from ltclip.data.views import make_views
    from ltclip.models.backbone import load_backbone
    from ltclip.stages.extract import run_extract

    model, n, batch, prec = size["extract_model"], size["extract_images"], size["extract_batch"], user_precision(device)
    data = write_jpegs(work / "jpegs", n)
    case = f"{model}, {n} JPEGs 256 px, {prec}"
    backbone = load_backbone(model, "none", device=device)
    workers = default_workers(DistContext())
    split = ImageSplit(open_dataset(data), "train", make_views("center", backbone.preprocess, backbone.preprocess_cfg))
    loader = DataLoader(split, batch_size=batch, num_workers=workers, worker_init_fn=worker_init)
    t = time.perf_counter()
    images = torch.cat([views[:, 0] for views, *_ in loader])
    rows.append(row("extract", case, f"input pipeline alone ({workers} workers)", n / (time.perf_counter() - t), "images/s"))

    images = images.to(device)

    def forward() -> None:
        with torch.inference_mode(), autocast(device, prec):
            for start in range(0, n, batch):
                backbone.encode(images[start : start + batch], tokens=True)
        sync(device)

    forward()  # warm-up: first-call allocations and kernel choice
    with peak_memory(device) as mem:
        t = time.perf_counter()
        forward()
        forward_rate = n / (time.perf_counter() - t)
    rows.append(row("extract", case, "raw open_clip forward (images in device memory)", forward_rate, "images/s", mem["mib"]))
    images = backbone = None  # the stage's memory peak without them
    timer = TaskTimes()
    cfg = ExtractConfig(out=str(work / "features"), data=data, splits=("train",), model=model, pretrained="none",
                        device=str(device), precision=prec, batch_size=batch)
    with peak_memory(device) as mem:
        t = time.perf_counter()
        run_extract(cfg, timer)
        stage_s = time.perf_counter() - t
    split_s = next(s for name, s in timer.wall_s.items() if name.startswith("train"))
    rows.append(row("extract", case, "ltclip extract, train split loop", n / split_s, "images/s", mem["mib"],
                    f"{n / split_s / forward_rate:.3g}× raw forward"))
    rows.append(row("extract", case, "ltclip extract, whole stage (model build, text file)", n / stage_s, "images/s",
                    mem["mib"], f"{n / stage_s / forward_rate:.3g}× raw forward"))
    timer = TaskTimes()  # the same split with the JPEGs decoded and cropped on the device
    with peak_memory(device) as mem:
        run_extract(dataclasses.replace(cfg, out=str(work / "features-device-decode"), decode="device"), timer)
    split_s = next(s for name, s in timer.wall_s.items() if name.startswith("train"))
    rows.append(row("extract", case, "ltclip extract --decode device, train split loop", n / split_s, "images/s", mem["mib"],
                    f"{n / split_s / forward_rate:.3g}× raw forward"))


# ------------------------------------------------------------------ decoder


def write_token_cache(folder: Path, rows: int, classes: int, embed_dim: int, token_shape) -> np.ndarray:
    """A random train token cache as ``ltclip extract`` writes it; its labels."""
    from ltclip.artifacts.store import write_arrays

    rng = np.random.default_rng(0)
    labels = np.arange(rows) % classes
    folder.mkdir(parents=True)
    write_arrays(folder / "train.h5", rng.standard_normal((rows, embed_dim), np.float32).astype(np.float16), labels,
                 [f"class {i}" for i in range(classes)], {"dataset": "gaussian", "split": "train", "model": "random"},
                 rng.standard_normal((rows, *token_shape), np.float32).astype(np.float16))
    return labels


def decoder_epochs(model: str, size: dict, device: torch.device, work: Path) -> list[dict]:
    """One epoch of the decoder from a token cache and one the paper's way, each after a one-step warm-up."""
    from ltclip.config import TrainHeadConfig, from_flat
    from ltclip.engine import RunEnv, fit
    from ltclip.methods.losses import LOSSES
    from ltclip.methods.task import Task
    from ltclip.models.backbone import load_backbone
    from ltclip.models.heads import HeadInputs, create_head
    from ltclip.stages.train_head import run_train_head

    rows_n, classes, batch, prec = size["decoder_rows"], size["decoder_classes"], size["decoder_batch"], user_precision(device)
    backbone = load_backbone(model, "none", device=device)
    embed_dim, token_shape = backbone.encode_dims()
    cache = work / f"tokens-{model}"
    labels = write_token_cache(cache, rows_n, classes, embed_dim, token_shape)
    px = image_px(backbone)
    source = ImageSource(torch.randn(rows_n, 3, px, px), labels)

    def config(tag: str, steps=None):
        return from_flat(TrainHeadConfig, {"features": str(cache), "out": str(work / f"run-{model}-{tag}"), "head": "decoder",
                                           "epochs": 1, "steps": steps, "batch_size": batch, "device": str(device),
                                           "seed": 0, "precision": prec}, owner="device_check")

    def cached(tag: str, steps=None) -> float:
        timer = StepTimer()
        run_train_head(config(tag, steps), timer)
        sync(device)
        return timer.epochs[0]["wall_s"]

    def paper_way(steps=None) -> float:
        cfg = config("unused")
        head = create_head("decoder", HeadInputs(classes, embed_dim, token_shape))
        timer = StepTimer()
        fit(FrozenEncoderHead(backbone, head, tokens=True),
            Task(cfg.method.loss, LOSSES.parse(cfg.method.loss, cfg.method.loss_opts), np.bincount(labels, minlength=classes)),
            source, dataclasses.replace(cfg.optim, epochs=1, steps=steps), sampler=cfg.method.sampler, num_classes=classes,
            env=RunEnv(device=str(device), progress=timer))
        sync(device)
        return timer.epochs[0]["wall_s"]

    cached("warmup", steps=1)
    paper_way(steps=1)
    case = f"{model}, {rows_n:,} rows, tokens {token_shape[0]}×{token_shape[1]}, {classes} classes, batch {batch}, {prec}"
    with peak_memory(device) as cache_mem:
        cache_s = cached("timed")
    with peak_memory(device) as paper_mem:
        paper_s = paper_way()
    return [row("decoder", case, "decoder epoch from a token cache (train-head)", cache_s, "s/epoch", cache_mem["mib"],
                f"speed-up over the paper's way: {paper_s / cache_s:.2f}×"),
            row("decoder", case, "paper's way: frozen encoder + decoder every step", paper_s, "s/epoch", paper_mem["mib"])]


def part_decoder(size: dict, device: torch.device, work: Path, rows: list, notes: list) -> None:
    for model in size["decoder_models"]:
        rows.extend(unless_out_of_memory(notes, model, lambda: decoder_epochs(model, size, device, work)) or [])


# ------------------------------------------------------------------ finetune and prompt


def finetune_steps(model_name: str, tune: str, head: str, classes: int, batch: int, steps: int, device: torch.device) -> dict:
    """Median seconds per optimizer step (after one warm-up step) and peak memory of a model built as ``ltclip
    finetune`` builds it, ``--precision amp``, trained by the engine on random images in memory."""
    import ltclip.stages.finetune as stage
    from ltclip.config import FinetuneConfig, from_flat
    from ltclip.engine import ParamGroups, RunEnv, fit
    from ltclip.methods.task import Task
    from ltclip.models.tuning import count_trainable, no_weight_decay_names

    cfg = from_flat(FinetuneConfig, {"out": "unused", "model": model_name, "pretrained": "none", "tune": tune, "head": head,
                                     "loss": "ce", "batch_size": batch, "steps": 1 + steps, "epochs": 1, "device": str(device),
                                     "seed": 0, "workers": 0, "precision": "amp"}, owner="device_check")
    backbone, model = stage.new_encoder_classifier(cfg, Classes(classes), device)
    px = image_px(backbone)
    labels = np.arange(batch * (1 + steps)) % classes
    trainable = count_trainable(backbone.model)
    lrs = {"head": cfg.optim.lr, **({"backbone": cfg.tuning.backbone_lr or cfg.optim.lr} if trainable else {})}
    timer = StepTimer()
    with peak_memory(device) as mem:
        fit(model, Task("ce", {}, np.bincount(labels, minlength=classes)), ImageSource(torch.randn(len(labels), 3, px, px), labels),
            cfg.optim, sampler="instance", num_classes=classes, env=RunEnv(device=str(device), progress=timer),
            groups=ParamGroups(lrs=lrs, no_decay=tuple(f"backbone.{n}" for n in no_weight_decay_names(backbone.model))))
    ends = timer.epochs[0]["step_ends_s"]  # amp's GradScaler waits for each CUDA step (its inf check)
    return {"step_s": median(np.diff(ends)), "peak_mib": mem["mib"], "encoder_trainable": trainable}


def train_rows(part: str, cases, size: dict, device: torch.device, notes: list, rows: list) -> None:
    """``finetune_steps`` of each (label, tune, head, classes, batch) case; out of memory → a note."""
    from ltclip.core.distributed import device_precision

    for label, tune, head, classes, batch in cases:
        r = unless_out_of_memory(notes, label, lambda: finetune_steps(size["tune_model"], tune, head, classes, batch,
                                                                      size["tune_steps"], device))
        if r is None:
            continue
        rows.append(row(part, f"{size['tune_model']}, batch {batch}, amp ({device_precision(device, 'amp')})", label, r["step_s"], "s/step", r["peak_mib"],
                        f"{batch / r['step_s']:,.0f} images/s", encoder_trainable=r["encoder_trainable"]))


def part_finetune(size: dict, device: torch.device, work: Path, rows: list, notes: list) -> None:
    train_rows("finetune", [(f"--tune {t}, linear head", t, "linear", 100, size["tune_batch"]) for t in TUNE_MODES],
               size, device, notes, rows)


def part_prompt(size: dict, device: torch.device, work: Path, rows: list, notes: list) -> None:
    train_rows("prompt", [(f"prompt head, {c:,} classes", "frozen", "prompt", c, size["tune_batch"]) for c in size["prompt_classes"]],
               size, device, notes, rows)


# ------------------------------------------------------------------ faiss


def part_faiss(size: dict, device: torch.device, work: Path, rows: list, notes: list) -> None:
    from ltclip.evaluation.retrieval import normalise, search

    s = size["knn"]
    rng = np.random.default_rng(0)
    queries = normalise(rng.standard_normal((s["queries"], s["dim"]), np.float32))
    database = normalise(rng.standard_normal((s["database"], s["dim"]), np.float32))
    case = f"{s['queries']:,} queries × {s['database']:,} rows × {s['dim']}, k={s['k']}"

    def timed(backend: str):
        search(queries[:8], database, s["k"], backend=backend)  # warm-up
        with peak_memory(device) as mem:
            t = time.perf_counter()
            found = search(queries, database, s["k"], backend=backend)
            seconds = time.perf_counter() - t
        return seconds, mem["mib"], found[1]

    torch_s, torch_mib, torch_idx = timed("torch")
    rows.append(row("faiss", case, f"torch fallback ({'cuda' if torch.cuda.is_available() else 'cpu'})", torch_s, "s", torch_mib))
    try:
        import faiss
    except ImportError:
        notes.append("faiss is not installed: pip install 'ltclip[cpu]' or 'ltclip[gpu]'; torch fallback only")
        return
    gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    faiss_s, faiss_mib, faiss_idx = timed("faiss")
    rows.append(row("faiss", case, f"faiss {faiss.__version__} ({'GPU' if gpu else 'CPU'} index)", faiss_s, "s", faiss_mib,
                    f"speed-up over torch: {torch_s / faiss_s:.2f}×; same neighbours: {np.mean(faiss_idx == torch_idx):.1%}"))

