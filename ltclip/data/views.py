"""Image → stacked views: the model's own preprocessing, five/ten-crop test views, seeded train views."""

from __future__ import annotations

import hashlib

import torch
from torchvision import transforms as T

from ..config.values import INTERPOLATIONS, TEST_VIEWS
from ..core.errors import LtclipError


class Views:
    """Callable ``(PIL image, row) -> Tensor[V, 3, H, W]`` with a text ``description`` for provenance."""

    count: int
    description: str
    geometry: str  # the description less the normalisation: which pixels each view reads


    def __call__(self, image, row: int) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class CenterView(Views):
    """The model's own preprocessing (open_clip's eval transform), one view."""

    def __init__(self, preprocess):
        self.preprocess = preprocess
        self.count = 1
        self.description = f"center: {preprocess}"
        self.geometry = "center: the model's preprocessing"

    def __call__(self, image, row: int) -> torch.Tensor:
        return self.preprocess(image).unsqueeze(0)


class FlipViews(Views):
    """The model's own preprocessing and its horizontal mirror: two views (test-time ensembling)."""

    def __init__(self, preprocess):
        self.preprocess = preprocess
        self.count = 2
        self.description = f"flip: {preprocess} and its mirror"
        self.geometry = "flip: the model's preprocessing and its mirror"

    def __call__(self, image, row: int) -> torch.Tensor:
        x = self.preprocess(image)
        return torch.stack([x, x.flip(-1)])


class CropViews(Views):
    """Crops at the model's resolution after resizing the short side to ``resize`` (default: the
    resolution × 256/224): the center one (``flip``: and its mirror), five or ten."""

    def __init__(self, cfg: dict, kind: str, resize: int | None = None, interpolation: str | None = None):
        size = _size(cfg)
        interp = _interpolation(cfg, interpolation)
        resize = resize or round(size * 256 / 224)
        if resize < size:
            raise LtclipError(f"--eval-resize {resize}: must be at least the model's resolution {size}")
        self.resize = T.Resize(resize, interpolation=interp)
        self.crop = {"center": T.CenterCrop(size), "flip": T.CenterCrop(size), "fivecrop": T.FiveCrop(size),
                     "tencrop": T.TenCrop(size)}[kind]
        self.mirror = kind == "flip"
        self.finish = T.Compose([T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])])
        self.count = {"center": 1, "flip": 2, "fivecrop": 5, "tencrop": 10}[kind]
        self.geometry = f"{kind}: resize {resize} {interp.value}, crop {size}"
        self.description = f"{self.geometry}, mean {list(cfg['mean'])}, std {list(cfg['std'])}"

    def __call__(self, image, row: int) -> torch.Tensor:
        crops = self.crop(self.resize(image))
        views = torch.stack([self.finish(c) for c in (crops if isinstance(crops, tuple) else [crops])])
        return torch.cat([views, views.flip(-1)]) if self.mirror else views


class TrainViews(Views):
    """K augmented views (RandomResizedCrop + horizontal flip), seeded per (seed, row, view)."""

    def __init__(self, cfg: dict, count: int, seed: int, interpolation: str | None = None):
        size = _size(cfg)
        self.augment = T.Compose(
            [
                T.RandomResizedCrop(size, interpolation=_interpolation(cfg, interpolation)),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(cfg["mean"], cfg["std"]),
            ]
        )
        self.count = count
        self.seed = seed
        self.description = f"train x{count} seed {seed}: {self.augment}"
        self.geometry = f"train x{count} seed {seed}: {self.augment.transforms[0]}"

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


def _interpolation(cfg: dict, override: str | None = None) -> T.InterpolationMode:
    """``override`` (bilinear or bicubic), else the model's own resampling (bicubic where it names none)."""
    check_view_options(None, override)
    return T.InterpolationMode(override or cfg.get("interpolation", "bicubic"))


def lift_resize(preprocess_cfg: dict) -> int:
    """LIFT's test view's short side, the resolution × 8/7 (256 at 224; its trainer.py, ``Resize(resolution * 8 // 7)``)."""
    return _size(preprocess_cfg) * 8 // 7


def check_view_options(resize: int | None, interpolation: str | None) -> None:
    """Refuse an ``--eval-resize`` or ``--interpolation`` no view can use, before anything is read or written."""
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < 0):
        raise LtclipError(f"--eval-resize {resize!r}: must be a number of pixels, e.g. 256 (0: the model's preprocessing)")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise LtclipError(f"--interpolation {interpolation!r}: choose one of {', '.join(INTERPOLATIONS)}")


def make_views(kind: str, preprocess, preprocess_cfg: dict, *, count: int = 1, seed: int = 0, resize: int | None = None,
               interpolation: str | None = None) -> Views:
    """``center`` | ``flip`` | ``fivecrop`` | ``tencrop`` for evaluation, ``train`` for K augmented views.

    ``resize``: the short side before cropping (None or 0: the model's preprocessing for center and flip,
    the resolution × 256/224 for five and ten crops); ``interpolation`` (bilinear or bicubic)
    resamples the crops and ``resize`` (None: the model's).
    """
    resize = resize or None
    if kind in ("center", "flip") and resize is None:
        return CenterView(preprocess) if kind == "center" else FlipViews(preprocess)
    if kind in TEST_VIEWS:
        return CropViews(preprocess_cfg, kind, resize, interpolation)
    if kind == "train":
        if count < 1:
            raise LtclipError(f"--train-views {count}: must be >= 1")
        return TrainViews(preprocess_cfg, count, seed, interpolation)
    raise LtclipError(f"--test-views {kind!r}: choose one of {', '.join(TEST_VIEWS)}")
