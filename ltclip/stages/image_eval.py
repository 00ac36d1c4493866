"""The image side of ``ltclip eval``: a finetuned run scored on its dataset's images (test-time views)."""

from __future__ import annotations

import dataclasses

import numpy as np

from ..config import DataConfig, EvalConfig, from_dict
from ..artifacts.image_model import finetuned_classifier
from ..data.image_batches import image_batches
from ..data.registry import open_dataset
from ..core.distributed import DistContext, default_workers
from ..core.errors import LtclipError
from ..evaluation.metrics import average_views
from ..models.encoder_classifier import image_logits


# --batch-size's default for a finetuned run: images, each forwarded with its views (ten with tencrop), as
# LIFT's test loader batches them; 1,024 images of fivecrop views would be 5,120 ViT forwards at once.
IMAGE_BATCH = 128


def image_run_logits(run, cfg: EvalConfig, device) -> tuple[np.ndarray, np.ndarray]:
    """``(logits [N, C], labels)`` of a finetuned run on ``cfg.split``'s images, views averaged as ``--views`` says."""
    if cfg.retrieval_mix > 0:
        raise LtclipError(f"--retrieval-mix needs a feature cache; {run.path} is a finetuned run: "
                          f"`ltclip extract --from-run {run.path}` makes one")
    data = from_dict(DataConfig, run.info["inputs"]["data"])
    if cfg.data_root:
        data = dataclasses.replace(data, data_root=cfg.data_root)
    dataset = open_dataset(data)
    classifier = finetuned_classifier(run, dataset.classnames)
    views = classifier.views(cfg.test_views, cfg.eval_resize, cfg.interpolation)
    split = dataset.split(cfg.split)
    workers = default_workers(DistContext()) if cfg.workers is None else cfg.workers
    parts, labels = [], []
    batches = image_batches(dataset, cfg.split, views, range(len(split)), cfg.batch_size or IMAGE_BATCH, workers, cfg.decode,
                            device)
    for logits, y in image_logits(classifier.model, batches, device):
        parts.append(logits)
        labels.append(y)
    return average_views(np.concatenate(parts), cfg.views), np.concatenate(labels)
