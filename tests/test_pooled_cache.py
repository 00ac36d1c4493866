"""LIFT's classifier on the cached road: `extract --pooled` stores the ViT's pre-projection feature
ln_post(CLS) (written, resumed, read back as `encode_pooled` gives it, joined from shards) and LIFT's
text start in text.h5; `train-head --head-opt input=pooled` on such a cache trains exactly what
`finetune --tune frozen --no-augment` trains on the same images."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_MODEL
from test_finetune import assert_cache_run_equals_frozen_finetune, data_args, records
from ltclip.artifacts.feature_batches import FeatureInputs
from ltclip.artifacts.store import FeatureCache, FeatureWriter, join_shards, load_text_embeddings, shard_path
from ltclip.cli import app
from ltclip.data.registry import load_dataset
from ltclip.models.backbone import load_backbone
from ltclip.models.text import SINGLE_TEMPLATE, text_classifier, to_pooled_space

runner = CliRunner()
LIFT_HEAD = ["--head", "cosine", "--head-opt", "input=pooled", "--head-opt", "init=text", "--head-opt", "templates=single",
             "--head-opt", "init_scale=25", "--head-opt", "learn_scale=false"]
TRAINING = ["--loss", "ce", "--epochs", "3", "--batch-size", "16", "--optimizer", "adamw", "--lr", "2e-3", "--weight-decay", "1e-4",
            "--warmup", "0", "--decay-1d", "--schedule-unit", "step", "--select", "last", "--device", "cpu"]


def ok(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def fails(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code != 0, result.output
    return result.output.strip().splitlines()[-1]


def extract(root: Path, out: Path, *extra):
    return ok("extract", *data_args(root), "--device", "cpu", "--workers", "0", "--no-tokens", "--out", out, *extra)


def model_outputs(root: Path, split: str):
    """The tiny model's float32 (embeds, pooled) of a split's images, its own preprocessing."""
    backbone = load_backbone(TINY_MODEL, "none")
    dataset = load_dataset("synthetic", root)
    x = torch.stack([backbone.preprocess(dataset.open_image(split, i)) for i in range(len(dataset.split(split)))])
    with torch.no_grad():
        return backbone.encode(x)[0], backbone.encode_pooled(x)


def test_extract_pooled_writes_resumes_and_reads_back_encode_pooled(synthetic_root, tmp_path):
    out = tmp_path / "features"
    extract(synthetic_root, out, "--pooled", "--splits", "val", "--block-size", "8")
    path = out / "val.h5"
    with h5py.File(path, "r+") as h5:  # a run killed after block 0: blocks 1.. never recorded as done
        assert h5["pooled"].dtype == np.float16 and h5.attrs["schema_version"] == 2
        assert h5["done"].size > 2
        h5["done"][1:] = 0
        h5["pooled"][8:] = 0
        h5.attrs.modify("complete", False)
    extract(synthetic_root, out, "--pooled", "--splits", "val", "--block-size", "8")  # resumes the missing blocks
    embeds, pooled = model_outputs(synthetic_root, "val")
    with FeatureCache(path) as cache:
        assert cache.complete and cache.has_pooled and cache.pooled_dim == pooled.shape[1] != cache.embed_dim
        stored = cache.load_pooled()
        assert stored.shape == (len(pooled), 1, pooled.shape[1]) and stored.dtype == np.float16
        np.testing.assert_allclose(stored[:, 0].astype(np.float32), pooled.numpy(), rtol=1e-2, atol=2e-3)
        np.testing.assert_allclose(cache.load_embeds()[:, 0].astype(np.float32), embeds.numpy(), rtol=1e-2, atol=2e-3)
        inputs = FeatureInputs(cache, "pooled")
        assert inputs.in_ram and inputs.row_shape == (1, pooled.shape[1])
        torch.testing.assert_close(inputs.rows(np.array([3, 0])), torch.from_numpy(stored[[3, 0]].astype(np.float32)))
    text = load_text_embeddings(out / "text.h5")  # LIFT's start: the single template mapped back through proj.T
    backbone = load_backbone(TINY_MODEL, "none")
    single = torch.from_numpy(text_classifier(backbone, text.classnames, [SINGLE_TEMPLATE]))
    assert text.pooled_template == SINGLE_TEMPLATE
    torch.testing.assert_close(torch.from_numpy(text.pooled), to_pooled_space(single, backbone.visual.proj))
    # a finished cache without the feature is refused for --pooled; an old cache (no pooled) still reads
    plain = tmp_path / "plain"
    extract(synthetic_root, plain, "--splits", "val")
    with FeatureCache(plain / "val.h5") as cache:
        assert not cache.has_pooled and cache.pooled_dim is None
        with pytest.raises(Exception, match="re-extract with --pooled"):
            FeatureInputs(cache, "pooled")
    assert "made without --pooled" in fails("extract", *data_args(synthetic_root), "--device", "cpu", "--workers", "0",
                                            "--no-tokens", "--out", plain, "--splits", "val", "--pooled")


def test_pooled_rows_join_from_shards_and_resume_checks_the_shape(tmp_path):
    rng = np.random.default_rng(0)
    n, d, w = 10, 4, 6
    embeds, pooled = rng.normal(size=(n, d)), rng.normal(size=(n, w))
    labels = np.arange(n) % 3
    common = dict(num_rows=n, embed_dim=d, block_size=3, attrs={"model": "m"}, labels=labels, classnames=list("abc"))
    out = tmp_path / "train.h5"
    for rank in range(2):
        with FeatureWriter.open(out, **common, shard=(rank, 2), pooled_dim=w) as writer:
            for block in writer.pending_blocks():
                lo, hi = writer.block_range(block)
                rows = slice(writer.row_start + lo, writer.row_start + hi)
                with pytest.raises(ValueError, match="needs pooled"):
                    writer.write_block(block, embeds[rows])
                writer.write_block(block, embeds[rows], pooled=pooled[rows])
            writer.finalise()
    join_shards([shard_path(out, r) for r in range(2)], out)
    with FeatureCache(out) as cache:
        np.testing.assert_array_equal(cache.load_pooled()[:, 0], pooled.astype(np.float16))
    with pytest.raises(Exception, match="pooled shape"):  # resuming asks for the same datasets
        FeatureWriter.open(out, **common)


def float32_pooled_cache(root: Path, folder: Path, text_from: Path) -> Path:
    """train/val caches of the tiny model's float32 embeds and pooled features, written with h5py, with the
    text.h5 of `extract --pooled`."""
    dataset = load_dataset("synthetic", root)
    folder.mkdir()
    for split in ("train", "val"):
        embeds, pooled = model_outputs(root, split)
        with h5py.File(folder / f"{split}.h5", "w") as f:
            f["embeds"], f["pooled"] = embeds.numpy(), pooled.numpy()
            f["labels"] = dataset.split(split).labels.astype(np.int32)
            f.attrs["schema_version"], f.attrs["num_classes"] = 2, dataset.num_classes
    shutil.copy(text_from / "text.h5", folder / "text.h5")
    return folder


@pytest.mark.slow  # about 1.6-2.2 s on 2 cores
def test_lift_classifier_from_the_cache_equals_frozen_finetune(synthetic_root, tmp_path):
    extracted = tmp_path / "extracted"
    extract(synthetic_root, extracted, "--pooled")
    cache = float32_pooled_cache(synthetic_root, tmp_path / "features", extracted)
    assert_cache_run_equals_frozen_finetune(cache, synthetic_root, tmp_path, [*LIFT_HEAD, *TRAINING])
    # the float16 cache extract wrote trains too, and its run evaluates on the cache
    fp16_run = tmp_path / "fp16"
    ok("train-head", "--features", extracted, "--out", fp16_run, *LIFT_HEAD, *TRAINING)
    assert records(fp16_run)[0]["loss"] == pytest.approx(records(tmp_path / "head")[0]["loss"], rel=1e-2)
    ok("eval", fp16_run, "--features", extracted, "--split", "val")


def test_cache_without_pooled_is_a_one_line_error(synthetic_root, tmp_path):
    plain = tmp_path / "plain"
    extract(synthetic_root, plain, "--splits", "train,val")
    line = fails("train-head", "--features", plain, "--out", tmp_path / "run", *LIFT_HEAD, *TRAINING)
    assert "re-extract with --pooled" in line
    pooled = tmp_path / "pooled"
    extract(synthetic_root, pooled, "--splits", "train,val", "--pooled")
    line = fails("train-head", "--features", pooled, "--out", tmp_path / "run2", "--head", "cosine", "--head-opt", "input=pooled",
                 "--head-opt", "init=text", *TRAINING)  # the dataset's templates: only finetune maps those back
    assert "single one for input=pooled" in line
