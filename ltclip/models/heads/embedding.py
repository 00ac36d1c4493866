"""Heads on the pooled image embedding [B, D]: linear, cosine (also on the pre-projection pooled
feature), MLP and the zero-shot-initialised linear head (text-init)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import Head, HeadInputs, HeadNeeds, check_dropout, require
from .factory import HEADS, HeadDefaults, without_prior
from .starts import class_means, linear_probe

# the linear and MLP heads' logit scale for new runs (0: none), measured in docs/methods_benchmark.md
LOGIT_SCALE, LEARN_SCALE = 16.0, True


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


class ScaledLinear(nn.Linear):
    """Logits ``scale · (W x + b)``: a linear classifier with a learned (or fixed) logit scale."""

    def __init__(self, in_features: int, out_features: int, init_scale: float, learn_scale: bool):
        self.init_scale = float(init_scale)
        super().__init__(in_features, out_features)
        if learn_scale:
            self.logit_scale = nn.Parameter(torch.full((), self.init_scale))
        else:
            self.register_buffer("logit_scale", torch.full((), self.init_scale))

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation divided by the initial scale (the initial logits are an
        unscaled nn.Linear's), and the initial scale."""
        super().reset_parameters()
        with torch.no_grad():
            self.weight.div_(self.init_scale)
            self.bias.div_(self.init_scale)
            if hasattr(self, "logit_scale"):
                self.logit_scale.fill_(self.init_scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.logit_scale * super().forward(x)


def scaled_classifier(in_features: int, out_features: int, scale: float, learn_scale: bool) -> nn.Linear:
    """The linear and MLP heads' classifier: ``scale`` > 0 multiplies its logits (:class:`ScaledLinear`,
    learned from ``scale`` unless ``learn_scale=false``); 0 is a plain ``nn.Linear``, as runs saved
    before the option had (:class:`LogitScaled`)."""
    require(scale >= 0, "scale", scale, "must be >= 0 (0: no logit scale)")
    if scale == 0:
        return nn.Linear(in_features, out_features)
    return ScaledLinear(in_features, out_features, scale, learn_scale)


class LogitScaled:
    """Mixin of the heads with a ``scale`` option: runs saved before it rebuild without one (``scale=0``)."""

    @classmethod
    def saved_options(cls, options: dict) -> dict:
        return {"scale": 0.0, **options}


def _maybe_normalize(x: Tensor, normalize: bool) -> Tensor:
    return F.normalize(x, dim=-1) if normalize else x


# the scale starts from an unscaled head's logits and multiplies AdamW's steps by itself: at 1/16 of its
# unscaled lr (0.1, CE 0.6) the linear head trains as it did; the MLP's measured lr is 1/4 (CE 1/8) of its 0.01 (0.03)
@HEADS.register("linear", defaults=HeadDefaults(
    {"optimizer": "adamw", "lr": 0.1 / LOGIT_SCALE, "epochs": 10}, loss_options=without_prior(0.6 / LOGIT_SCALE),
    min_steps=500))
class LinearHead(LogitScaled, Head):
    """Linear probe ``W x + b`` on the (by default L2-normalised) embedding, times ``scale`` (0: none).

    ``scale`` multiplies the logits (learned from it unless ``learn_scale=false``): on unit-norm
    inputs the unscaled logits are bounded by the weights' norm, which a small step (SGD at 0.05)
    leaves small, the softmax near uniform (docs/methods_benchmark.md, "Defaults that learn").
    """

    def __init__(self, inputs: HeadInputs, *, normalize: bool = True, scale: float = LOGIT_SCALE,
                 learn_scale: bool = LEARN_SCALE):
        super().__init__(inputs)
        self.normalize = normalize
        self.feature_dim = inputs.embed_dim
        self.classifier = scaled_classifier(inputs.embed_dim, inputs.num_classes, scale, learn_scale)

    def features(self, x):
        return _maybe_normalize(x, self.normalize)


COSINE_INITS = ("random", "text", "class_mean", "linear_probe")


@HEADS.register("cosine", defaults=HeadDefaults({"optimizer": "adamw", "lr": 0.03, "epochs": 10}, min_steps=500))
class CosineHead(Head):
    """Cosine classifier on the normalised input, scale ``init_scale`` (learned unless ``learn_scale=false``).

    ``init`` picks the starting class rows: random, the class text embeddings (``text``: before
    training the logits are ``init_scale`` × CLIP's zero-shot cosines; ``templates`` = ensemble | single,
    ``a photo of a {}.``), or, in finetune, the training images' features (``class_mean``,
    ``linear_probe``: :mod:`.starts`). ``input=pooled`` (finetune) reads the feature before the
    projection, where text rows arrive mapped back through it. LIFT's classifier is
    ``input=pooled init=text templates=single init_scale=25 learn_scale=false`` (the lift recipe).
    """

    def __init__(self, inputs: HeadInputs, *, init_scale: float = 16.0, learn_scale: bool = True, init: str = "random",
                 input: str = "embeds", templates: str = "ensemble"):
        super().__init__(inputs)
        require(init_scale > 0, "init_scale", init_scale, "must be positive (e.g. init_scale=16)")
        self.feature_dim = inputs.vector_dim(input)
        self.classifier = CosineClassifier(self.feature_dim, inputs.num_classes, init_scale, learn_scale)
        rows = None
        if init == "text":
            rows = inputs.text_embeds
        elif init != "random":
            fit = class_means if init == "class_mean" else linear_probe
            rows = fit(*inputs.train_features, inputs.num_classes)
        if rows is not None:
            with torch.no_grad():
                self.classifier.weight.copy_(F.normalize(rows, dim=-1))

    @classmethod
    def needs_for(cls, options):
        init, input, templates = options["init"], options["input"], options["templates"]
        require(init in COSINE_INITS, "init", init, f"must be one of {', '.join(COSINE_INITS)}")
        require(input in ("embeds", "pooled"), "input", input, "must be embeds or pooled (finetune only)")
        require(templates in ("ensemble", "single"), "templates", templates, "must be ensemble or single")
        return HeadNeeds(input=input, text_embeds=init == "text", templates=templates,
                         train_features=init in ("class_mean", "linear_probe"))

    @classmethod
    def saved_options(cls, options):
        """Runs saved before ``init`` recorded ``text_init`` (a bool): ``text_init=true`` is ``init=text``."""
        options = dict(options)
        if options.pop("text_init", False):
            options["init"] = "text"
        return options

    def features(self, x):
        return F.normalize(x, dim=-1)

    def sample_macs(self, input_shape):
        return self.classifier.weight.numel()


@HEADS.register("mlp", defaults=HeadDefaults(
    {"optimizer": "adamw", "lr": 0.0025, "epochs": 30}, loss_options=without_prior(0.00375), min_steps=1000))
class MLPHead(LogitScaled, Head):
    """(Normalised) input → Linear(D, hidden) → GELU → dropout = features; Linear(hidden, C) × ``scale``.

    ``hidden=0`` means ``hidden = D``; ``scale`` (0: none) multiplies the logits as the linear head's.
    """

    def __init__(self, inputs: HeadInputs, *, hidden: int = 0, dropout: float = 0.0, normalize: bool = True,
                 scale: float = LOGIT_SCALE, learn_scale: bool = LEARN_SCALE):
        super().__init__(inputs)
        require(hidden >= 0, "hidden", hidden, "must be >= 0 (0 means the embedding size)")
        check_dropout(dropout)
        self.normalize = normalize
        self.feature_dim = hidden or inputs.embed_dim
        self.fc = nn.Linear(inputs.embed_dim, self.feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = scaled_classifier(self.feature_dim, inputs.num_classes, scale, learn_scale)

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
