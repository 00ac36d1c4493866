"""The linear and MLP heads' logit scale (``scale``, ``learn_scale``): it multiplies the logits as
declared, runs saved before it rebuild and predict exactly as before, and with it a small SGD step
(the papers' lr 0.05) trains a linear head on unit-norm features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import places_lt_train_counts, write_cache
from ltclip.artifacts.feature_batches import FeatureInputs
from ltclip.artifacts.runs import load_run
from ltclip.artifacts.store import FeatureCache
from ltclip.core.errors import LtclipError
from ltclip.data.gaussian import gaussian_lt
from ltclip.evaluation.metrics import average_views, evaluate
from ltclip.models.heads import HEADS, HeadInputs, create_head, rebuild_head
from ltclip.recipes.resolve import stage_one_config
from ltclip.stages.train_head import run_train_head

C, D = 5, 8


def test_the_scale_multiplies_the_linear_heads_logits_by_hand():
    head = create_head("linear", HeadInputs(C, D), scale=4.0, learn_scale=False).eval()
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(0))
    w, b = head.classifier.weight.detach(), head.classifier.bias.detach()
    by_hand = [[4.0 * (sum(w[j, i].item() * v for i, v in enumerate(F.normalize(row, dim=0).tolist())) + b[j].item())
                for j in range(C)] for row in x]
    assert torch.allclose(head(x), torch.tensor(by_hand), atol=1e-5)
    assert "classifier.logit_scale" in dict(head.named_buffers()) and not any("scale" in n for n, _ in head.named_parameters())


def test_the_scale_multiplies_the_mlp_heads_logits_and_is_learned_by_default():
    head = create_head("mlp", HeadInputs(C, D)).eval()
    assert head.config["scale"] == HEADS.options("mlp")["scale"] == 16.0 and head.config["learn_scale"] is True
    x = torch.randn(3, D)
    with torch.no_grad():
        head.classifier.logit_scale.fill_(2.5)
        plain = F.linear(head.features(x), head.classifier.weight, head.classifier.bias)
    assert torch.allclose(head(x), 2.5 * plain, atol=1e-6)
    head(x).sum().backward()
    assert head.classifier.logit_scale.grad is not None


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_a_scaled_head_starts_from_the_unscaled_heads_logits(name):
    torch.manual_seed(3)
    scaled = create_head(name, HeadInputs(C, D), scale=16.0).eval()
    torch.manual_seed(3)
    plain = create_head(name, HeadInputs(C, D), scale=0.0).eval()
    x = torch.randn(4, D)
    assert type(plain.classifier) is nn.Linear
    assert torch.allclose(scaled(x), plain(x), atol=1e-6)


def test_a_negative_scale_is_refused_naming_the_option():
    with pytest.raises(LtclipError, match="--head-opt scale=-1.0"):
        create_head("linear", HeadInputs(C, D), scale=-1.0)


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_a_run_saved_before_the_scale_rebuilds_and_predicts_exactly_as_before(name):
    old = create_head(name, HeadInputs(C, D), scale=0.0).eval()
    config = {k: v for k, v in old.config.items() if k not in ("scale", "learn_scale")}  # what old runs saved
    state = old.state_dict()
    assert not any("logit_scale" in key for key in state)
    rebuilt = rebuild_head(name, config)
    rebuilt.load_state_dict(state)  # strict: the same keys as before
    rebuilt.eval()
    assert type(rebuilt.classifier) is nn.Linear and rebuilt.config["scale"] == 0.0
    x = torch.randn(6, D)
    assert torch.equal(rebuilt(x), old(x))
    new = create_head(name, HeadInputs(C, D))  # a new run gets the measured default and saves it
    assert rebuild_head(name, new.config).config["scale"] == 16.0


@pytest.fixture(scope="module")
def places_unit_cache(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """The Places-LT train counts (365 classes, 4,980 … 5 images; 62,500 rows), 32-d Gaussians around
    means at radius 3.5, rows L2-normalised."""
    counts = np.sort(places_lt_train_counts())[::-1]
    _, splits = gaussian_lt(0, counts, 32, 3.5, {"val": 10, "test": 20})
    root = tmp_path_factory.mktemp("scale") / "features"
    for split, (x, y) in splits.items():
        write_cache(root, split, x / np.linalg.norm(x, axis=1, keepdims=True), y, len(counts))
    return root, counts


def sgd_run(root: Path, out: Path, counts, loss: str) -> dict:
    """``train-head --head linear --optimizer sgd --lr 0.05 --epochs 20 --loss LOSS``, scored on the balanced test split."""
    run_train_head(stage_one_config({"features": str(root), "out": str(out), "device": "cpu", "head": "linear",
                                     "loss": loss, "optimizer": "sgd", "lr": 0.05, "epochs": 20}))
    run = load_run(out)
    with FeatureCache(root / "test.h5") as cache:
        return evaluate(average_views(run.model.predict(FeatureInputs(cache, run.model.head.input))), cache.labels, counts)


@pytest.mark.slow  # ~11 s: two 20-epoch runs on the Places-LT profile's rows
def test_with_the_papers_sgd_step_balanced_softmax_beats_ce_on_unit_norm_features(places_unit_cache, tmp_path):
    root, counts = places_unit_cache
    balanced = sgd_run(root, tmp_path / "bs", counts, "balanced_softmax")
    ce = sgd_run(root, tmp_path / "ce", counts, "ce")
    # measured 53.9 / 43.7 overall, 55.0 / 41.1 on medium classes (few 38.4 / 8.0)
    assert balanced["balanced_accuracy"] >= ce["balanced_accuracy"] + 5, (balanced, ce)
    assert balanced["medium"] >= ce["medium"] + 10, (balanced, ce)
    assert balanced["balanced_accuracy"] >= 45, balanced  # it learns: 1/365 is chance


def test_crt_restarts_a_scaled_classifier_as_a_plain_one():
    """cRT's step (lr 1.0) is set for plain logits: a logit-scaled classifier restarts at scale 1,
    with the same weights a plain nn.Linear draws from the seed, so it trains as it did before scales."""
    from ltclip.methods.second_stage.methods import ClassifierRetraining
    from ltclip.models.heads.embedding import scaled_classifier

    scaled = ClassifierRetraining(scaled_classifier(8, 5, 16.0, True), in_dim=8, num_classes=5)
    plain = ClassifierRetraining(scaled_classifier(8, 5, 0.0, True), in_dim=8, num_classes=5)
    scaled.reinitialise(seed=3)
    plain.reinitialise(seed=3)
    z = torch.randn(4, 8)
    assert float(scaled.classifier.logit_scale.detach()) == 1.0
    torch.testing.assert_close(scaled(z), plain(z), rtol=0, atol=0)


def test_tau_norm_keeps_a_scaled_classifiers_logit_scale():
    """τ = 0 gives the stage-1 logits without the bias, whether or not the classifier scales them."""
    from ltclip.methods.second_stage.methods import TauNormalisation
    from ltclip.models.heads.embedding import scaled_classifier

    torch.manual_seed(0)
    scaled = scaled_classifier(8, 5, 16.0, True)
    z = torch.randn(4, 8)
    norm = TauNormalisation(scaled, in_dim=8, num_classes=5, tau=0.0)
    torch.testing.assert_close(norm(z), scaled(z) - scaled.logit_scale * scaled.bias)
