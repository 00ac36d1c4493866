"""Image → stacked views: the model's own preprocessing, five/ten-crop test views, seeded train views."""

from __future__ import annotations

import hashlib

import torch
from torchvision import transforms as T

from ..core.errors import LtclipError

TEST_VIEWS = ("center", "flip", "fivecrop", "tencrop")


class Views:
    """Callable ``(PIL image, row) -> Tensor[V, 3, H, W]`` with a text ``description`` for provenance."""

    count: int
    description: str

    def __call__(self, image, row: int) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class CenterView(Views):
    """The model's own preprocessing (open_clip's eval transform), one view."""

    def __init__(self, preprocess):
        self.preprocess = preprocess
        self.count = 1
        self.description = f"center: {preprocess}"

    def __call__(self, image, row: int) -> torch.Tensor:
        return self.preprocess(image).unsqueeze(0)


class FlipViews(Views):
    """The model's own preprocessing and its horizontal mirror: two views (test-time ensembling)."""

    def __init__(self, preprocess):
        self.preprocess = preprocess
        self.count = 2
        self.description = f"flip: {preprocess} and its mirror"

    def __call__(self, image, row: int) -> torch.Tensor:
        x = self.preprocess(image)
        return torch.stack([x, x.flip(-1)])


class CropViews(Views):
    """Five or ten crops at the model's resolution after resizing the short side by 256/224."""

    def __init__(self, cfg: dict, ten: bool):
        size = _size(cfg)
        interp = _interpolation(cfg)
        crop = T.TenCrop(size) if ten else T.FiveCrop(size)
        self.resize = T.Resize(round(size * 256 / 224), interpolation=interp)
        self.crop = crop
        self.finish = T.Compose([T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])])
        self.count = 10 if ten else 5
        self.description = f"{'ten' if ten else 'five'}crop: resize {round(size * 256 / 224)} {interp.value}, crop {size}, mean {list(cfg['mean'])}, std {list(cfg['std'])}"

    def __call__(self, image, row: int) -> torch.Tensor:
        return torch.stack([self.finish(c) for c in self.crop(self.resize(image))])


class TrainViews(Views):
    """K augmented views (RandomResizedCrop + horizontal flip), seeded per (seed, row, view)."""

    def __init__(self, cfg: dict, count: int, seed: int):
        size = _size(cfg)
        self.augment = T.Compose(
            [
                T.RandomResizedCrop(size, interpolation=_interpolation(cfg)),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(cfg["mean"], cfg["std"]),
            ]
        )
        self.count = count
        self.seed = seed
        self.description = f"train x{count} seed {seed}: {self.augment}"

    def __call__(self, image, row: int) -> torch.Tensor:
        out = []
        with torch.random.fork_rng(devices=[]):
            for v in range(self.count):
                torch.manual_seed(_view_seed(self.seed, row, v))
                out.append(self.augment(image))
        return torch.stack(out)


def _view_seed(seed: int, row: int, view: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{row}/{view}".encode(), digest_size=8).digest(), "little") >> 1


def _size(cfg: dict) -> int:
    size = cfg["size"]
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _interpolation(cfg: dict) -> T.InterpolationMode:
    return T.InterpolationMode(cfg.get("interpolation", "bicubic"))


def make_views(kind: str, preprocess, preprocess_cfg: dict, *, count: int = 1, seed: int = 0) -> Views:
    """``center`` | ``flip`` | ``fivecrop`` | ``tencrop`` for evaluation, ``train`` for K augmented views."""
    if kind == "center":
        return CenterView(preprocess)
    if kind == "flip":
        return FlipViews(preprocess)
    if kind in ("fivecrop", "tencrop"):
        return CropViews(preprocess_cfg, ten=kind == "tencrop")
    if kind == "train":
        if count < 1:
            raise LtclipError(f"--train-views {count}: must be >= 1")
        return TrainViews(preprocess_cfg, count, seed)
    raise LtclipError(f"--test-views {kind!r}: choose one of {', '.join(TEST_VIEWS)}")
