"""A torch Dataset over one split of an LTDataset: decode, preprocess into views, bad-image policy."""

from __future__ import annotations

import logging

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import LtclipError
from .base import LTDataset
from .views import Views

log = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("fail", "skip")


class ImageSplit(Dataset):
    """Item ``i`` → ``(views [V,3,H,W], label, row, problem)`` for row ``indices[i]`` of the split.

    ``problem`` is ``""`` for a good image; for an unreadable one it is a one-line description
    naming the file, and the views are zeros. Nothing is raised or logged here, so a problem found
    in a DataLoader worker reaches the main process as data (a worker's exception would arrive
    wrapped in its whole traceback); the caller applies the ``--bad-images`` policy.
    """

    def __init__(self, dataset: LTDataset, split: str, views: Views, indices=None):
        self.dataset = dataset
        self.split = dataset.split(split)
        self.views = views
        self.indices = indices if indices is not None else range(len(self.split))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        row = self.indices[i]
        label = int(self.split.labels[row])
        try:
            return self.views(self.dataset.open_image(self.split.name, row), row), label, row, ""
        except Exception as err:  # any decode/IO failure of one image
            where = f"{self.dataset.data_root}/{self.split.keys[row]}"
            problem = " ".join(f"{where}: cannot read image ({type(err).__name__}: {err})".split())
            return torch.zeros_like(self.views(Image.new("RGB", (8, 8)), row)), label, row, problem


def check_bad_images(policy: str) -> str:
    if policy not in BAD_IMAGE_POLICIES:
        raise LtclipError(f"--bad-images {policy!r}: choose one of {', '.join(BAD_IMAGE_POLICIES)}")
    return policy


def apply_bad_image_policy(policy: str, problems) -> list[bool]:
    """Per item of a batch, whether its image was read; ``fail`` raises the first problem as a one-line error."""
    ok = [not p for p in problems]
    if not all(ok):
        first = next(p for p in problems if p)
        if policy == "fail":
            raise LtclipError(f"{first}; fix it or pass --bad-images skip")
        for problem in problems:
            if problem:
                log.warning("skipping unreadable image: %s", problem)
    return ok
