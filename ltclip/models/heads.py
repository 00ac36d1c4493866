"""Classification heads on cached CLIP features: one registry, built by name with :func:`create_head`.

A head reads either the pooled image embeddings ``embeds`` [B, D] or the frozen ViT's final token
sequence ``tokens`` [B, T, W] (CLS at index 0, before ``ln_post`` and the projection), as float32
(the cache's float16 is cast by the reader). ``features(x)`` is the penultimate representation
[B, feature_dim] that two-stage methods retrain on; ``forward(x) == classifier(features(x))``.

Keyword-only constructor parameters are the head's options (``--head-opt key=value``):
``HEADS.options(name)`` reads them from the signature and ``HEADS.parse(name, opts)`` parses the
CLI strings (see :class:`ltclip.core.registry.Registry`). A subclass declares each option once, in its
signature: :func:`create_head` records ``head.config`` (shapes plus every resolved option, defaults
included; JSON-serialisable, without ``text_embeds``), so ``create_head(name, **head.config,
from_checkpoint=True)`` followed by ``load_state_dict`` rebuilds a trained head.

``Head.sample_macs`` is one input's forward cost, counted as :mod:`ltclip.models.cost` says.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..core.errors import LtclipError
from ..core.registry import Registry
from .cost import block_macs

HEADS: Registry[type["Head"]] = Registry("head", flag="--head-opt")


def _require(ok: bool, option: str, value, requirement: str) -> None:
    if not ok:
        raise LtclipError(f"--head-opt {option}={value!r}: {requirement}")


def _check_dropout(dropout: float) -> None:
    _require(0.0 <= dropout < 1.0, "dropout", dropout, "must be in [0, 1) (e.g. dropout=0.1)")


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


class Head(nn.Module):
    """Base class: subclasses set ``classifier`` and ``features``; options are their keyword-only
    constructor parameters.

    ``name`` is the registered name (set by registration), ``input`` the cache dataset it reads,
    ``config`` what rebuilds the head: the shapes here, completed with the resolved options by
    :func:`create_head` (the way to build a head).
    """

    name: str
    input = "embeds"
    feature_dim: int
    classifier: nn.Module
    # Stage-1 training defaults of this head (train-head options), over the dataclass's, under
    # --recipe and the options given; measured in docs/methods_benchmark.md ("Defaults that learn").
    # ``loss_defaults[loss]`` replaces some of them for that loss; a run whose length comes from the
    # default epochs trains at least ``min_steps`` optimizer steps (``ltclip.recipes.head_defaults``).
    defaults: dict = {}
    loss_defaults: dict = {}
    min_steps: int = 0


    def __init__(self, num_classes: int, embed_dim: int, token_shape: Sequence[int] | None):
        super().__init__()
        self.num_classes = int(num_classes)
        self.config: dict = {
            "num_classes": self.num_classes,
            "embed_dim": int(embed_dim),
            "token_shape": [int(n) for n in token_shape] if token_shape is not None else None,
        }

    @staticmethod
    def wants_text(options: dict) -> bool:
        """Whether the head with these options starts from the class text embeddings (callers pass them)."""
        return False

    def features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

    def sample_macs(self, input_shape: Sequence[int]) -> int:
        """Multiply-accumulates of one sample's forward (each weight matrix used once per sample)."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, (nn.Linear, CosineClassifier)))


def _maybe_normalize(x: Tensor, normalize: bool) -> Tensor:
    return F.normalize(x, dim=-1) if normalize else x


def without_prior(lr: float) -> dict:
    """``loss_defaults`` giving ``lr`` to the losses without a class prior, CE and focal: under them
    the tail classes learn only as fast as the step lets them (focal shrinks easy rows' gradients
    further), so they take a larger step than the balanced losses (docs/methods_benchmark.md)."""
    return {loss: {"lr": lr} for loss in ("ce", "focal")}


@HEADS.register("linear")
class LinearHead(Head):
    """Linear probe ``W x + b`` on the (by default L2-normalised) embedding."""

    defaults = {"optimizer": "adamw", "lr": 0.1, "epochs": 10}
    loss_defaults = without_prior(0.6)
    min_steps = 500

    def __init__(self, num_classes, embed_dim, token_shape=None, text_embeds=None, *, normalize: bool = True):
        super().__init__(num_classes, embed_dim, token_shape)
        self.normalize = normalize
        self.feature_dim = embed_dim
        self.classifier = nn.Linear(embed_dim, num_classes)

    def features(self, x):
        return _maybe_normalize(x, self.normalize)


@HEADS.register("cosine")
class CosineHead(Head):
    """Cosine classifier on the normalised embedding, scale learned from ``init_scale``.

    With ``text_init`` the class rows start as the class text embeddings (LIFT's classifier), so
    before training the logits are ``init_scale`` × CLIP's zero-shot cosines.
    """

    defaults = {"optimizer": "adamw", "lr": 0.03, "epochs": 10}
    min_steps = 500

    def __init__(
        self, num_classes, embed_dim, token_shape=None, text_embeds=None, *,
        init_scale: float = 16.0, learn_scale: bool = True, text_init: bool = False,
    ):
        super().__init__(num_classes, embed_dim, token_shape)
        _require(init_scale > 0, "init_scale", init_scale, "must be positive (e.g. init_scale=16)")
        self.feature_dim = embed_dim
        self.classifier = CosineClassifier(embed_dim, num_classes, init_scale, learn_scale)
        if text_init:
            with torch.no_grad():
                self.classifier.weight.copy_(_checked_text(text_embeds, num_classes, embed_dim, "cosine"))

    @staticmethod
    def wants_text(options: dict) -> bool:
        return bool(options.get("text_init", False))

    def features(self, x):
        return F.normalize(x, dim=-1)


@HEADS.register("mlp")
class MLPHead(Head):
    """(Normalised) input → Linear(D, hidden) → GELU → dropout = features; Linear(hidden, C).

    ``hidden=0`` means ``hidden = D``.
    """

    defaults = {"optimizer": "adamw", "lr": 0.01, "epochs": 30}
    loss_defaults = without_prior(0.03)
    min_steps = 1000

    def __init__(
        self, num_classes, embed_dim, token_shape=None, text_embeds=None, *,
        hidden: int = 0, dropout: float = 0.0, normalize: bool = True,
    ):
        super().__init__(num_classes, embed_dim, token_shape)
        _require(hidden >= 0, "hidden", hidden, "must be >= 0 (0 means the embedding size)")
        _check_dropout(dropout)
        self.normalize = normalize
        self.feature_dim = hidden or embed_dim
        self.fc = nn.Linear(embed_dim, self.feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def features(self, x):
        return self.dropout(F.gelu(self.fc(_maybe_normalize(x, self.normalize))))


@HEADS.register("text-init")
class TextInitHead(Head):
    """Linear head on normalised embeddings starting as the zero-shot classifier.

    The weight starts as ``logit_scale · text_embeds`` (rows as the zero-shot classifier has them,
    normalised) and the bias as 0, so before training the logits are CLIP's zero-shot logits.
    """

    def __init__(self, num_classes, embed_dim, token_shape=None, text_embeds=None, *, logit_scale: float = 100.0):
        text_embeds = _checked_text(text_embeds, num_classes, embed_dim, "text-init")
        super().__init__(num_classes, embed_dim, token_shape)
        self.feature_dim = embed_dim
        self.classifier = nn.Linear(embed_dim, num_classes)
        with torch.no_grad():
            self.classifier.weight.copy_(logit_scale * text_embeds)
            self.classifier.bias.zero_()

    @staticmethod
    def wants_text(options: dict) -> bool:
        return True

    def features(self, x):
        return F.normalize(x, dim=-1)


def _checked_text(text_embeds, num_classes: int, embed_dim: int, head: str) -> Tensor:
    """The class text embeddings a text-initialised head starts from, as float32 [C, D]."""
    if text_embeds is None:
        raise LtclipError(
            f"--head {head} starts from the class text embeddings (text.h5, written by extract beside the cache); "
            "rerun extract or choose another --head"
        )
    text_embeds = torch.as_tensor(text_embeds, dtype=torch.float32)
    if tuple(text_embeds.shape) != (num_classes, embed_dim):
        raise LtclipError(
            f"--head {head}: text embeddings have shape {tuple(text_embeds.shape)}, expected "
            f"({num_classes}, {embed_dim}); use the text.h5 extracted with this cache"
        )
    return text_embeds


def _init_vit_weights(module: nn.Module) -> None:
    """timm ViT initialisation: trunc-normal(std .02) linears, zero biases, LayerNorm ones/zeros."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class DecoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` (GELU).

    ``dropout`` applies to the attention probabilities and to both residual branches.
    """

    def __init__(self, width: int, heads: int, mlp_hidden: int, qkv_bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, width)

    def attention(self, x: Tensor) -> Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, t, w))

    def forward(self, x: Tensor) -> Tensor:
        x = x + F.dropout(self.attention(self.norm1(x)), self.dropout, self.training)
        mlp = self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return x + F.dropout(mlp, self.dropout, self.training)


@HEADS.register("decoder")
class DecoderHead(Head):
    """The lightweight decoder of Wang et al. (IJCV 2023) over the ViT token sequence.

    ``depth`` pre-norm blocks (``heads`` attention heads with qkv bias, MLP hidden
    ``mlp_ratio · W``), a final LayerNorm, and the CLS token (index 0) → Linear(W, C).
    ``final_norm=false`` leaves the final LayerNorm out, as the seed paper's code does (its decoder
    feeds the last block's CLS token straight to the classifier).
    """

    defaults = {"optimizer": "adamw", "lr": 0.01, "epochs": 10}
    loss_defaults = without_prior(0.03)

    input = "tokens"

    def __init__(
        self, num_classes, embed_dim, token_shape=None, text_embeds=None, *,
        depth: int = 3, heads: int = 4, mlp_ratio: float = 0.5, qkv_bias: bool = True, dropout: float = 0.0,
        final_norm: bool = True,
    ):
        if token_shape is None:
            raise LtclipError("--head decoder needs token sequences; re-extract with --tokens")
        super().__init__(num_classes, embed_dim, token_shape)
        width = int(token_shape[-1])
        self.mlp_hidden = int(width * mlp_ratio)
        _require(depth >= 0, "depth", depth, "must be >= 0 (e.g. depth=3)")
        _require(heads >= 1 and width % heads == 0, "heads", heads, f"must divide the token width {width} (e.g. 4)")
        _require(self.mlp_hidden >= 1, "mlp_ratio", mlp_ratio, f"mlp_ratio · {width} must be >= 1 (e.g. 0.5)")
        _check_dropout(dropout)
        self.feature_dim = width
        self.blocks = nn.ModuleList(
            DecoderBlock(width, heads, self.mlp_hidden, qkv_bias, dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width) if final_norm else nn.Identity()
        self.classifier = nn.Linear(width, num_classes)
        self.apply(_init_vit_weights)

    def features(self, x):
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])

    def sample_macs(self, input_shape):
        tokens, width = input_shape[-2:]
        return len(self.blocks) * block_macs(tokens, width, self.mlp_hidden) + self.classifier.weight.numel()


# ---------------------------------------------------------------- factory


list_heads = HEADS.names


def create_head(
    name: str,
    *,
    num_classes: int,
    embed_dim: int,
    token_shape: Sequence[int] | None = None,
    text_embeds: Tensor | None = None,
    text_encoder=None,
    from_checkpoint: bool = False,
    **params,
) -> Head:
    """Build head ``name`` for ``num_classes`` classes on embeddings of ``embed_dim`` (tokens [T, W]).

    ``params`` are the head's options (``HEADS.options(name)``); the head records them, defaults
    included, in ``head.config``. ``text_embeds`` [C, D] is the zero-shot classifier (used by
    ``text-init``). With ``from_checkpoint=True`` missing text embeddings are replaced by zeros, to
    be overwritten by ``load_state_dict``: ``create_head(name, **head.config, from_checkpoint=True)``
    rebuilds ``head``. ``text_encoder`` (a :class:`~ltclip.models.text_prompts.TextEncoder`) goes to
    the heads that set ``requires_text_encoder`` (``prompt``), as their sixth positional argument.
    """
    HEADS.check(name, params)
    options = {**HEADS.options(name), **params}
    if from_checkpoint and text_embeds is None:
        text_embeds = torch.zeros(num_classes, embed_dim)
    text = (text_encoder,) if getattr(HEADS.get(name), "requires_text_encoder", False) else ()
    head = HEADS.create(name, num_classes, embed_dim, token_shape, text_embeds, *text, **options)
    head.config.update(options)
    return head


from . import text_prompts  # noqa: E402,F401  (registers head "prompt"; it imports this module)
