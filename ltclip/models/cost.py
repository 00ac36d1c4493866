"""Cost estimates of heads and ViT encoders: parameters and forward multiply-accumulates (MACs).

MACs count matrix products only; normalisations, activations, softmax and residual adds are left
out. One MAC is two FLOPs in ``torch.utils.flop_counter``'s convention.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from ..core.errors import LtclipError


def block_macs(tokens: int, width: int, mlp_hidden: int) -> int:
    """MACs of one pre-norm transformer block over ``tokens`` tokens of ``width``.

    Per token: qkv ``3W²``, attention scores and weighted sum ``2TW``, output projection ``W²``,
    MLP ``2Wh``.
    """
    return tokens * (4 * width * width + 2 * tokens * width + 2 * width * mlp_hidden)


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (only those with ``requires_grad`` when ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def head_flops(head: nn.Module, batch_inputs_shape: Sequence[int]) -> int:
    """Forward MACs of ``head`` on a batch of inputs shaped ``[B, D]`` or ``[B, T, W]`` (``head.sample_macs``)."""
    return int(batch_inputs_shape[0]) * head.sample_macs(tuple(batch_inputs_shape[1:]))


def vit_flops(visual: nn.Module, image_size: int | Sequence[int]) -> int:
    """Forward MACs of one image through an open_clip ``VisionTransformer`` (matrix products only).

    With patch size ``p``, ``N = (H/p)(W/p)`` patches, ``T = N + 1`` tokens (CLS), width ``W``, MLP
    hidden ``h``, ``L`` blocks and output dim ``D``::

        MACs = N · 3p²W                                 patch embedding (a p×p, stride-p convolution)
             + L · T · (4W² + 2TW + 2Wh)                per block: qkv, attention, projection, MLP
             + W · D                                    projection of the pooled token
    """
    if getattr(visual, "attn_pool", None) is not None:
        raise LtclipError("vit_flops: attentional-pooler ViTs are not supported; use a standard open_clip ViT")
    height, width_px = (image_size, image_size) if isinstance(image_size, int) else image_size
    conv = visual.conv1
    ph, pw = conv.kernel_size
    patches = (height // ph) * (width_px // pw)
    width = visual.transformer.width
    blocks = visual.transformer.resblocks
    mlp_hidden = blocks[0].mlp.c_fc.out_features
    macs = patches * conv.weight.numel() + len(blocks) * block_macs(patches + 1, width, mlp_hidden)
    if visual.proj is not None:
        macs += visual.proj.numel()
    return macs
