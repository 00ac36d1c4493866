"""What a head is (:class:`Head`), what it is built from (:class:`HeadInputs`) and what it says it
needs of that (:class:`HeadNeeds`); :func:`~ltclip.models.heads.create_head` puts them together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Sequence

import torch.nn as nn
from torch import Tensor

from ...core.errors import LtclipError

if TYPE_CHECKING:
    from ..text_prompts import TextEncoder


INPUTS = ("embeds", "tokens", "pooled")  # what a head can read: see Head


@dataclass(frozen=True)
class HeadInputs:
    """The build context of a head: the class count, the input sizes (``token_shape`` ``[T, W]``, None
    for a cache without tokens; ``pooled_dim`` the pre-projection pooled feature's size, None where
    there is none: a cache extracted without --pooled) and what some heads start from: the class text embeddings ``[C, D]`` in
    the space of the head's input, made with the ``text_templates`` prompts ("ensemble": the
    dataset's templates, "single": ``a photo of a {}.``), the model's text tower with the class names,
    and ``train_features`` ``(features [N, D], labels [N])``, the training images' inputs to the head."""

    num_classes: int
    embed_dim: int
    token_shape: Sequence[int] | None = None
    text_embeds: Tensor | None = None
    text_encoder: TextEncoder | None = None
    pooled_dim: int | None = None
    text_templates: str = "ensemble"
    train_features: tuple[Tensor, Tensor] | None = None

    def sizes(self, input: str = "embeds") -> dict:
        """The sizes as ``head.config`` records them for a head reading ``input`` (plain ints,
        ``token_shape`` a list; ``pooled_dim`` only for one reading the pooled feature)."""
        sizes = {
            "num_classes": int(self.num_classes),
            "embed_dim": int(self.embed_dim),
            "token_shape": [int(n) for n in self.token_shape] if self.token_shape is not None else None,
        }
        return {**sizes, "pooled_dim": int(self.pooled_dim)} if input == "pooled" else sizes

    def vector_dim(self, input: str) -> int | None:
        """The size of a vector input: ``embed_dim`` for "embeds", ``pooled_dim`` for "pooled"."""
        return self.pooled_dim if input == "pooled" else int(self.embed_dim)


@dataclass(frozen=True)
class HeadNeeds:
    """What a head needs of its :class:`HeadInputs`, declared as the class's ``needs`` (or, where its
    options decide, by its ``needs_for``).

    ``input`` is what it reads: ``"embeds"`` [B, D] (the projected embedding), ``"tokens"`` [B, T, W]
    or ``"pooled"`` [B, W] (the pooled feature before the projection: finetune, or a cache from
    ``extract --pooled``);
    ``text_embeds`` whether it starts from the class text embeddings, made from ``templates``;
    ``text_encoder`` whether it runs the text tower; ``train_features`` whether it starts from the
    training images' features (finetune only).
    """

    input: str = "embeds"
    text_embeds: bool = False
    text_encoder: bool = False
    templates: str = "ensemble"
    train_features: bool = False


def require(ok: bool, option: str, value, requirement: str) -> None:
    """A one-line LtclipError naming ``--head-opt option=value`` unless ``ok``."""
    if not ok:
        raise LtclipError(f"--head-opt {option}={value!r}: {requirement}")


def check_dropout(dropout: float) -> None:
    require(0.0 <= dropout < 1.0, "dropout", dropout, "must be in [0, 1) (e.g. dropout=0.1)")


class Head(nn.Module):
    """Base class: a subclass takes ``(inputs: HeadInputs, *, options)``, declares ``needs``, and sets
    ``classifier``, ``feature_dim`` and ``features``.

    A head reads the pooled image embeddings ``embeds`` [B, D], the frozen ViT's final token
    sequence ``tokens`` [B, T, W] (CLS at index 0, before ``ln_post`` and the projection) or, in
    finetune, the pooled feature before the projection ``pooled`` [B, W] (``ln_post(CLS)``), as float32.
    ``features(x)`` is the penultimate representation [B, feature_dim] that two-stage methods retrain
    on; ``forward(x) == classifier(features(x))``. ``name`` is the registered name, ``config`` (set
    by the factory) the sizes and every option: what rebuilds the head.
    """

    name: str
    needs: ClassVar[HeadNeeds] = HeadNeeds()
    input: str  # what it reads, needs_for(its options).input: set by the factory
    feature_dim: int
    classifier: nn.Module
    config: dict

    def __init__(self, inputs: HeadInputs):
        super().__init__()
        self.num_classes = int(inputs.num_classes)

    @classmethod
    def needs_for(cls, options: dict) -> HeadNeeds:
        """What the head built with ``options`` (all of them, defaults included) needs: ``needs``."""
        return cls.needs

    @classmethod
    def saved_options(cls, options: dict) -> dict:
        """The options a saved ``config`` rebuilds the head with (a renamed option translated): as saved."""
        return options

    def features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

    def sample_macs(self, input_shape: Sequence[int]) -> int:
        """Multiply-accumulates of one sample's forward (each weight matrix used once per sample), as
        :mod:`ltclip.models.cost` counts them."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
