"""Modes that train a subset of the image tower's own parameters and add nothing.

As in LIFT (``models/peft_vit.py``, ViT_Tuner: ``block_tuned``, ``bias_tuned``, ``ln_tuned``) they
select parameters of the transformer blocks only; the stem (conv1, class and positional
embeddings, ln_pre), ln_post and the projection stay frozen (``full tower=true`` trains them too).
"""

from __future__ import annotations

from torch import nn

from .core import TUNING, require, require_vit


@TUNING.register("frozen")
def frozen(visual) -> None:
    """Nothing in the encoder: the head alone trains (linear probing; the seed paper's stage 1)."""


@TUNING.register("full")
def full(visual, *, tower: bool = False) -> None:
    """Every parameter of the transformer blocks (LIFT's full_tuning); tower=true: the whole image tower."""
    (visual if tower else require_vit(visual, "full")).requires_grad_(True)


@TUNING.register("last-k")
def last_k(visual, *, k: int = 1) -> None:
    """Every parameter of the last k transformer blocks (LIFT's full_tuning with partial=k)."""
    blocks = require_vit(visual, "last-k")
    require(1 <= k <= len(blocks), "k", k, f"the image tower has {len(blocks)} blocks; choose 1 … {len(blocks)}")
    blocks[len(blocks) - k:].requires_grad_(True)


@TUNING.register("bitfit")
def bitfit(visual) -> None:
    """Every bias in the transformer blocks (BitFit): attention, MLP and LayerNorm biases."""
    for name, p in require_vit(visual, "bitfit").named_parameters():
        if name.endswith("bias"):
            p.requires_grad_(True)


@TUNING.register("ln")
def layer_norm(visual) -> None:
    """The weights and biases of the LayerNorms in the transformer blocks (ln_1 and ln_2 of each)."""
    for m in require_vit(visual, "ln").modules():
        if isinstance(m, nn.LayerNorm):
            m.requires_grad_(True)
