"""The seed paper's (Imbalance-VLM's) image protocol on the cache road: ImageNet mean/std and
Resize 256 + CenterCrop 224 for val/test (``extract --normalize imagenet``, ``--recipe imbalance-vlm``),
recorded in the cache, and folders mixing normalisations or test views refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from typer.testing import CliRunner

from conftest import TINY_MODEL
from ltclip.artifacts.store import FeatureCache
from ltclip.cli import app
from ltclip.config import ExtractConfig, ReproduceConfig
from ltclip.core.errors import LtclipError
from ltclip.data.image_batches import mean_std
from ltclip.data.views import make_views
from ltclip.models.backbone import load_backbone
from ltclip.recipes import load_recipe
from ltclip.recipes.resolve import extract_config, finetune_config
from ltclip.stages.extract import _normalized, _views_for
from ltclip.stages.reproduce import Plan

runner = CliRunner()
SEED_MEAN, SEED_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # imblearn/datasets/cv_datasets/imagenet_lt.py


def image(width=300, height=260, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def seed_eval(resize: int, crop: int) -> T.Compose:
    """The seed code's val/test transform, as its get_data_transform writes it (Resize's default: bilinear)."""
    return T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), T.Normalize(SEED_MEAN, SEED_STD)])


def test_imagenet_normalisation_and_resize_256_are_the_seed_codes_val_transform():
    cfg = {"size": 224, "mean": (0.1, 0.2, 0.3), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic"}  # a model's own
    mean, std = mean_std(cfg, "imagenet")
    views = make_views("center", None, {**cfg, "mean": mean, "std": std}, resize=256, interpolation="bilinear")
    for seed, size in enumerate([(300, 260), (260, 400), (224, 224)]):
        x = image(*size, seed=seed)
        assert torch.allclose(views(x, 0)[0], seed_eval(256, 224)(x), atol=1e-6)


def test_extract_views_at_the_tiny_models_resolution_match_torchvision():
    """extract's own path (--normalize imagenet, --eval-resize, --interpolation bilinear) at the tiny
    model's resolution against the equivalent torchvision pipeline; train keeps the model's geometry."""
    backbone = _normalized(load_backbone(TINY_MODEL, "none"), "imagenet")
    size = int(backbone.preprocess_cfg["size"][0] if isinstance(backbone.preprocess_cfg["size"], (tuple, list))
               else backbone.preprocess_cfg["size"])
    resize = round(size * 256 / 224)
    cfg = ExtractConfig(out="x", normalize="imagenet", eval_resize=resize, interpolation="bilinear")
    x = image()
    assert torch.allclose(_views_for(cfg, "test", backbone)(x, 0)[0], seed_eval(resize, size)(x), atol=1e-6)
    own = load_backbone(TINY_MODEL, "none").preprocess  # the model's resize and crop, then ImageNet's Normalize
    geometry = T.Compose([t for t in own.transforms if not isinstance(t, T.Normalize)])
    expected = T.Normalize(SEED_MEAN, SEED_STD)(geometry(x))
    assert torch.allclose(_views_for(cfg, "train", backbone)(x, 0)[0], expected, atol=1e-6)
    assert not torch.allclose(own(x), expected)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint


def extract(root, out, checkpoint, *extra):
    args = ["extract", "--data-root", str(root), "--model", TINY_MODEL, "--pretrained", str(checkpoint), "--out", str(out),
            "--workers", "0", "--batch-size", "32", "--device", "cpu", "--no-tokens", "--splits", "train,val", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def caches(synthetic_root, checkpoint, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("caches")
    made = {"model": base / "model", "imagenet": base / "imagenet", "resized": base / "resized"}
    extract(synthetic_root, made["model"], checkpoint)
    extract(synthetic_root, made["imagenet"], checkpoint, "--normalize", "imagenet")
    extract(synthetic_root, made["resized"], checkpoint, "--eval-resize", "40", "--interpolation", "bilinear")
    return made


def test_the_cache_records_its_normalisation_and_test_view(caches):
    for split in ("train", "val"):
        with FeatureCache(caches["model"] / f"{split}.h5") as default, FeatureCache(caches["imagenet"] / f"{split}.h5") as seed:
            assert (default.attrs["normalize"], seed.attrs["normalize"]) == ("model", "imagenet")
            assert default.attrs["eval_view"] == seed.attrs["eval_view"] == "center: the model's preprocessing"
            assert "0.485" in seed.attrs["views_description"] and "0.485" not in default.attrs["views_description"]
            assert not np.allclose(default.load_embeds(), seed.load_embeds(), atol=1e-3)
    with FeatureCache(caches["resized"] / "train.h5") as train:
        assert train.attrs["eval_view"] == "center: resize 40 bilinear, crop 32"  # every split: the folder's val/test view
    assert json.loads((caches["imagenet"] / "extract.json").read_text())["config"]["normalize"] == "imagenet"


@pytest.mark.parametrize("other, key, option", [("imagenet", "normalize", "--normalize"),
                                                ("resized", "eval_view", "--test-views, --eval-resize and --interpolation")])
def test_a_val_cache_of_another_extraction_beside_train_is_refused_in_one_line(caches, tmp_path, other, key, option):
    folder = tmp_path / "mixed"
    shutil.copytree(caches["model"], folder)
    shutil.copy(caches[other] / "val.h5", folder / "val.h5")
    with pytest.raises(LtclipError) as err:
        FeatureCache(folder / "val.h5")
    message = str(err.value)
    assert "\n" not in message and f"val.h5 was made with {key}=" in message and f"train.h5 beside it with {key}=" in message
    assert f"re-extract val.h5 with the same {option}" in message
    result = runner.invoke(app, ["train-head", "--features", str(folder), "--out", str(tmp_path / "run"), "--epochs", "1",
                                 "--device", "cpu"])
    assert result.exit_code != 0 and f"with {key}=" in result.output


def test_rerunning_extract_accepts_a_cache_from_before_the_attributes(caches, synthetic_root, checkpoint, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(caches["model"], folder)
    for split in ("train", "val"):
        with h5py.File(folder / f"{split}.h5", "r+") as h5:
            del h5.attrs["normalize"], h5.attrs["eval_view"]
    assert "train: up to date" in extract(synthetic_root, folder, checkpoint).output
    result = runner.invoke(app, ["extract", "--data-root", str(synthetic_root), "--model", TINY_MODEL, "--pretrained",
                                 str(checkpoint), "--out", str(folder), "--workers", "0", "--device", "cpu", "--no-tokens",
                                 "--splits", "train", "--normalize", "imagenet"])
    assert result.exit_code != 0 and "normalize" in result.output


def test_extract_recipe_imbalance_vlm_says_what_it_chose(synthetic_root, checkpoint, tmp_path):
    out = tmp_path / "seed"
    result = extract(synthetic_root, out, checkpoint, "--recipe", "imbalance-vlm")
    for line in ("--normalize: imagenet from --recipe imbalance-vlm", "--eval-resize: 256 from --recipe imbalance-vlm",
                 "--interpolation: bilinear from --recipe imbalance-vlm"):
        assert line in result.output
    with FeatureCache(out / "val.h5") as val:
        assert (val.attrs["normalize"], val.attrs["eval_view"]) == ("imagenet", "center: resize 256 bilinear, crop 32")


def test_recipe_tables_and_layering():
    recipe = load_recipe("imbalance-vlm")
    assert recipe.stages["extract"] == {"normalize": "imagenet", "eval_resize": 256, "interpolation": "bilinear"}
    said = []
    cfg = extract_config({"out": "o", "recipe": "imbalance-vlm", "normalize": "model"}, say=lambda o, t: said.append(o))
    assert (cfg.normalize, cfg.eval_resize, cfg.interpolation) == ("model", 256, "bilinear")  # an option given wins
    assert "--normalize" not in said and "--eval-resize" in said
    assert extract_config({"out": "o"}).normalize == "model"
    fine = finetune_config({"out": "o", "recipe": "imbalance-vlm"})
    assert (fine.normalize, fine.eval_resize, fine.interpolation) == ("imagenet", 256, "bilinear")
    # the seed's schedule steps every iteration in fp32, not finetune's LIFT defaults (per epoch, AMP)
    assert (fine.optim.schedule_unit, fine.optim.precision, fine.optim.select) == ("step", "fp32", "top1")
    with pytest.raises(LtclipError, match="--recipe lift: a recipe for finetune; extract cannot use it"):
        extract_config({"out": "o", "recipe": "lift"})
    with pytest.raises(LtclipError, match="--normalize 'cifar'"):
        from ltclip.stages.extract import run_extract
        run_extract(ExtractConfig(out="o", normalize="cifar"))  # before any data or model is read


def test_reproduce_extracts_with_the_recipe_for_imbalance_vlm_only(tmp_path):
    settings = dict(dataset="synthetic", data_root="d", out=str(tmp_path), model=TINY_MODEL, pretrained="none")
    seed, lift = Plan(ReproduceConfig(**settings)), Plan(ReproduceConfig(**settings, recipe="lift"))
    assert seed.steps()[0].args[-2:] == ["--recipe", "imbalance-vlm"]
    assert "--recipe" not in lift.steps()[0].args
    features = tmp_path / "features"  # a cache extracted with the model's normalisation
    features.mkdir()
    (features / "extract.json").write_text(json.dumps({"config": {"model": TINY_MODEL, "pretrained": "none",
                                                                  "data": {"dataset": "synthetic"}}}))
    (features / "text.h5").touch()
    (features / "train.h5").touch()
    with pytest.raises(LtclipError, match="extracted with another normalize, eval_resize, interpolation .*pass another --out"):
        seed.steps()[0].done()
