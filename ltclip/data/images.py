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
    """Item ``i`` → ``(views [V,3,H,W], label, row, ok)`` for row ``indices[i]`` of the split.

    With ``bad_images="skip"`` an unreadable image yields zeros and ``ok=False`` (and a logged
    warning naming it); with ``"fail"`` it raises a one-line error naming the file.
    """

    def __init__(self, dataset: LTDataset, split: str, views: Views, bad_images: str = "fail", indices=None):
        if bad_images not in BAD_IMAGE_POLICIES:
            raise LtclipError(f"--bad-images {bad_images!r}: choose one of {', '.join(BAD_IMAGE_POLICIES)}")
        self.dataset = dataset
        self.split = dataset.split(split)
        self.views = views
        self.bad_images = bad_images
        self.indices = indices if indices is not None else range(len(self.split))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        row = self.indices[i]
        label = int(self.split.labels[row])
        try:
            x = self.views(self.dataset.open_image(self.split.name, row), row)
        except Exception as err:  # any decode/IO failure of one image
            where = f"{self.dataset.data_root}/{self.split.keys[row]}"
            if self.bad_images == "fail":
                raise LtclipError(
                    f"{where}: cannot read image ({type(err).__name__}: {err}); fix it or pass --bad-images skip"
                ) from None
            log.warning("skipping unreadable image %s (%s)", where, err)
            return torch.zeros_like(self.views(Image.new("RGB", (8, 8)), row)), label, row, False
        return x, label, row, True
