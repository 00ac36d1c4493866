"""``ltclip predict``: a run's (or a cache's zero-shot) top-k classes of image files, views' logits averaged."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..artifacts.image_model import ImageClassifier, run_classifier, zero_shot_classifier
from ..artifacts.outputs import check_output_files, file_input, folder_input, run_folder_inputs
from ..config import PredictConfig
from ..config.fields import check_values
from ..core.atomic import atomic_path
from ..core.distributed import DistContext, default_workers, resolve_device
from ..core.errors import LtclipError
from ..data.image_files import read_rgb
from ..data.image_paths import image_paths
from ..data.images import apply_bad_image_policy, unread_views, worker_init
from ..data.views import Views
from ..evaluation.metrics import average_views
from ..models.encoder_classifier import image_logits

log = logging.getLogger(__name__)

OUT_FORMATS = (".csv", ".jsonl")


@dataclass(frozen=True)
class Prediction:
    """One image's ``top`` classes, most probable first: ``(class name, probability)`` pairs."""

    image: str  # the path, or ``image N`` for an in-memory image
    top: list[tuple[str, float]]

    @property
    def label(self) -> str:
        return self.top[0][0]


class _Images(Dataset):
    """Item ``i`` → ``(views [V, 3, H, W], i, problem)`` of a path or PIL image; unreadable: zeros and the problem."""

    def __init__(self, items: list, views: Views):
        self.items, self.views = items, views

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            image = read_rgb(item) if isinstance(item, (str, Path)) else item.convert("RGB")
            return self.views(image, i), i, ""
        except Exception as err:  # any decode/IO failure of one image
            return unread_views(self.views, i), i, " ".join(f"{item}: cannot read image ({type(err).__name__}: {err})".split())


@torch.inference_mode()
def predict_logits(classifier: ImageClassifier, items: list, views: Views, *, batch_size: int = 64, workers: int = 0,
                 device: str | torch.device = "cpu", precision: str = "fp32", bad_images: str = "fail") -> tuple[np.ndarray, np.ndarray]:
    """``(indices of the images read, their logits [n, C] float32)``, each image's views averaged."""
    device = torch.device(device)
    loader = DataLoader(_Images(items, views), batch_size=batch_size, num_workers=workers, shuffle=False,
                        worker_init_fn=worker_init if workers else None)

    def read():  # (views, index) of the images read, batch by batch, as --bad-images says
        for x, index, problems in loader:
            ok = torch.tensor(apply_bad_image_policy(bad_images, problems), dtype=torch.bool)
            if ok.any():
                yield x[ok], index[ok]

    kept, parts = [], []
    for logits, index in image_logits(classifier.model, read(), device, precision):
        parts.append(average_views(logits, "mean"))
        kept.append(index)
    classes = len(classifier.classnames)
    return (np.concatenate(kept) if kept else np.zeros(0, np.int64),
            np.concatenate(parts) if parts else np.zeros((0, classes), np.float32))


def top_predictions(logits: np.ndarray, classnames: list[str], names: list[str], top_k: int) -> list[Prediction]:
    """Each row's ``top_k`` classes by softmax probability."""
    probs = torch.softmax(torch.from_numpy(logits).double(), dim=-1).numpy()
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    return [Prediction(name, [(classnames[c], float(p[c])) for c in row]) for name, p, row in zip(names, probs, order)]


def write_predictions(predictions: list[Prediction], out: str | Path) -> None:
    """CSV (``path, class_1, prob_1, …``) or JSONL (``{"path", "top": [{"class", "probability"}]}``), atomically."""
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        if Path(out).suffix.lower() == ".jsonl":
            for p in predictions:
                top = [{"class": name, "probability": prob} for name, prob in p.top]
                f.write(json.dumps({"path": p.image, "top": top}) + "\n")
            return
        k = max((len(p.top) for p in predictions), default=0)
        writer = csv.writer(f)
        writer.writerow(["path", *[col for i in range(1, k + 1) for col in (f"class_{i}", f"prob_{i}")]])
        for p in predictions:
            writer.writerow([p.image, *[v for name, prob in p.top for v in (name, f"{prob:.6f}")]])


def print_table(predictions: list[Prediction]) -> None:
    """A compact table on stdout: each image, its top class and probability, then the others."""
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for title in ("image", "class", "prob", "next"):
        table.add_column(title, overflow="fold")
    for p in predictions:
        rest = ", ".join(f"{name} {prob:.2f}" for name, prob in p.top[1:])
        table.add_row(p.image, p.top[0][0], f"{p.top[0][1]:.3f}", rest)
    Console(width=max(120, Console().width)).print(table)  # paths are long: fold them less


def check_source(cfg, zero_shot_does: str, run_and: str = "") -> None:
    """A run, or ``--zero-shot --features CACHE`` (which ``zero_shot_does``), and not both: else one line."""
    if cfg.zero_shot and (cfg.run or not cfg.features):
        raise LtclipError(f"--zero-shot {zero_shot_does}: pass --features CACHE and no run")
    if not cfg.zero_shot and cfg.features:
        raise LtclipError("--features names the cache of --zero-shot; a run brings its own encoder: drop --features")
    if not cfg.zero_shot and not cfg.run:
        raise LtclipError(f"name a run folder (from `ltclip train-head` or `ltclip finetune`){run_and}, or pass --zero-shot "
                          "--features CACHE")


def _check(cfg: PredictConfig) -> None:
    check_values(cfg)  # --bad-images, --test-views, ... among their sets, the numbers in their ranges
    check_source(cfg, "classifies with a cache's text embeddings", " and images")
    if cfg.out and Path(cfg.out).suffix.lower() not in OUT_FORMATS:
        raise LtclipError(f"--out {cfg.out}: name a .csv or .jsonl file")


def run_predict(cfg: PredictConfig, found: list[Path] | None = None) -> list[Prediction]:
    """Predict the images ``cfg`` names (``found``: their files, when the caller has listed them
    already); write ``--out`` (checked before any work) when given."""
    from ..artifacts.runs import read_run_info

    _check(cfg)
    paths = image_paths(cfg.paths, cfg.list_file) if found is None else found
    inputs = [file_input(p, "an input image") for p in paths] + ([file_input(cfg.list_file, "the --list file")] if cfg.list_file else [])
    inputs += [folder_input(cfg.features, "the feature cache")] if cfg.zero_shot else run_folder_inputs(cfg.run, read_run_info(cfg.run))
    check_output_files({"--out": cfg.out}, inputs)
    device = resolve_device(cfg.device, DistContext())
    classifier = zero_shot_classifier(cfg.features, device) if cfg.zero_shot else run_classifier(cfg.run, device)
    views = classifier.views(cfg.test_views, cfg.eval_resize, cfg.interpolation)
    workers = default_workers(DistContext()) if cfg.workers is None else cfg.workers
    kept, logits = predict_logits(classifier, paths, views, batch_size=cfg.batch_size, workers=workers, device=device,
                                precision=cfg.precision, bad_images=cfg.bad_images)
    predictions = top_predictions(logits, classifier.classnames, [str(paths[i]) for i in kept], cfg.top_k)
    if cfg.out:
        write_predictions(predictions, cfg.out)
    return predictions
