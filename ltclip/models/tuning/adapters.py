"""Bottleneck adapters in each block's MLP: serial (Houlsby-style) and parallel (AdaptFormer).

Both are ``scale · up(relu(down(·)))`` with ``down`` [bottleneck, W] initialised like
``nn.Linear`` and ``up`` (weight and bias) zero, so the tuned model starts equal to the base. They
live inside ``block.mlp`` (an ``nn.Sequential``), so the base parameters keep their names and
every forward path (gradient checkpointing included) runs them.

LIFT (shijxcs/LIFT, ``models/peft_modules.py``) differs in details: its AdaptFormer branch reads
the block's residual stream through a LayerNorm of its own — the same family of functions as
reading the MLP's input ``ln_2(x)`` (an affine map of the normalised stream) — and multiplies by a
learnable scalar initialised to 1 (``scale=1.0`` starts the same); its serial adapter also
normalises its input. LIFT sets the bottleneck from the class count, ``2 ** floor(log2(C / 2L))``
(32 for ImageNet-LT on ViT-B/16); pass it as ``bottleneck=``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .core import TUNING, Inserted, placed, require, require_vit


class Bottleneck(Inserted):
    """``scale · up(relu(down(x)))``, zero at initialisation."""

    def __init__(self, width: int, bottleneck: int, scale: float):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = scale

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(torch.relu(self.down(x)))


class SerialAdapter(Bottleneck):
    """``h + scale · up(relu(down(h)))`` on the MLP's output ``h`` (appended to the MLP)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + super().forward(h)


class ParallelMLP(nn.Sequential):
    """The block's MLP plus a branch beside it: ``mlp(x) + adaptformer(x)`` on the MLP's input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for name, layer in self.named_children():
            if name != "adaptformer":
                h = layer(h)
        return h + self.adaptformer(x)


def _check(bottleneck: int) -> None:
    require(bottleneck >= 1, "bottleneck", bottleneck, "must be >= 1")


@TUNING.register("adapter")
def adapter(visual, *, bottleneck: int = 64, scale: float = 1.0) -> None:
    """A serial bottleneck adapter after each block's MLP: h + scale·up(relu(down(h)))."""
    _check(bottleneck)
    for block in require_vit(visual, "adapter"):
        width = block.mlp.c_proj.out_features
        block.mlp.add_module("adapter", placed(SerialAdapter(width, bottleneck, scale), block.mlp.c_proj.weight))


@TUNING.register("adaptformer")
def adaptformer(visual, *, bottleneck: int = 64, scale: float = 0.1) -> None:
    """A parallel bottleneck beside each block's MLP (AdaptFormer, LIFT's default): mlp(x) + scale·up(relu(down(x)))."""
    _check(bottleneck)
    for block in require_vit(visual, "adaptformer"):
        mlp = ParallelMLP(OrderedDict(block.mlp.named_children()))
        width = mlp.c_fc.in_features
        mlp.adaptformer = placed(Bottleneck(width, bottleneck, scale), mlp.c_fc.weight)
        block.mlp = mlp
