"""Image views (ltclip.data.views): LIFT's test resizes and crops, and the resampling of training crops.

Crop boxes are written out by hand for a 300×400 (width × height) image and compared with PIL's own
resize and crop; the center view also against torchvision's ``Resize`` + ``CenterCrop``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from ltclip.core.errors import LtclipError
from ltclip.data import image_batches
from ltclip.data.image_batches import GrowingSquareCrop, train_transform
from ltclip.data.views import CenterView, check_view_options, make_views

# mean 0, std 1: a view is the crop's pixels / 255
CFG = {"size": 224, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "interpolation": "bicubic"}
IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 300, 3), dtype=np.uint8))  # 300 wide, 400 high


def pil_crops(resized_size: tuple[int, int], boxes: list[tuple[int, int]], resample) -> torch.Tensor:
    """The 224-pixel crops at ``boxes`` (left, top) of IMAGE resized by PIL to ``resized_size``."""
    resized = IMAGE.resize(resized_size, resample)
    return torch.stack([T.functional.to_tensor(resized.crop((x, y, x + 224, y + 224))) for x, y in boxes])


def test_lift_fivecrop_boxes_after_resize_248():
    # short side 300 -> 248, long side int(248 * 400 / 300) = 330; 224 crops: the corners at
    # x in {0, 248 - 224 = 24}, y in {0, 330 - 224 = 106}, the center at (round(24 / 2), round(106 / 2)) = (12, 53)
    views = make_views("fivecrop", None, CFG, resize=248, interpolation="bilinear")
    boxes = [(0, 0), (24, 0), (0, 106), (24, 106), (12, 53)]  # torchvision's order: tl, tr, bl, br, center
    assert views.count == 5
    assert torch.equal(views(IMAGE, 0), pil_crops((248, 330), boxes, Image.BILINEAR))


def test_tencrop_adds_the_five_crops_of_the_mirrored_image():
    views = make_views("tencrop", None, CFG, resize=248, interpolation="bilinear")
    five = pil_crops((248, 330), [(0, 0), (24, 0), (0, 106), (24, 106), (12, 53)], Image.BILINEAR)
    # the mirrored image's top-left crop is the mirror of the top-right one, and so on
    assert views.count == 10
    assert torch.equal(views(IMAGE, 0), torch.cat([five, five[[1, 0, 3, 2, 4]].flip(-1)]))


def test_lift_center_view_resize_256_crop_224():
    # short side 300 -> 256, long side int(256 * 400 / 300) = 341; center at (round(32 / 2), round(117 / 2)) = (16, 58)
    views = make_views("center", None, CFG, resize=256, interpolation="bilinear")
    x = views(IMAGE, 0)
    assert x.shape == (1, 3, 224, 224)
    assert torch.equal(x, pil_crops((256, 341), [(16, 58)], Image.BILINEAR))
    torchvision = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])  # LIFT's test transform
    assert torch.equal(x[0], torchvision(IMAGE))


def test_flip_view_after_resize_is_the_center_crop_and_its_mirror():
    views = make_views("flip", None, CFG, resize=256)
    center = make_views("center", None, CFG, resize=256)(IMAGE, 0)
    assert views.count == 2 and torch.equal(views(IMAGE, 0), torch.cat([center, center.flip(-1)]))
    assert "bicubic" in views.description  # the model's resampling unless asked


def test_without_a_resize_the_views_are_todays():
    preprocess = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor()])
    assert isinstance(make_views("center", preprocess, CFG), CenterView)
    five = make_views("fivecrop", None, CFG)
    assert five.description == "fivecrop: resize 256 bicubic, crop 224, mean [0.0, 0.0, 0.0], std [1.0, 1.0, 1.0]"
    boxes = [(0, 0), (32, 0), (0, 117), (32, 117), (16, 58)]
    assert torch.equal(five(IMAGE, 0), pil_crops((256, 341), boxes, Image.BICUBIC))


def draw(transform, seed: int = 3) -> torch.Tensor:
    torch.manual_seed(seed)
    return transform(IMAGE)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_training_crop_resamples_as_asked(interpolation):
    mode = T.InterpolationMode(interpolation)
    by_hand = T.Compose([T.RandomResizedCrop(224, interpolation=mode), T.RandomHorizontalFlip(), T.ToTensor()])
    assert torch.equal(draw(train_transform(None, CFG, "model", True, interpolation)), draw(by_hand))
    other = T.InterpolationMode("bicubic" if interpolation == "bilinear" else "bilinear")
    by_other = T.Compose([T.RandomResizedCrop(224, interpolation=other), T.RandomHorizontalFlip(), T.ToTensor()])
    assert not torch.equal(draw(train_transform(None, CFG, "model", True, interpolation)), draw(by_other))
    assert interpolation in make_views("train", None, CFG, count=2, interpolation=interpolation).description


def test_default_training_crop_is_the_models_bicubic():
    default, bicubic = train_transform(None, CFG, "model", True), train_transform(None, CFG, "model", True, "bicubic")
    assert torch.equal(draw(default), draw(bicubic))


@pytest.mark.parametrize("resize, interpolation, flag", [
    (-1, None, "--eval-resize"), (True, None, "--eval-resize"), (256.0, None, "--eval-resize"),
    (None, "nearest", "--interpolation"),
])
def test_bad_view_options_are_one_line_errors(resize, interpolation, flag):
    with pytest.raises(LtclipError) as err:
        check_view_options(resize, interpolation)
    assert str(err.value).startswith(flag) and "\n" not in str(err.value)


def test_a_resize_below_the_resolution_is_refused():
    with pytest.raises(LtclipError, match="--eval-resize 200: must be at least the model's resolution 224"):
        make_views("center", None, CFG, resize=200)


# ---------------------------------------------------------------- LIFT+'s MDA (growing square crops)


def test_mda_smallest_area_per_epoch_follows_lift_plus_convex_curve():
    crop = GrowingSquareCrop(224, epochs=5, interpolation=T.InterpolationMode.BICUBIC)
    areas = []
    for epoch in range(5):
        crop.set_epoch(epoch)
        areas.append(crop.min_area())
    t = [e / 4 for e in range(5)]
    assert areas == pytest.approx([0.08 + 0.92 * (1 - (1 - x * x) ** 0.5) for x in t], rel=1e-12)
    assert areas == pytest.approx([0.08, 0.109, 0.203, 0.391, 1.0], abs=5e-4)  # LIFT+'s numbers over 5 epochs


def test_mda_crops_are_square_unflipped_and_no_smaller_than_the_epochs_area(monkeypatch):
    boxes = []
    real = image_batches.F.resized_crop

    def recording(image, top, left, height, width, size, interpolation):
        boxes.append((top, left, height, width))
        return real(image, top, left, height, width, size, interpolation)

    monkeypatch.setattr(image_batches.F, "resized_crop", recording)
    transform = train_transform(None, CFG, "model", True, "bicubic", crop="mda", epochs=5)
    crop = transform.transforms[0]
    assert isinstance(crop, GrowingSquareCrop) and len(transform.transforms) == 3  # crop, ToTensor, Normalize: no flip
    largest = 300 * 300 / (300 * 400)  # the largest square's share of the image
    for epoch in range(5):
        crop.set_epoch(epoch)
        boxes.clear()
        torch.manual_seed(epoch)
        for _ in range(50):
            assert transform(IMAGE).shape == (3, 224, 224)
        assert all(h == w and 0 <= top <= 400 - h and 0 <= left <= 300 - w for top, left, h, w in boxes)
        shares = [h * w / (300 * 400) for _, _, h, w in boxes]
        assert min(shares) >= min(crop.min_area(), largest) - 0.01 and max(shares) <= largest + 0.01
    assert {(h, w) for _, _, h, w in boxes} == {(300, 300)}  # the last epoch: the largest square only


def test_unknown_train_crop_is_refused():
    with pytest.raises(LtclipError, match="^--train-crop 'jitter': choose one of random, mda$"):
        train_transform(None, CFG, "model", True, crop="jitter")
