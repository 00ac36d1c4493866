"""Modes that train a subset of the image tower's own parameters and add nothing."""

from __future__ import annotations

from torch import nn

from .core import TUNING, require, require_vit


@TUNING.register("frozen")
def frozen(visual) -> None:
    """Nothing in the encoder: the head alone trains (linear probing; the seed paper's stage 1)."""


@TUNING.register("full")
def full(visual) -> None:
    """Every parameter of the image tower."""
    visual.requires_grad_(True)


@TUNING.register("last-k")
def last_k(visual, *, k: int = 1) -> None:
    """The last k parameter groups of the ViT, as open_clip's ``lock_image_tower(unlocked_groups=k)``.

    open_clip splits a ViT with L blocks into L + 2 groups, first to last: (1) the stem — conv1,
    class and positional embeddings, ln_pre; (2 … L) blocks 0 … L-2; (L+1) the last block together
    with ln_post; (L+2) the projection ``proj``. So k=1 trains ``proj`` only, k=2 adds the last
    block and ln_post, and k=L+2 trains everything. (An attentional pooler is in no group.)
    """
    groups = len(require_vit(visual, "last-k")) + 2
    require(1 <= k <= groups, "k", k, f"the image tower has {groups} groups; choose 1 … {groups} (or --tune full)")
    visual.lock(unlocked_groups=k)


@TUNING.register("bitfit")
def bitfit(visual) -> None:
    """Every bias of the image tower (BitFit): attention, MLP and LayerNorm biases."""
    for name, p in visual.named_parameters():
        if name.endswith("bias"):
            p.requires_grad_(True)


@TUNING.register("ln")
def layer_norm(visual) -> None:
    """The weights and biases of every LayerNorm of the image tower (ln_pre, ln_1/ln_2 of each block, ln_post)."""
    for m in visual.modules():
        if isinstance(m, nn.LayerNorm):
            m.requires_grad_(True)
