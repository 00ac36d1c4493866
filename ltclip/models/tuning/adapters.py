"""Bottleneck adapters in the transformer blocks, as LIFT defines them: serial (adapter) and parallel
(AdaptFormer).

Both follow LIFT's ``models/peft_modules.py`` (``Adapter``, ``AdaptFormer``) and their placement
its ``models/peft_vit.py`` (``Peft_ViT.forward``): the branch is ``up(relu(down(norm(·))))`` with
its own LayerNorm ``norm`` (weight 1, bias 0, trained), ``down`` [b, W] Kaiming-normal (a=√5) with
a zero bias and ``up`` (weight and bias) zero, so the tuned model starts equal to the base.

* adapter: serial on the MLP's output ``h``: ``h + branch(h)``, appended to ``block.mlp``.
* adaptformer: parallel, reading the block's residual stream ``x`` (the MLP sub-layer's input
  before ``ln_2``): ``x + mlp(ln_2(x)) + scale · branch(x)``, ``scale`` a learned scalar from 1.
  The block's class becomes :class:`AdaptFormerBlock` (same parameters and names, one child more).

The bottleneck ``b`` defaults to LIFT's class-count rule (``bottleneck=auto``, :func:`~.core.lift_width`);
``blocks=k`` puts adapters in the last k blocks only (LIFT's ``partial``).
"""

from __future__ import annotations

import functools

import math

import torch
from torch import nn

from ...core.errors import LtclipError
from .core import ALL, AUTO, TUNING, Inserted, last_blocks, placed, require, require_vit, width


DOWN_INITS = {"normal": nn.init.kaiming_normal_, "uniform": nn.init.kaiming_uniform_}  # LIFT's / LIFT+'s


class Bottleneck(Inserted):
    """``up(relu(down(norm(x))))``: zero at initialisation; ``down`` kaiming-``down_init`` (a=√5)."""

    def __init__(self, width: int, bottleneck: int, down_init: str = "normal"):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        DOWN_INITS[down_init](self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(self.norm(x))))


class SerialAdapter(Bottleneck):
    """``h + up(relu(down(norm(h))))`` on the MLP's output ``h`` (appended to the MLP)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + super().forward(h)


class ScaledBottleneck(Bottleneck):
    """``scale · up(relu(down(norm(x))))``; ``scale`` a parameter when learned, else a constant."""

    def __init__(self, width: int, bottleneck: int, scale: float, learn_scale: bool, down_init: str):
        super().__init__(width, bottleneck, down_init)
        self.scale = nn.Parameter(torch.full((1,), float(scale))) if learn_scale else float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * super().forward(x)


@functools.cache
def _blocks() -> tuple[type, type]:
    """``(open_clip's ResidualAttentionBlock, AdaptFormerBlock)``, built on first use: importing open_clip
    (torchvision, about 1.7 s) is left to the commands that build a model, not ``ltclip list``."""
    from open_clip.transformer import ResidualAttentionBlock

    class AdaptFormerBlock(ResidualAttentionBlock):
        """open_clip's residual block with an AdaptFormer branch beside its MLP sub-layer, reading the
        residual stream ``x`` rather than ``ln_2(x)`` (LIFT, ``models/peft_vit.py``)."""

        def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
            x = q_x + self.ls_1(self.attention(q_x=self.ln_1(q_x), attn_mask=attn_mask))
            return x + self.ls_2(self.mlp(self.ln_2(x))) + self.adaptformer(x)

    return ResidualAttentionBlock, AdaptFormerBlock


def _blocks_and_width(visual, mode: str, bottleneck, blocks, num_classes) -> tuple[list[nn.Module], int]:
    chosen = last_blocks(visual, mode, blocks)
    return chosen, width("bottleneck", bottleneck, num_classes, len(require_vit(visual, mode)))


@TUNING.register("adapter")
def adapter(visual, *, bottleneck: str = AUTO, blocks: str = ALL, num_classes: int | None = None) -> None:
    """A serial bottleneck adapter after each block's MLP (LIFT's adapter): h + up(relu(down(norm(h))))."""
    chosen, b = _blocks_and_width(visual, "adapter", bottleneck, blocks, num_classes)
    for block in chosen:
        channels = block.mlp.c_proj.out_features
        block.mlp.add_module("adapter", placed(SerialAdapter(channels, b), block.mlp.c_proj.weight))


@TUNING.register("adaptformer")
def adaptformer(visual, *, bottleneck: str = AUTO, scale: float = 1.0, learn_scale: bool = True, blocks: str = ALL,
                down_init: str = "normal", num_classes: int | None = None) -> None:
    """A parallel bottleneck beside each block's MLP on the residual stream (AdaptFormer, LIFT's default).

    ``scale`` is the branch's factor, learned from that value unless ``learn_scale=false``
    (``scale=0.1 learn_scale=false`` is AdaptFormer's original fixed factor); ``down_init`` is
    LIFT's kaiming-``normal`` or LIFT+'s kaiming-``uniform`` (LIFT-plus ``models/modules.py``).
    """
    require(down_init in DOWN_INITS, "down_init", down_init, f"choose one of {', '.join(DOWN_INITS)}")
    chosen, b = _blocks_and_width(visual, "adaptformer", bottleneck, blocks, num_classes)
    plain, with_branch = _blocks()
    for block in chosen:
        if type(block) is not plain or hasattr(block, "ln_1_kv"):
            raise LtclipError(f"tuning mode 'adaptformer' needs open_clip's self-attention ResidualAttentionBlock, "
                              f"not {type(block).__name__}")
        block.adaptformer = placed(ScaledBottleneck(block.ln_2.normalized_shape[0], b, scale, learn_scale, down_init),
                                   block.mlp.c_fc.weight)
        block.__class__ = with_branch
