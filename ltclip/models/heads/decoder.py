"""The lightweight decoder head over the frozen ViT's token sequence [B, T, W]."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..cost import block_macs
from .base import Head, HeadInputs, HeadNeeds, check_dropout, require
from .factory import HEADS, HeadDefaults, without_prior


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


@HEADS.register("decoder", defaults=HeadDefaults(
    {"optimizer": "adamw", "lr": 0.01, "epochs": 10}, loss_options=without_prior(0.03)))
class DecoderHead(Head):
    """The lightweight decoder of Wang et al. (IJCV 2023) over the ViT token sequence.

    ``depth`` pre-norm blocks (``heads`` attention heads with qkv bias, MLP hidden
    ``mlp_ratio · W``), a final LayerNorm, and the CLS token (index 0) → Linear(W, C).
    ``final_norm=false`` leaves the final LayerNorm out, as the seed paper's code does (its decoder
    feeds the last block's CLS token straight to the classifier).
    """

    needs = HeadNeeds(input="tokens")

    def __init__(
        self, inputs: HeadInputs, *,
        depth: int = 3, heads: int = 4, mlp_ratio: float = 0.5, qkv_bias: bool = True, dropout: float = 0.0,
        final_norm: bool = True,
    ):
        super().__init__(inputs)
        width = int(inputs.token_shape[-1])
        self.mlp_hidden = int(width * mlp_ratio)
        require(depth >= 0, "depth", depth, "must be >= 0 (e.g. depth=3)")
        require(heads >= 1 and width % heads == 0, "heads", heads, f"must divide the token width {width} (e.g. 4)")
        require(self.mlp_hidden >= 1, "mlp_ratio", mlp_ratio, f"mlp_ratio · {width} must be >= 1 (e.g. 0.5)")
        check_dropout(dropout)
        self.feature_dim = width
        self.blocks = nn.ModuleList(
            DecoderBlock(width, heads, self.mlp_hidden, qkv_bias, dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width) if final_norm else nn.Identity()
        self.classifier = nn.Linear(width, inputs.num_classes)
        self.apply(_init_vit_weights)

    def features(self, x):
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])

    def sample_macs(self, input_shape):
        tokens, width = input_shape[-2:]
        return len(self.blocks) * block_macs(tokens, width, self.mlp_hidden) + self.classifier.weight.numel()
