"""Heads on the pooled image embedding [B, D]: linear, cosine, MLP and the zero-shot-initialised
linear head (text-init)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import Head, HeadInputs, HeadNeeds, check_dropout, require
from .factory import HEADS, HeadDefaults, without_prior


class CosineClassifier(nn.Module):
    """Logits ``scale · cos(x, w_j)``: normalised inputs and weights, a learned (or fixed) scale."""

    def __init__(self, in_features: int, out_features: int, init_scale: float = 16.0, learn_scale: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.init_scale = in_features, out_features, float(init_scale)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        if learn_scale:
            self.scale = nn.Parameter(torch.empty(()))
        else:
            self.register_buffer("scale", torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random unit-scale rows (normal, std ``1/sqrt(in_features)``) and the initial scale."""
        with torch.no_grad():
            nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.in_features))
            self.scale.fill_(self.init_scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).T


def _maybe_normalize(x: Tensor, normalize: bool) -> Tensor:
    return F.normalize(x, dim=-1) if normalize else x


@HEADS.register("linear", defaults=HeadDefaults(
    {"optimizer": "adamw", "lr": 0.1, "epochs": 10}, loss_options=without_prior(0.6), min_steps=500))
class LinearHead(Head):
    """Linear probe ``W x + b`` on the (by default L2-normalised) embedding."""

    def __init__(self, inputs: HeadInputs, *, normalize: bool = True):
        super().__init__(inputs)
        self.normalize = normalize
        self.feature_dim = inputs.embed_dim
        self.classifier = nn.Linear(inputs.embed_dim, inputs.num_classes)

    def features(self, x):
        return _maybe_normalize(x, self.normalize)


@HEADS.register("cosine", defaults=HeadDefaults({"optimizer": "adamw", "lr": 0.03, "epochs": 10}, min_steps=500))
class CosineHead(Head):
    """Cosine classifier on the normalised embedding, scale learned from ``init_scale``.

    With ``text_init`` the class rows start as the class text embeddings (LIFT's classifier), so
    before training the logits are ``init_scale`` × CLIP's zero-shot cosines.
    """

    needs = HeadNeeds(text_embeds="text_init")

    def __init__(self, inputs: HeadInputs, *, init_scale: float = 16.0, learn_scale: bool = True, text_init: bool = False):
        super().__init__(inputs)
        require(init_scale > 0, "init_scale", init_scale, "must be positive (e.g. init_scale=16)")
        self.feature_dim = inputs.embed_dim
        self.classifier = CosineClassifier(inputs.embed_dim, inputs.num_classes, init_scale, learn_scale)
        if text_init:
            with torch.no_grad():
                self.classifier.weight.copy_(inputs.text_embeds)

    def features(self, x):
        return F.normalize(x, dim=-1)

    def sample_macs(self, input_shape):
        return self.classifier.weight.numel()


@HEADS.register("mlp", defaults=HeadDefaults(
    {"optimizer": "adamw", "lr": 0.01, "epochs": 30}, loss_options=without_prior(0.03), min_steps=1000))
class MLPHead(Head):
    """(Normalised) input → Linear(D, hidden) → GELU → dropout = features; Linear(hidden, C).

    ``hidden=0`` means ``hidden = D``.
    """

    def __init__(self, inputs: HeadInputs, *, hidden: int = 0, dropout: float = 0.0, normalize: bool = True):
        super().__init__(inputs)
        require(hidden >= 0, "hidden", hidden, "must be >= 0 (0 means the embedding size)")
        check_dropout(dropout)
        self.normalize = normalize
        self.feature_dim = hidden or inputs.embed_dim
        self.fc = nn.Linear(inputs.embed_dim, self.feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.feature_dim, inputs.num_classes)

    def features(self, x):
        return self.dropout(F.gelu(self.fc(_maybe_normalize(x, self.normalize))))


@HEADS.register("text-init")
class TextInitHead(Head):
    """Linear head on normalised embeddings starting as the zero-shot classifier.

    The weight starts as ``logit_scale · text_embeds`` (rows as the zero-shot classifier has them,
    normalised) and the bias as 0, so before training the logits are CLIP's zero-shot logits.
    """

    needs = HeadNeeds(text_embeds=True)

    def __init__(self, inputs: HeadInputs, *, logit_scale: float = 100.0):
        super().__init__(inputs)
        self.feature_dim = inputs.embed_dim
        self.classifier = nn.Linear(inputs.embed_dim, inputs.num_classes)
        with torch.no_grad():
            self.classifier.weight.copy_(logit_scale * inputs.text_embeds)
            self.classifier.bias.zero_()

    def features(self, x):
        return F.normalize(x, dim=-1)
