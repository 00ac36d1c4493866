"""Heads against independent references: nn.MultiheadAttention blocks, closed-form parameter
counts, zero-shot logits, numpy cosines, and torch's FLOP counter for the cost estimates."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ltclip.core.errors import LtclipError
from ltclip.models.cost import count_params, head_flops, vit_flops
from ltclip.models.heads import (HEADS, CosineClassifier, HeadInputs, create_head, head_needs, list_heads,
                                 rebuild_head, training_defaults)

C, D, T, W = 7, 24, 9, 32
TEXT = F.normalize(torch.randn(C, D, generator=torch.Generator().manual_seed(1)), dim=-1)


def build(name, seed=0, **params):
    torch.manual_seed(seed)
    return create_head(name, HeadInputs(C, D, (T, W), TEXT), **params).eval()


def batch(head, n=5, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, T, W, generator=g) if head.input == "tokens" else torch.randn(n, D, generator=g)


def test_registry_lists_every_head():
    here = [n for n in list_heads() if not head_needs(n).text_encoder]  # the prompt head: test_text_prompts.py
    assert here == ["cosine", "decoder", "linear", "mlp", "text-init"]
    assert [build(n).input for n in here] == ["embeds", "tokens", "embeds", "embeds", "embeds"]
    assert HEADS.options("decoder") == {"depth": 3, "heads": 4, "mlp_ratio": 0.5, "qkv_bias": True, "dropout": 0.0, "final_norm": True}


@pytest.mark.parametrize("name", ["cosine", "decoder", "linear", "mlp", "text-init"])
def test_head_contract(name):
    head = build(name)
    assert head.name == name
    x = batch(head)
    logits = head(x)
    feats = head.features(x)
    assert logits.shape == (5, C)
    assert feats.shape == (5, head.feature_dim)
    assert torch.equal(head.classifier(feats), logits)
    assert torch.equal(build(name)(x), logits)  # same seed, same head

    with torch.no_grad():  # move away from the initial weights so the rebuild must load them
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    config = json.loads(json.dumps(head.config))
    assert "text_embeds" not in config
    torch.manual_seed(123)
    rebuilt = rebuild_head(name, config)
    rebuilt.load_state_dict(head.state_dict())
    rebuilt.eval()
    assert torch.equal(rebuilt(x), head(x))


def test_mlp_hidden_zero_means_embedding_size():
    assert build("mlp").feature_dim == D
    assert build("mlp", hidden=10).feature_dim == 10


def test_linear_without_normalisation_is_affine():
    head = build("linear", normalize=False)
    x = batch(head)
    torch.testing.assert_close(head(x), head.classifier.logit_scale * (x @ head.classifier.weight.T + head.classifier.bias))


# ---------------------------------------------------------------- decoder vs an independent reference


def layer_norm(x, ln):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def reference_block(block, x, heads):
    """The same block computed with nn.MultiheadAttention and hand-written LayerNorm / MLP."""
    mha = torch.nn.MultiheadAttention(x.shape[-1], heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(block.qkv.weight)
        mha.in_proj_bias.copy_(block.qkv.bias)
        mha.out_proj.weight.copy_(block.proj.weight)
        mha.out_proj.bias.copy_(block.proj.bias)
    mha.train()  # keeps nn.MultiheadAttention off its fused fast path
    h = layer_norm(x, block.norm1)
    x = x + mha(h, h, h, need_weights=False)[0]
    h = layer_norm(x, block.norm2)
    return x + (gelu(h @ block.fc1.weight.T + block.fc1.bias) @ block.fc2.weight.T + block.fc2.bias)


def test_decoder_matches_multihead_attention_reference():
    head = build("decoder", depth=2)
    with torch.no_grad():  # non-trivial LayerNorm and bias parameters
        for name, p in head.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("norm1.weight") else 0.0))
    x = batch(head)
    with torch.no_grad():
        ref = x
        for block in head.blocks:
            out = block(ref)
            ref = reference_block(block, ref, heads=4)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        ref = layer_norm(ref[:, 0], head.norm) @ head.classifier.weight.T + head.classifier.bias
        torch.testing.assert_close(head(x), ref, rtol=0, atol=1e-5)


def test_decoder_parameter_count_closed_form():
    depth, width, h = 3, W, int(W * 0.5)
    per_block = 4 * width + (3 * width**2 + 3 * width) + (width**2 + width) + (2 * width * h + h + width)
    expected = depth * per_block + 2 * width + (width * C + C)
    assert count_params(build("decoder")) == expected


def test_decoder_initialisation_is_timm_style():
    head = build("decoder")
    assert torch.equal(head.norm.weight, torch.ones(W)) and torch.equal(head.blocks[0].qkv.bias, torch.zeros(3 * W))
    w = torch.cat([b.fc1.weight.flatten() for b in head.blocks])
    assert abs(w.std().item() - 0.02) < 0.004


def test_count_params_trainable_only():
    head = build("cosine", learn_scale=False)
    assert count_params(head) == count_params(head, trainable_only=True) == C * D
    head.classifier.weight.requires_grad_(False)
    assert count_params(head, trainable_only=True) == 0


# ---------------------------------------------------------------- text-init and cosine


def test_text_init_reproduces_zero_shot_logits():
    head = build("text-init")
    x = batch(head)
    zero_shot = 100.0 * F.normalize(x, dim=-1) @ TEXT.T
    torch.testing.assert_close(head(x), zero_shot, rtol=1e-6, atol=1e-5)
    assert torch.equal(head(x).argmax(1), zero_shot.argmax(1))


def test_cosine_logits_match_numpy():
    head = build("cosine", init_scale=10.0)
    with torch.no_grad():
        head.classifier.scale.fill_(12.5)
    x = batch(head)
    xn, wn = x.double().numpy(), head.classifier.weight.detach().double().numpy()
    cos = (xn / np.linalg.norm(xn, axis=1, keepdims=True)) @ (wn / np.linalg.norm(wn, axis=1, keepdims=True)).T
    np.testing.assert_allclose(head(x).detach().numpy(), 12.5 * cos, rtol=1e-5, atol=1e-5)
    assert isinstance(head.classifier.scale, torch.nn.Parameter)
    head.classifier.reset_parameters()  # what cRT calls to re-initialise a classifier
    assert head.classifier.scale.item() == 10.0
    fixed = CosineClassifier(D, C, init_scale=3.0, learn_scale=False)
    assert "scale" in dict(fixed.named_buffers()) and "scale" not in dict(fixed.named_parameters())


# ---------------------------------------------------------------- errors and options


def test_decoder_without_tokens_is_refused():
    with pytest.raises(LtclipError, match="^--head decoder needs token sequences; re-extract with --tokens$"):
        create_head("decoder", HeadInputs(C, D))


def test_text_init_without_text_embeds_is_refused_unless_rebuilding():
    with pytest.raises(LtclipError, match="--head text-init starts from the class text embeddings"):
        create_head("text-init", HeadInputs(C, D))
    with pytest.raises(LtclipError, match=r"text embeddings have shape \(7, 3\)"):
        create_head("text-init", HeadInputs(C, D, text_embeds=torch.zeros(C, 3)))
    assert rebuild_head("text-init", {"num_classes": C, "embed_dim": D, "token_shape": None}).config["logit_scale"] == 100.0


def test_unknown_head_and_bad_options():
    with pytest.raises(LtclipError, match="unknown head 'linera'.*did you mean linear"):
        create_head("linera", HeadInputs(C, D))
    with pytest.raises(LtclipError, match="--head-opt depht: not an option of head 'decoder'"):
        build("decoder", depht=2)
    with pytest.raises(LtclipError, match="--head-opt heads=5: must divide the token width 32"):
        build("decoder", heads=5)
    with pytest.raises(LtclipError, match="--head-opt dropout=1.0"):
        build("mlp", dropout=1.0)
    with pytest.raises(LtclipError, match="--head-opt init_scale=0.0"):
        build("cosine", init_scale=0.0)


def test_parse_head_opts():
    assert HEADS.parse("decoder", ["depth=2", " heads = 8", "qkv_bias=false", "dropout=0.1"]) == {
        "depth": 2, "heads": 8, "qkv_bias": False, "dropout": 0.1,
    }
    assert HEADS.parse("cosine", ["learn_scale=yes"]) == {"learn_scale": True}
    with pytest.raises(LtclipError, match="must look like key=value"):
        HEADS.parse("decoder", ["depth"])
    with pytest.raises(LtclipError, match="'width' is not an option of head 'decoder'; valid keys: depth"):
        HEADS.parse("decoder", ["width=3"])
    with pytest.raises(LtclipError, match=r"depth='2.5': expected int"):
        HEADS.parse("decoder", ["depth=2.5"])
    with pytest.raises(LtclipError, match=r"qkv_bias='maybe': expected bool"):
        HEADS.parse("decoder", ["qkv_bias=maybe"])


# ---------------------------------------------------------------- cost estimates vs FlopCounterMode


def counted_macs(fn, *args) -> int:
    """Multiply-accumulates counted by torch (2 FLOPs per MAC).

    The counter does not see the fused CPU attention kernels, so attention runs on the math
    backend, whose matrix products it counts.
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops() // 2


def test_vit_flops_matches_flop_counter():
    import open_clip

    from ltclip.models.backbone import register_tiny_configs

    register_tiny_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("ltclip-tiny-vit")
    size = model.visual.image_size
    counted = counted_macs(model.encode_image, torch.zeros(3, 3, *size))
    # 1 %: dropping the attention term alone would be off by ~4 % on this tiny model
    assert abs(3 * vit_flops(model.visual, size) - counted) / counted < 0.01


@pytest.mark.parametrize("name", ["decoder", "mlp", "linear"])
def test_head_flops_matches_flop_counter(name):
    head = build(name)
    x = batch(head, n=4)
    counted = counted_macs(head, x)
    assert abs(head_flops(head, tuple(x.shape)) - counted) / counted < 0.01


def test_cosine_head_with_text_init_starts_as_scaled_zero_shot():
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    x = torch.randn(7, 8)
    head = create_head("cosine", HeadInputs(5, 8, text_embeds=text), init="text", init_scale=20.0)
    expected = 20.0 * torch.nn.functional.normalize(x, dim=1) @ text.T
    torch.testing.assert_close(head(x), expected)
    assert head_needs("cosine", {"init": "text"}).text_embeds and not head_needs("cosine").text_embeds
    with pytest.raises(LtclipError, match="--head cosine starts from the class text embeddings"):
        create_head("cosine", HeadInputs(5, 8), init="text")
    assert create_head("cosine", HeadInputs(5, 8)).config["init"] == "random"  # no text needed without init=text
    saved = {"num_classes": 5, "embed_dim": 8, "token_shape": None, "init_scale": 30.0, "learn_scale": False,
             "text_init": True}  # a run saved before `init`
    rebuilt = rebuild_head("cosine", saved)
    assert rebuilt.config["init"] == "text" and "text_init" not in rebuilt.config and rebuilt.classifier.weight.shape == (5, 8)
    assert rebuild_head("cosine", {**saved, "text_init": False}).config["init"] == "random"


def test_lift_cosine_head_is_25_cos_on_the_pooled_feature_with_a_fixed_scale():
    torch.manual_seed(0)
    text = F.normalize(torch.randn(5, 12), dim=1)  # already in the pooled space (finetune maps it)
    inputs = HeadInputs(5, 8, pooled_dim=12, text_embeds=text, text_templates="single")
    head = create_head("cosine", inputs, input="pooled", init="text", templates="single", init_scale=25.0,
                       learn_scale=False)
    assert head.input == "pooled" and head.feature_dim == 12 and head.config["pooled_dim"] == 12
    x = torch.randn(7, 12)
    cos = (x / x.norm(dim=1, keepdim=True)) @ (text / text.norm(dim=1, keepdim=True)).T
    logits = head(x)
    torch.testing.assert_close(logits, 25.0 * cos)
    logits.sum().backward()
    assert head.classifier.weight.grad is not None and head.classifier.scale.grad is None
    assert [n for n, _ in head.named_parameters()] == ["classifier.weight"]
    rebuilt = rebuild_head("cosine", json.loads(json.dumps(head.config)))
    rebuilt.load_state_dict(head.state_dict())
    assert rebuilt.input == "pooled" and torch.equal(rebuilt(x), logits)


def test_cosine_head_starts_from_class_means_as_lift_does():
    g = torch.Generator().manual_seed(3)
    feats, labels = torch.randn(20, 6, generator=g) * 3 + 1, torch.tensor([0, 1, 1, 3] * 5)
    head = create_head("cosine", HeadInputs(4, 6, train_features=(feats, labels)), init="class_mean")
    for c in range(4):  # class 2 has no image: a zero row
        rows = [feats[i] for i in range(20) if labels[i] == c]
        mean = sum(rows) / len(rows) if rows else torch.zeros(6)
        expected = mean / mean.norm() if rows else mean
        torch.testing.assert_close(head.classifier.weight[c], expected, rtol=1e-5, atol=1e-6)
    assert head_needs("cosine", {"init": "linear_probe"}).train_features
    rebuilt = rebuild_head("cosine", head.config)  # no features needed to rebuild
    assert rebuilt.config["init"] == "class_mean"


def test_cosine_head_linear_probe_is_the_balanced_logistic_regression():
    g = torch.Generator().manual_seed(4)
    labels = torch.tensor([0] * 12 + [1] * 5 + [2] * 3)
    feats = torch.randn(20, 4, generator=g) + 2.0 * F.one_hot(labels, 4).float()
    head = create_head("cosine", HeadInputs(3, 4, train_features=(feats, labels)), init="linear_probe")
    # scikit-learn's objective, by hand in numpy: balanced weights n / (K n_y), CE, 0.5 |W|^2; gradient descent
    x, y = feats.double().numpy(), labels.numpy()
    s = 20 / (3 * np.bincount(y))[y]
    w, b = np.zeros((3, 4)), np.zeros(3)
    for _ in range(20000):
        z = x @ w.T + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        r = s[:, None] * (p - np.eye(3)[y])
        w -= 0.05 * (r.T @ x + w) / s.sum()
        b -= 0.05 * r.sum(0) / s.sum()
    expected = w / np.linalg.norm(w, axis=1, keepdims=True)
    np.testing.assert_allclose(head.classifier.weight.detach().numpy(), expected, atol=2e-3)


def test_cosine_starts_the_cache_cannot_give_are_refused():
    with pytest.raises(LtclipError, match="input=pooled reads the ViT's feature before the projection.*re-extract with --pooled"):
        create_head("cosine", HeadInputs(C, D), input="pooled")
    with pytest.raises(LtclipError, match="starts from the training images' features"):
        create_head("cosine", HeadInputs(C, D), init="class_mean")
    with pytest.raises(LtclipError, match="starts from single-template text embeddings"):
        create_head("cosine", HeadInputs(C, D, text_embeds=TEXT), init="text", templates="single")
    with pytest.raises(LtclipError, match="--head-opt init='mean': must be one of random, text"):
        create_head("cosine", HeadInputs(C, D), init="mean")


def test_decoder_without_final_norm_feeds_the_last_cls_token_to_the_classifier():
    x = torch.randn(4, 6, 16)
    torch.manual_seed(0)
    with_norm = create_head("decoder", HeadInputs(3, 8, (6, 16)), depth=1, heads=2)
    torch.manual_seed(0)
    without = create_head("decoder", HeadInputs(3, 8, (6, 16)), depth=1, heads=2, final_norm=False)
    cls = without.blocks[0](x)[:, 0]
    torch.testing.assert_close(without.features(x), cls)
    torch.testing.assert_close(with_norm.features(x), F.layer_norm(cls, (16,)))  # LayerNorm at its init: ones, zeros
    assert "norm.weight" in with_norm.state_dict() and "norm.weight" not in without.state_dict()


def test_training_defaults_are_data_registered_with_each_head_not_class_attributes():
    prior_free = lambda lr: {"ce": {"lr": lr}, "focal": {"lr": lr}}  # noqa: E731
    measured = {  # docs/methods_benchmark.md, "Defaults that learn"
        "linear": ({"optimizer": "adamw", "lr": 0.1 / 16, "epochs": 10}, prior_free(0.6 / 16), 500),  # logit scale 16
        "cosine": ({"optimizer": "adamw", "lr": 0.03, "epochs": 10}, {}, 500),
        "mlp": ({"optimizer": "adamw", "lr": 0.0025, "epochs": 30}, prior_free(0.00375), 1000),
        "decoder": ({"optimizer": "adamw", "lr": 0.01, "epochs": 10}, prior_free(0.03), 0),
        "prompt": ({}, {}, 0),
        "text-init": ({}, {}, 0),
    }
    assert {n: dataclasses.astuple(training_defaults(n)) for n in measured} == measured
    assert not [a for n in list_heads() for a in ("defaults", "loss_defaults", "min_steps") if hasattr(HEADS.get(n), a)]
