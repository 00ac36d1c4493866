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


@dataclass(frozen=True)
class HeadInputs:
    """The build context of a head: the class count, the input sizes (``token_shape`` ``[T, W]``, None
    for a cache without tokens) and what some heads start from: the class text embeddings ``[C, D]``
    (the zero-shot classifier) and the model's text tower with the class names."""

    num_classes: int
    embed_dim: int
    token_shape: Sequence[int] | None = None
    text_embeds: Tensor | None = None
    text_encoder: TextEncoder | None = None

    def sizes(self) -> dict:
        """The sizes as ``head.config`` records them (plain ints, ``token_shape`` a list)."""
        return {
            "num_classes": int(self.num_classes),
            "embed_dim": int(self.embed_dim),
            "token_shape": [int(n) for n in self.token_shape] if self.token_shape is not None else None,
        }


@dataclass(frozen=True)
class HeadNeeds:
    """What a head needs of its :class:`HeadInputs`, declared once as the class's ``needs``.

    ``input`` is the cache dataset it reads (``"embeds"`` [B, D] or ``"tokens"`` [B, T, W]);
    ``text_embeds`` says when it starts from the class text embeddings: always (True), never (False)
    or when the boolean option of that name is on; ``text_encoder`` whether it runs the text tower.
    """

    input: str = "embeds"
    text_embeds: bool | str = False
    text_encoder: bool = False

    def for_options(self, options: dict) -> HeadNeeds:
        """These needs for a head built with ``options`` (all of them, defaults included):
        ``text_embeds`` a bool."""
        text = self.text_embeds if isinstance(self.text_embeds, bool) else bool(options[self.text_embeds])
        return HeadNeeds(self.input, text, self.text_encoder)


def require(ok: bool, option: str, value, requirement: str) -> None:
    """A one-line LtclipError naming ``--head-opt option=value`` unless ``ok``."""
    if not ok:
        raise LtclipError(f"--head-opt {option}={value!r}: {requirement}")


def check_dropout(dropout: float) -> None:
    require(0.0 <= dropout < 1.0, "dropout", dropout, "must be in [0, 1) (e.g. dropout=0.1)")


class Head(nn.Module):
    """Base class: a subclass takes ``(inputs: HeadInputs, *, options)``, declares ``needs``, and sets
    ``classifier``, ``feature_dim`` and ``features``.

    A head reads the pooled image embeddings ``embeds`` [B, D] or the frozen ViT's final token
    sequence ``tokens`` [B, T, W] (CLS at index 0, before ``ln_post`` and the projection), as float32.
    ``features(x)`` is the penultimate representation [B, feature_dim] that two-stage methods retrain
    on; ``forward(x) == classifier(features(x))``. ``name`` is the registered name, ``config`` (set
    by the factory) the sizes and every option: what rebuilds the head.
    """

    name: str
    needs: ClassVar[HeadNeeds] = HeadNeeds()
    feature_dim: int
    classifier: nn.Module
    config: dict

    def __init__(self, inputs: HeadInputs):
        super().__init__()
        self.num_classes = int(inputs.num_classes)

    @property
    def input(self) -> str:
        """The cache dataset the head reads: ``needs.input``."""
        return self.needs.input

    def features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

    def sample_macs(self, input_shape: Sequence[int]) -> int:
        """Multiply-accumulates of one sample's forward (each weight matrix used once per sample), as
        :mod:`ltclip.models.cost` counts them."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
