"""An image encoder and a head as one model: what ``ltclip finetune`` trains and ``eval`` runs on images.

The head reads the encoder's pooled embedding or its token sequence (``head.input``), exactly what
a feature cache would hold for the same image, so ``--tune frozen`` with a float32 cache of the same
images trains like ``train-head``; or the pooled feature before the projection (``pooled``, LIFT's
classifier input), which no cache holds. Encoder parameters the head never reaches (``ln_post`` and
``proj`` when it reads tokens, ``proj`` when it reads the pooled feature) are frozen, so DDP finds no
unused trainable parameter.
"""

from __future__ import annotations

import torch
from torch import nn


class EncoderClassifier(nn.Module):
    """``images → backbone.encode → head``; the encoder runs without gradients when nothing in it trains."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone.model  # the open_clip CLIP (its text tower runs only for a prompt head)
        self.encode = backbone.encode
        self.preprocess, self.preprocess_cfg = backbone.preprocess, backbone.preprocess_cfg
        self.encode_pooled = backbone.encode_pooled
        self.head = head
        self.tokens = head.input == "tokens"
        visual = backbone.model.visual
        unreached = [*visual.ln_post.parameters()] if self.tokens else []
        if head.input in ("tokens", "pooled") and visual.proj is not None:
            unreached.append(visual.proj)
        for p in unreached:
            p.requires_grad_(False)

    @property
    def encoder_trains(self) -> bool:
        return any(p.requires_grad for p in self.backbone.parameters())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.encoder_trains):
            if self.head.input == "pooled":
                x = self.encode_pooled(images)
            else:
                embeds, tokens = self.encode(images, tokens=self.tokens)
                x = tokens if self.tokens else embeds
        return self.head(x)

    def training_state_dict(self) -> dict:
        """The head's state and the encoder's trained entries only (a run never copies the base model)."""
        from .tuning import trainable_state

        return {**{f"head.{k}": v for k, v in self.head.state_dict().items()},
                **{f"backbone.{k}": v for k, v in trainable_state(self.backbone).items()}}

    def load_training_state_dict(self, state: dict) -> None:
        from .tuning import load_trainable_state

        self.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        load_trainable_state(self.backbone, {k[9:]: v for k, v in state.items() if k.startswith("backbone.")})

    def train(self, mode: bool = True) -> "EncoderClassifier":
        """A frozen encoder stays in eval mode (as when the cache was extracted); a tuned one follows ``mode``."""
        super().train(mode)
        self.backbone.train(mode and self.encoder_trains)
        return self


@torch.inference_mode()
def image_logits(model: nn.Module, batches, device, precision: str = "fp32"):
    """``(logits [B, V, C] float32, labels)`` per batch of ``(views [B, V, 3, H, W], labels)``."""
    from ..core.distributed import autocast

    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            b, v = x.shape[:2]
            with autocast(torch.device(device), precision):
                logits = model(x.flatten(0, 1).to(device, non_blocking=True))
            yield logits.float().view(b, v, -1).cpu().numpy(), y.numpy()
    finally:
        model.train(was_training)
