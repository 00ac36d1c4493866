"""Batches of images for training on images (``ltclip finetune``) and for scoring image runs.

Training views are RandomResizedCrop + horizontal flip, or LIFT+'s growing square crops (``mda``),
or the model's own preprocessing with ``augment=False``, drawn from a seed of ``(seed, epoch, position
in the epoch's order)``: the same on any number of processes or DataLoader workers, and again after a resume.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as F

from .base import LTDataset
from ..core.errors import LtclipError
from .images import ImageSplit, apply_bad_image_policy
from .views import Views, _interpolation, _size

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NORMALIZATIONS = ("model", "imagenet")
TRAIN_CROPS = ("random", "mda")


def mean_std(preprocess_cfg: dict, normalize: str) -> tuple:
    """The model's own mean/std, or ImageNet's (the seed paper's code normalises with it, not CLIP's)."""
    return (preprocess_cfg["mean"], preprocess_cfg["std"]) if normalize == "model" else (IMAGENET_MEAN, IMAGENET_STD)


def eval_transform(preprocess, preprocess_cfg: dict, normalize: str):
    """The model's evaluation preprocessing, with its Normalize swapped for ImageNet's if asked."""
    if normalize == "model":
        return preprocess
    steps = [t for t in preprocess.transforms if not isinstance(t, T.Normalize)]
    return T.Compose([*steps, T.Normalize(*mean_std(preprocess_cfg, normalize))])


def normalized_preprocess(preprocess, preprocess_cfg: dict, normalize: str) -> tuple:
    """``(transform, preprocess_cfg)``: the model's evaluation preprocessing (:func:`eval_transform`) and
    its config with the mean/std the crop views use, both normalised as ``normalize`` says."""
    mean, std = mean_std(preprocess_cfg, normalize)
    return eval_transform(preprocess, preprocess_cfg, normalize), {**preprocess_cfg, "mean": mean, "std": std}


class GrowingSquareCrop:
    """LIFT+'s minimalist data augmentation (MDA): a random square crop resized to ``size``, no flip.

    Its area is a uniform fraction of the image's in ``[min_area(), 1]`` (both capped at the largest
    square); the smallest fraction grows over the ``epochs`` on a convex curve, from ``smallest`` to 1:
    ``smallest + (1 - smallest)(1 - sqrt(1 - t²))`` at ``t = epoch / (epochs - 1)`` (0 for one epoch).
    """

    def __init__(self, size: int, epochs: int, interpolation: T.InterpolationMode, smallest: float = 0.08):
        self.size, self.epochs, self.interpolation, self.smallest, self.epoch = size, epochs, interpolation, smallest, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def min_area(self) -> float:
        t = self.epoch / (self.epochs - 1) if self.epochs > 1 else 0.0
        return self.smallest + (1 - self.smallest) * (1 - math.sqrt(1 - t * t))

    def __call__(self, image):
        _, height, width = F.get_dimensions(image)
        square = min(height, width) ** 2 / (height * width)
        area = height * width * torch.empty(1).uniform_(min(self.min_area(), square), square).item()
        side = int(round(math.sqrt(area)))
        top = int(torch.randint(0, height - side + 1, (1,)))
        left = int(torch.randint(0, width - side + 1, (1,)))
        return F.resized_crop(image, top, left, side, side, [self.size, self.size], self.interpolation)

    def __repr__(self) -> str:
        return (f"GrowingSquareCrop(size={self.size}, epochs={self.epochs}, smallest={self.smallest}, "
                f"{self.interpolation.value})")


def train_transform(preprocess, preprocess_cfg: dict, normalize: str, augment: bool, interpolation: str | None = None,
                    crop: str = "random", epochs: int = 1):
    """The training crop (resampled with ``interpolation``, None: the model's), or without ``augment``
    the evaluation preprocessing. ``crop``: ``random`` (RandomResizedCrop + flip) or ``mda``
    (:class:`GrowingSquareCrop` over ``epochs``)."""
    if not augment:
        return eval_transform(preprocess, preprocess_cfg, normalize)
    if crop not in TRAIN_CROPS:
        raise LtclipError(f"--train-crop {crop!r}: choose one of {', '.join(TRAIN_CROPS)}")
    size, interp = _size(preprocess_cfg), _interpolation(preprocess_cfg, interpolation)
    steps = ([T.RandomResizedCrop(size, interpolation=interp), T.RandomHorizontalFlip()] if crop == "random"
             else [GrowingSquareCrop(size, epochs, interp)])
    return T.Compose([*steps, T.ToTensor(), T.Normalize(*mean_std(preprocess_cfg, normalize))])


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "little") >> 1


class _Drawn(Dataset):
    """Item ``i`` of an epoch's order: image ``rows[i]`` transformed with the seed of its position."""

    def __init__(self, split: ImageSplit, rows, positions, seed: int, epoch: int):
        self.split, self.rows, self.positions, self.seed, self.epoch = split, rows, positions, seed, epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(self.seed, self.epoch, int(self.positions[i])))
            x, label, _, problem = self.split[int(self.rows[i])]
        return x[0], label, problem


class _OneView(Views):
    def __init__(self, transform):
        self.transform, self.count, self.description = transform, 1, str(transform)

    def __call__(self, image, row: int) -> torch.Tensor:
        return self.transform(image).unsqueeze(0)


class ImageSource:
    """The engine's training rows from a dataset split's images (decoded at every step)."""

    def __init__(self, dataset: LTDataset, split: str, transform, *, seed: int, workers: int, pin_memory: bool = False):
        self.images = ImageSplit(dataset, split, _OneView(transform))
        self.per_epoch = [t for t in getattr(transform, "transforms", [transform]) if hasattr(t, "set_epoch")]
        self.labels = self.images.split.labels
        self.seed, self.workers, self.pin_memory = seed, workers, pin_memory

    def batches(self, order, batch_size, epoch, positions):
        for step in self.per_epoch:  # before the loader copies the transform into its workers
            step.set_epoch(epoch)
        loader = DataLoader(_Drawn(self.images, order, positions, self.seed, epoch), batch_size=batch_size,
                            num_workers=self.workers, pin_memory=self.pin_memory, shuffle=False)
        for x, y, problems in loader:
            apply_bad_image_policy("fail", problems)
            yield x, y


def image_batches(dataset: LTDataset, split: str, views: Views, rows, batch_size: int, workers: int):
    """``(views [B, V, 3, H, W], labels)`` over ``rows`` of a split, in order (for validation and eval)."""
    loader = DataLoader(ImageSplit(dataset, split, views, list(rows)), batch_size=batch_size, num_workers=workers,
                        shuffle=False)
    for x, y, _, problems in loader:
        apply_bad_image_policy("fail", problems)
        yield x, y
