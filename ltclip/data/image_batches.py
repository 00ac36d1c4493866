"""Batches of images for training on images (``ltclip finetune``) and for scoring image runs.

Training views are RandomResizedCrop + horizontal flip (or the model's own preprocessing with
``augment=False``), drawn from a seed of ``(seed, epoch, position in the epoch's order)``: the same
on any number of processes or DataLoader workers, and again after a resume.
"""

from __future__ import annotations

import hashlib

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from .base import LTDataset
from .images import ImageSplit, apply_bad_image_policy
from .views import Views, _interpolation, _size

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NORMALIZATIONS = ("model", "imagenet")


def mean_std(preprocess_cfg: dict, normalize: str) -> tuple:
    """The model's own mean/std, or ImageNet's (the seed paper's code normalises with it, not CLIP's)."""
    return (preprocess_cfg["mean"], preprocess_cfg["std"]) if normalize == "model" else (IMAGENET_MEAN, IMAGENET_STD)


def eval_transform(preprocess, preprocess_cfg: dict, normalize: str):
    """The model's evaluation preprocessing, with its Normalize swapped for ImageNet's if asked."""
    if normalize == "model":
        return preprocess
    steps = [t for t in preprocess.transforms if not isinstance(t, T.Normalize)]
    return T.Compose([*steps, T.Normalize(*mean_std(preprocess_cfg, normalize))])


def train_transform(preprocess, preprocess_cfg: dict, normalize: str, augment: bool):
    if not augment:
        return eval_transform(preprocess, preprocess_cfg, normalize)
    return T.Compose([
        T.RandomResizedCrop(_size(preprocess_cfg), interpolation=_interpolation(preprocess_cfg)),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(*mean_std(preprocess_cfg, normalize)),
    ])


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
        self.labels = self.images.split.labels
        self.seed, self.workers, self.pin_memory = seed, workers, pin_memory

    def batches(self, order, batch_size, epoch, positions):
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
