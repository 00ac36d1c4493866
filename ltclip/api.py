"""Python use of a trained run: ``ltclip.load(RUN)`` (or ``ltclip.load(features=CACHE)`` for zero-shot CLIP).

::

    import ltclip
    clf = ltclip.load("runs/my-run")                 # head, second stage or finetuned run
    for p in clf.predict(["cat.jpg", "dog.png"], top_k=3):
        print(p.image, p.top)                         # [(class name, probability), ...]
    logits = clf.model(clf.transform(image).unsqueeze(0).to(clf.device))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .artifacts.image_model import ImageClassifier, run_classifier, zero_shot_classifier
from .core.distributed import DistContext, resolve_device
from .core.errors import LtclipError
from .stages.predict import Prediction, predict_logits, top_predictions


class Classifier:
    """A run (or a cache's zero-shot classifier) on images: ``model`` (tensor → logits, eval mode),
    ``transform`` (PIL → tensor, the preprocessing it was trained with), ``classnames``, ``device``."""

    def __init__(self, classifier: ImageClassifier, device: torch.device):
        self._classifier, self.device = classifier, device

    @property
    def model(self) -> torch.nn.Module:
        return self._classifier.model

    @property
    def transform(self):
        return self._classifier.preprocess

    @property
    def classnames(self) -> list[str]:
        return self._classifier.classnames

    def to(self, device: str | torch.device) -> "Classifier":
        self.device = resolve_device(str(device), DistContext())
        self._classifier.model.to(self.device)
        return self

    def logits(self, images, test_views: str = "center", batch_size: int = 64) -> np.ndarray:
        """float32 logits ``[N, C]`` of paths or PIL images, the logits of ``test_views`` averaged."""
        items = _as_list(images)
        views = self._classifier.views(test_views)
        _, logits = predict_logits(self._classifier, items, views, batch_size=batch_size, device=self.device)
        return logits

    def predict(self, images, top_k: int = 5, test_views: str = "center", batch_size: int = 64) -> list[Prediction]:
        """One :class:`Prediction` per image (a path or a PIL image): ``.top`` holds ``(class name,
        probability)`` pairs, most probable first; ``.label`` the top class. An unreadable image raises."""
        items = _as_list(images)
        names = [str(i) if isinstance(i, (str, Path)) else f"image {n}" for n, i in enumerate(items)]
        return top_predictions(self.logits(items, test_views, batch_size), self.classnames, names, top_k)


def _as_list(images) -> list:
    items = [images] if isinstance(images, (str, Path)) or hasattr(images, "convert") else list(images)
    if not items:
        raise LtclipError("predict: no images given; pass paths or PIL images")
    return items


def load(run: str | Path | None = None, *, features: str | Path | None = None, device: str = "auto") -> Classifier:
    """The classifier of a finished run folder, or with ``features=CACHE`` (and no run) CLIP zero-shot
    with that cache's encoder and class text embeddings. ``device``: auto, cpu, cuda or cuda:N."""
    if (run is None) == (features is None):
        raise LtclipError("ltclip.load: pass a run folder, or features=CACHE for zero-shot (not both)")
    where = resolve_device(device, DistContext())
    classifier = run_classifier(run, where) if run is not None else zero_shot_classifier(features, where)
    return Classifier(classifier, where)
