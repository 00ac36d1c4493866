"""The toy CLIP (`ltclip pretrain-toy`): contrastive pretraining through the engine, an open_clip-loadable
checkpoint, zero-shot far above chance on the synthetic set, the cache, determinism and bad options."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import TINY_MODEL, TOY_CLIP
from ltclip.cli import app
from ltclip.data.synthetic import synthetic_classnames
from ltclip.core.errors import LtclipError
from ltclip.models.backbone import load_backbone
from ltclip.stages.toy_clip import (
    CAPTIONS, CHECKPOINT_FILE, INFO_FILE, ToyClipSettings, build_model, pretrain_toy_clip, pretraining_image,
)

runner = CliRunner()
TINY = ToyClipSettings(model=TINY_MODEL, classes=4, images_per_class=4, steps=3, batch_size=8)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def clip_loss_on_pairs(model, tokenizer, preprocess, classes: int, per_class: int) -> float:
    """open_clip's ClipLoss on a fixed batch of pretraining pairs (one image per row, the plain caption)."""
    from open_clip.loss import ClipLoss

    labels = np.repeat(np.arange(classes), per_class)
    images = torch.stack([preprocess(pretraining_image(int(c), i % per_class, 32, 0)) for i, c in enumerate(labels)])
    names = synthetic_classnames(classes)
    tokens = tokenizer([CAPTIONS[1].format(names[c]) for c in labels])
    with torch.no_grad():
        return ClipLoss()(*model.eval()(images, tokens)[:3]).item()


@pytest.mark.slow  # the first test of the toy_clip fixture pretrains the toy CLIP (~5 s)
def test_pretraining_lowers_the_contrastive_loss(toy_clip):
    info = json.loads((toy_clip.parent / INFO_FILE).read_text())
    assert info["settings"] == {**ToyClipSettings().__dict__, **TOY_CLIP} and info["steps"] == TOY_CLIP["steps"]
    # one image of each of the 10 concepts: a batch without duplicate captions, chance loss ln(10)
    untrained, preprocess, tokenizer = build_model(TINY_MODEL, seed=0)
    before = clip_loss_on_pairs(untrained, tokenizer, preprocess, 10, 1)
    after = clip_loss_on_pairs(load_backbone(TINY_MODEL, str(toy_clip)).model, tokenizer, preprocess, 10, 1)
    assert before == pytest.approx(math.log(10), rel=0.15)
    assert after < 0.5 * before
    assert info["loss_per_epoch"][-1] < 0.6 * info["loss_per_epoch"][0]


@pytest.mark.slow  # uses the pretrained toy (run alone, its fixture pretrains it)
def test_checkpoint_loads_through_the_backbone_loader_with_identical_outputs(toy_clip):
    backbone = load_backbone(TINY_MODEL, str(toy_clip))
    info = json.loads((toy_clip.parent / INFO_FILE).read_text())
    assert backbone.identity["checkpoint_sha256"] == info["checkpoint_sha256"]
    model, preprocess, tokenizer = build_model(TINY_MODEL, seed=123)  # other random weights, then the saved ones
    model.load_state_dict(torch.load(toy_clip, weights_only=True))
    model.eval().requires_grad_(False)  # as the loader leaves it (frozen: the same attention kernels)
    image = pretraining_image(3, 0, 32, 5)
    assert torch.equal(backbone.preprocess(image), preprocess(image))  # the preprocessing pretraining used
    x, text = preprocess(image)[None], tokenizer(["a photo of a red circle.", "a purple star"])
    with torch.no_grad():
        assert torch.equal(backbone.model.encode_image(x), model.encode_image(x))
        assert torch.equal(backbone.model.encode_text(text), model.encode_text(text))
        assert not torch.equal(build_model(TINY_MODEL, seed=123)[0].eval().encode_image(x), model.encode_image(x))


@pytest.mark.slow  # uses the pretrained toy (run alone, its fixture pretrains it)
def test_zero_shot_through_extract_and_eval_is_far_above_chance(toy_clip, synthetic_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # extract records its cache in ./ltclip.toml: not in the other tests' folder
    features, report = tmp_path / "features", tmp_path / "zero_shot.json"
    result = invoke("extract", "--dataset", "synthetic", "--data-root", synthetic_root, "--model", TINY_MODEL,
                    "--pretrained", toy_clip, "--out", features, "--workers", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    result = invoke("eval", "--zero-shot", "--features", features, "--json", report)
    assert result.exit_code == 0, result.output
    zero_shot = json.loads(report.read_text())["results"][0]
    chance = 100 / len(synthetic_classnames(10))
    assert zero_shot["kind"] == "zero-shot" and zero_shot["top1"] > 4 * chance


def test_pretraining_images_are_none_of_the_synthetic_sets_images(synthetic_root):
    folder = synthetic_classnames(10)[2].replace(" ", "_")
    for split in ("train", "val", "test"):
        drawn = np.asarray(Image.open(synthetic_root / split / folder / "0000.png").convert("RGB"))
        assert not np.array_equal(drawn, np.asarray(pretraining_image(2, 0, 32, 0)))
    assert np.array_equal(np.asarray(pretraining_image(2, 0, 32, 0)), np.asarray(pretraining_image(2, 0, 32, 0)))


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    sha = [pretrain_toy_clip(tmp_path / name, ToyClipSettings(**{**TINY.__dict__, "seed": seed}))["checkpoint_sha256"]
           for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    assert sha[0] == sha[1] != sha[2]


def test_a_second_call_returns_the_cached_toy_without_training(tmp_path, monkeypatch):
    out = tmp_path / "toy"
    first = pretrain_toy_clip(out, TINY)
    assert not first["cached"] and sorted(p.name for p in out.iterdir()) == sorted([CHECKPOINT_FILE, INFO_FILE])

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr("ltclip.engine.fit", no_training)
    again = pretrain_toy_clip(out, TINY)
    assert again["cached"] and {**again, "cached": False} == first
    result = invoke("pretrain-toy", "--out", out, "--model", TINY.model, "--classes", TINY.classes, "--images-per-class",
                    TINY.images_per_class, "--steps", TINY.steps, "--batch-size", TINY.batch_size)
    assert result.exit_code == 0, result.output
    assert "toy CLIP cached: 3 steps on 16 image–caption pairs" in result.output
    assert f"--model {TINY_MODEL} --pretrained {out / CHECKPOINT_FILE}" in result.output


def test_a_folder_holding_another_toy_or_a_changed_checkpoint_is_refused(tmp_path):
    out = tmp_path / "toy"
    pretrain_toy_clip(out, TINY)
    result = invoke("pretrain-toy", "--out", out, "--model", TINY.model, "--classes", TINY.classes, "--images-per-class",
                    TINY.images_per_class, "--steps", 4, "--batch-size", TINY.batch_size)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == (f"error: {out} holds a toy CLIP trained with --steps 3, not 4; "
                                                      "choose another --out (or the same options)")
    other = tmp_path / "other"
    shutil.copytree(out, other)
    (other / CHECKPOINT_FILE).write_bytes(b"changed")
    with pytest.raises(LtclipError, match="missing or changed since it was trained"):
        pretrain_toy_clip(other, TINY)


@pytest.mark.parametrize("option, value, message", [
    ("--classes", 1, "--classes 1: must be an integer in [2, 192]"),
    ("--classes", 500, "--classes 500: must be an integer in [2, 192]"),
    ("--images-per-class", 0, "--images-per-class 0: must be an integer >= 1"),
    ("--steps", 0, "--steps 0: must be an integer >= 1"),
    ("--batch-size", 1, "--batch-size 1: must be an integer >= 2"),
    ("--lr", 0, "--lr 0: must be > 0"),
    ("--weight-decay", -1, "--weight-decay -1: must be >= 0"),
    ("--seed", -1, "--seed -1: must be an integer >= 0"),
    ("--model", "ltclip-tiny-vt", "--model 'ltclip-tiny-vt': unknown open_clip model (close: ltclip-tiny-vit"),
    ("--model", "local-dir:/x", "--model local-dir:/x: name an open_clip architecture"),
])
def test_bad_options_are_one_line_errors(tmp_path, option, value, message):
    result = invoke("pretrain-toy", "--out", tmp_path / "toy", option, value)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len([line for line in lines if line.startswith("error:")]) == 1 and message in lines[-1], result.output
    assert not (tmp_path / "toy").exists()
