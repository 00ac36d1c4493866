"""`ltclip train-head`: learning on long-tailed Gaussian features, resume, streaming, errors."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import write_cache
from ltclip.cli import app
from ltclip.config import SecondStageConfig, TrainHeadConfig, from_flat
from ltclip.data.gaussian import gaussian_lt, nearest_mean_logits
from ltclip.artifacts.feature_batches import FeatureInputs
from ltclip.core.errors import LtclipError
from ltclip.evaluation.metrics import average_views, evaluate
from ltclip.engine import lr_factor
from ltclip.artifacts.runs import load_run
from ltclip.stages.second_stage import run_second_stage
from ltclip.stages.train_head import run_train_head
from ltclip.artifacts.store import FeatureCache

runner = CliRunner()


@pytest.fixture(scope="module")
def places_profile(places_profile_counts) -> np.ndarray:
    """100 classes spanning the real Places-LT train profile (4,980 … 5 images per class)."""
    counts = np.sort(places_profile_counts)[::-1]
    return counts[np.linspace(0, 364, 100).astype(int)]


@pytest.fixture(scope="module")
def gaussian(places_profile, tmp_path_factory):
    means, splits = gaussian_lt(0, places_profile, dim=32, separation=4.0, eval_per_class={"val": 50, "test": 50})
    root = tmp_path_factory.mktemp("gaussian")
    for split, (x, y) in splits.items():
        write_cache(root / "features", split, x, y, len(places_profile))
    x, y = splits["test"]
    bayes = evaluate(nearest_mean_logits(x, means), y, places_profile)  # the Bayes rule
    return root, bayes


def test_metrics(run_dir: Path, features: Path, counts) -> dict:
    run = load_run(run_dir)
    with FeatureCache(features / "test.h5") as cache:
        logits = average_views(run.model.predict(FeatureInputs(cache, run.model.head.input)))
        return evaluate(logits, cache.labels, counts)


test_metrics.__test__ = False  # a helper, not a test


def train(root: Path, name: str, **kw) -> Path:
    cfg = from_flat(TrainHeadConfig, {"features": str(root / "features"), "out": str(root / name), "device": "cpu", **kw}, owner="test")
    run_train_head(cfg)
    return root / name


@pytest.mark.slow
def test_balanced_losses_and_crt_beat_cross_entropy_on_the_tail(gaussian, places_profile):
    root, bayes = gaussian
    common = dict(head="linear", head_opts={"normalize": False, "scale": 0.0}, epochs=10, lr=3e-2)  # lr for plain logits
    ce = test_metrics(train(root, "ce", loss="ce", **common), root / "features", places_profile)
    results = {"ce": ce}
    for loss in ("balanced_softmax", "logit_adjusted"):
        results[loss] = test_metrics(train(root, loss, loss=loss, **common), root / "features", places_profile)
    crt = from_flat(SecondStageConfig, {"out": str(root / "crt"), "from_run": str(root / "ce"), "two_stage": "crt", "epochs": 10,
                                        "batch_size": 256, "weight_decay": 1e-4, "device": "cpu"}, owner="test")
    run_second_stage(crt)
    results["crt"] = test_metrics(root / "crt", root / "features", places_profile)
    for name, m in results.items():
        if name == "ce":
            continue
        assert m["balanced_accuracy"] > ce["balanced_accuracy"] + 3, (name, m["balanced_accuracy"], ce["balanced_accuracy"])
        assert m["few"] > ce["few"] + 15, (name, m["few"], ce["few"])
        assert m["medium"] > ce["medium"] + 2, (name, m["medium"], ce["medium"])
        assert m["balanced_accuracy"] <= bayes["balanced_accuracy"] + 1.5  # nothing beats the optimum (MC noise)


def head_weights(run: Path) -> dict:
    return torch.load(run / "model.pt", weights_only=False)["head"]["state_dict"]


@pytest.mark.parametrize("order", [{}, {"read_blocks": 4, "shuffle_pool": 2}], ids=["sampler-order", "block-shuffled"])
def test_streamed_tokens_train_exactly_like_tokens_in_ram(tmp_path, order):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), [30, 12, 6, 3])
    tokens = rng.standard_normal((len(y), 5, 16)).astype(np.float32) + y[:, None, None] * 0.3
    for split in ("train", "val"):
        write_cache(tmp_path / "features", split, tokens[:, 0], y, 4, tokens=tokens)
    kw = dict(head="decoder", head_opts={"depth": 1, "heads": 2}, epochs=2, batch_size=8, loss="balanced_softmax", **order)
    in_ram = train(tmp_path, "ram", **kw)
    streamed = train(tmp_path, "stream", max_ram="6K", **kw)  # the cache: 8,160 bytes of tokens; a pool: 1,280
    assert json.loads((streamed / "run.json").read_text())["inputs_in_ram"] is False
    a, b = head_weights(in_ram), head_weights(streamed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    if order:  # the block order is recorded, and is not the sampler's order
        assert json.loads((streamed / "config.json").read_text())["read_blocks"] == 4
        plain = head_weights(train(tmp_path, "plain", **{**kw, "read_blocks": 0, "shuffle_pool": None}))
        assert not all(torch.equal(a[k], plain[k]) for k in a)
        with pytest.raises(LtclipError, match=r"reads 32 rows \(5.0 KiB\) at a time and holds up to 3 such reads, above --max-ram 6.0 KiB"):
            train(tmp_path, "too-big", max_ram="6K", **{**kw, "read_blocks": 16})


def test_user_brought_minimal_cache_trains(tmp_path):
    """A file with only embeds, labels, schema_version and num_classes is a cache too."""
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), [20, 8, 4])
    (tmp_path / "features").mkdir()
    with h5py.File(tmp_path / "features" / "train.h5", "w") as f:
        f["embeds"] = (rng.standard_normal((len(y), 8)) + y[:, None]).astype(np.float16)
        f["labels"] = y.astype(np.int32)
        f.attrs["schema_version"] = 1
        f.attrs["num_classes"] = 3
    run = train(tmp_path, "run", head="linear", epochs=2)
    info = json.loads((run / "run.json").read_text())
    assert info["class_counts"] == [20, 8, 4] and info["best"] is None  # no val split: last epoch kept


def test_config_file_sets_options_and_the_saved_config_reruns(gaussian, tmp_path):
    root, _ = gaussian
    cfg = tmp_path / "exp.toml"
    cfg.write_text('head = "cosine"\nloss = "ldam"\nloss-opts = ["drw_epoch=1"]\nepochs = 2\nlr = 0.01\n')
    out = tmp_path / "run"
    result = runner.invoke(app, ["train-head", "--config", str(cfg), "--features", str(root / "features"), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["method"]["head"] == "cosine" and saved["method"]["loss"] == "ldam" and saved["method"]["loss_opts"] == {"drw_epoch": 1}
    from ltclip.stages.train_head import load_train_config

    again = load_train_config(out / "config.json")
    assert again.method.loss_opts == {"drw_epoch": 1} and again.optim.epochs == 2  # parsed once, typed
    rerun = tmp_path / "rerun"
    result = runner.invoke(app, ["train-head", "--config", str(out / "config.json"), "--out", str(rerun)])
    assert result.exit_code == 0, result.output
    a = torch.load(out / "model.pt", weights_only=False)["head"]["state_dict"]
    b = torch.load(rerun / "model.pt", weights_only=False)["head"]["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # same config file, same numbers
    cfg.write_text("epohcs = 3\n")
    result = runner.invoke(app, ["train-head", "--config", str(cfg), "--features", str(root / "features"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "unknown key(s) epohcs" in result.output


def test_divergence_stops_with_a_clear_message(gaussian, tmp_path):
    root, _ = gaussian
    result = runner.invoke(app, ["train-head", "--features", str(root / "features"), "--out", str(tmp_path / "nan"), "--head", "linear",
                                 "--optimizer", "sgd", "--lr", "1e30", "--epochs", "2", "--device", "cpu"])
    assert result.exit_code == 1 and "loss became" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "nan" / "model.pt").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--head", "decoder"], "needs token sequences"),
        (["--loss", "balanced_softmx"], "did you mean balanced_softmax"),
        (["--sampler", "balanced"], "--sampler 'balanced'"),
        (["--loss-opt", "gamma=2"], "not an option of loss 'ce'"),
        (["--loss", "focal", "--loss-opt", "gamma=-1"], "gamma must be >= 0"),  # the loss's own check, before training
        (["--loss", "ldam", "--loss-opt", "drw_at=2"], "drw_at is a fraction of training"),
        (["--resume"], "holds no interrupted run"),
        (["--max-ram", "lots"], "--max-ram"),
        (["--shuffle-pool", "4"], "give --read-blocks ROWS too"),
        (["--read-blocks", "-8"], "--read-blocks -8: must be an integer >= 0"),
        (["--two-stage", "crt"], "--two-stage: not an option of stage 1"),
    ],
)
def test_bad_options_are_one_line_errors(gaussian, tmp_path, args, message):
    root, _ = gaussian
    result = runner.invoke(app, ["train-head", "--features", str(root / "features"), "--out", str(tmp_path / "r"), "--head", "linear", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()  # refused before the run folder is written


def test_lr_schedule_shapes():
    assert [lr_factor(s, 10, 2, "cosine") for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0) and lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0)
    assert [lr_factor(s, 10, 0, "step") for s in (0, 6, 8)] == pytest.approx([1.0, 0.1, 0.01])


def test_existing_run_is_not_overwritten(gaussian, tmp_path):
    root, _ = gaussian
    train(root, "once", head="linear", epochs=1)
    with pytest.raises(LtclipError, match="already holds a run"):
        train(root, "once", head="linear", epochs=1)


def test_nearest_mean_scores_rank_like_euclidean_distance():
    means, splits = gaussian_lt(3, [5, 3, 2], dim=4, separation=2.0, eval_per_class={"test": 20})
    x, _ = splits["test"]
    brute = np.array([[np.sum((xi - m) ** 2) for m in means] for xi in x])
    np.testing.assert_allclose(nearest_mean_logits(x, means) - nearest_mean_logits(x, means)[:, :1],
                               -(brute - brute[:, :1]), rtol=1e-6, atol=1e-6)
