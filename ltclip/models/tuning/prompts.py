"""Visual prompt tuning (VPT, Jia et al. 2022): learnable tokens in the ViT's token sequence.

The prompts sit right after CLS: ``[CLS, P_1 … P_T, patches]``, so the encoder's output sequence
(``Backbone.encode(x, tokens=True)``) has ``1 + T + patches`` tokens and CLS pooling is unchanged.
Each prompted block holds a :class:`Prompts` child (``resblocks.<i>.vpt.prompt``) that a forward
pre-hook applies to the block's input, so ``encode_image``, ``Backbone.encode`` and gradient
checkpointing all see them and the base parameters keep their names. Shallow VPT inserts one set
before block 0 (after ``ln_pre``); deep VPT inserts one before the first prompted block and
replaces it with a fresh set before every later one.

As in LIFT (``models/peft_modules.py`` ``VPT``, ``models/peft_vit.py`` ViT_Tuner): 10 tokens, uniform
in ±sqrt(6 / (patch_dim + W)) with ``patch_dim = 3·p·p``, weight-decayed like every tuned
parameter, and ``blocks=k`` prompts the last k blocks only (LIFT's ``partial``). LIFT appends its
prompts after the patches instead (the same model up to token order).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .core import ALL, TUNING, Inserted, last_blocks, placed, require


class Prompts(Inserted):
    """``tokens`` learnable [T, W] prompts put after CLS: inserted (``insert``) or replacing the previous ones."""

    def __init__(self, tokens: int, width: int, patch_dim: int, insert: bool):
        super().__init__()
        bound = math.sqrt(6.0 / (patch_dim + width))
        self.prompt = nn.Parameter(torch.empty(tokens, width).uniform_(-bound, bound))
        self.insert = insert

    def extra_repr(self) -> str:
        return f"tokens={self.prompt.shape[0]}, insert={self.insert}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rest = x[:, 1:] if self.insert else x[:, 1 + self.prompt.shape[0]:]
        prompt = self.prompt.to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :1], prompt, rest], dim=1)


def _prompt_block_input(block: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of a prompted block: its first argument (the token sequence) gets the prompts."""
    return (block.vpt(args[0]), *args[1:])


def _add_prompts(visual, tokens: int, blocks: list[nn.Module]) -> None:
    require(tokens >= 1, "tokens", tokens, "must be >= 1")
    width, patch_dim = visual.conv1.out_channels, visual.conv1.weight[0].numel()
    for i, block in enumerate(blocks):
        block.vpt = placed(Prompts(tokens, width, patch_dim, insert=i == 0), visual.conv1.weight)
        block.register_forward_pre_hook(_prompt_block_input)


@TUNING.register("vpt-shallow")
def vpt_shallow(visual, *, tokens: int = 10) -> None:
    """Prompt tokens inserted after CLS before the first block (shallow VPT); nothing else trains."""
    _add_prompts(visual, tokens, last_blocks(visual, "vpt-shallow", ALL)[:1])


@TUNING.register("vpt-deep")
def vpt_deep(visual, *, tokens: int = 10, blocks: str = ALL) -> None:
    """A fresh set of prompt tokens before every block, replacing the previous block's (deep VPT)."""
    _add_prompts(visual, tokens, last_blocks(visual, "vpt-deep", blocks))
