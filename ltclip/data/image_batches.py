"""Batches of images for training on images (``ltclip finetune``) and for scoring image runs.

Training views are RandomResizedCrop + horizontal flip, or LIFT+'s growing square crops (``mda``),
or the model's own preprocessing with ``augment=False``, drawn from a seed of ``(seed, epoch, position
in the epoch's order)``: the same on any number of processes or DataLoader workers, and again after a resume.
Images are decoded on the CPU in DataLoader workers, or with ``decode="device"`` on the device
(:mod:`~ltclip.data.device_decode`), with the same seeded crops.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T
from torchvision.transforms import functional as F

from .base import LTDataset
from ..config.values import TRAIN_CROPS
from ..core.errors import LtclipError
from .device_decode import check_decode, decode, encoded_loader, image_loader, on_tensors, stack_views
from .images import ImageSplit, apply_bad_image_policy, worker_init
from .views import Views, _interpolation, _size

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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

    takes_tensors = True  # a PIL image or a [C, H, W] tensor (--decode device), the same crop drawn

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
    """Item ``(row, position, epoch)``: image ``row`` transformed with the seed of its position in that
    epoch's order. The epoch travels with the item, so workers kept between epochs set it on their own
    copy of the transform's per-epoch steps (``mda``'s growing crops)."""

    def __init__(self, split: ImageSplit, seed: int, per_epoch: list):
        self.split, self.seed, self.per_epoch = split, seed, per_epoch

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int, int]):
        row, position, epoch = key
        for step in self.per_epoch:
            step.set_epoch(epoch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(self.seed, epoch, position))
            x, label, _, problem = self.split[row]
        return x[0], label, problem


class _OneView(Views):
    def __init__(self, transform):
        self.transform, self.count, self.description = transform, 1, str(transform)

    def __call__(self, image, row: int) -> torch.Tensor:
        return self.transform(image).unsqueeze(0)


class _Items(Sampler):
    """The items of the current epoch, replaced before each: one sampler for a DataLoader kept between epochs."""

    def __init__(self):
        self.items: list = []

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class ImageSource:
    """The engine's training rows from a dataset split's images (decoded at every step).

    Its DataLoader and workers are kept between epochs (``persistent_workers``): measured on the
    synthetic set with 2 workers, an epoch of 138 images took 65 ms instead of 145 ms, the workers' start
    no longer paid per epoch (a larger ``prefetch_factor`` than 2 gained nothing). ``decode="device"``:
    the workers read the files' bytes and the batch is decoded and cropped on ``device``, each image
    with the seed it has on the CPU path.
    """

    def __init__(self, dataset: LTDataset, split: str, transform, *, seed: int, workers: int, pin_memory: bool = False,
                 decode: str = "cpu", device=None):
        self.images = ImageSplit(dataset, split, _OneView(transform))
        self.per_epoch = [t for t in getattr(transform, "transforms", [transform]) if hasattr(t, "set_epoch")]
        self.labels = self.images.split.labels
        self.seed, self.workers, self.pin_memory = seed, workers, pin_memory
        self.decode, self.device = check_decode(decode), torch.device(device or "cpu")
        self.items, self.loaders = _Items(), {}

    def _loader(self, batch_size: int) -> DataLoader:
        if batch_size not in self.loaders:
            if self.decode == "device":
                self.loaders[batch_size] = encoded_loader(self.images.dataset, self.images.split.name, batch_size=batch_size,
                                                          workers=self.workers, sampler=self.items,
                                                          pin_memory=self.pin_memory, persistent=True)
            else:
                self.loaders[batch_size] = DataLoader(
                    _Drawn(self.images, self.seed, self.per_epoch), batch_size=batch_size, sampler=self.items,
                    num_workers=self.workers, pin_memory=self.pin_memory, persistent_workers=self.workers > 0,
                    worker_init_fn=worker_init)
        return self.loaders[batch_size]

    def batches(self, order, batch_size, epoch, positions):
        loader = self._loader(batch_size)
        if self.decode == "cpu":
            self.items.items = [(int(r), int(p), epoch) for r, p in zip(order, positions)]
            for x, y, problems in loader:
                apply_bad_image_policy("fail", problems)
                yield x, y
            return
        for step in self.per_epoch:  # the device path crops here, in this process
            step.set_epoch(epoch)
        self.items.items, drawn, done = [int(r) for r in order], on_tensors(self.images.views), 0
        for batch in loader:
            images, problems = decode(batch, self.images.dataset, self.images.split.name, self.device)
            apply_bad_image_policy("fail", problems)
            seeds = [_seed(self.seed, epoch, int(p)) for p in positions[done:done + len(images)]]
            done += len(images)
            yield stack_views(images, lambda i, image: _seeded(drawn, image, seeds[i]), self.device)[:, 0], batch[2]


def _seeded(views: Views, image, seed: int) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return views(image, -1)


def image_batches(dataset: LTDataset, split: str, views: Views, rows, batch_size: int, workers: int,
                  decode: str = "cpu", device=None):
    """``(views [B, V, 3, H, W], labels)`` over ``rows`` of a split, in order (for validation and eval);
    ``decode="device"``: decoded on ``device``."""
    for x, y, _, problems in image_loader(dataset, split, views, rows, batch_size=batch_size, workers=workers,
                                          decode=decode, device=device):
        apply_bad_image_policy("fail", problems)
        yield x, y
