"""A training task: a model, a registered loss and the class counts it is weighted by."""

from __future__ import annotations

import torch

from .losses import LOSSES, compute_loss


class Task:
    """``task(model, x, y, epoch) -> (loss, logits)`` with loss ``name`` and its options.

    ``total_epochs`` reaches schedule-aware losses (LDAM's deferred re-weighting) through
    ``compute_loss``; the counts live on the loss's device once :meth:`to` is called.
    """

    def __init__(self, loss: str, loss_opts: dict, class_counts, total_epochs: int = 1):
        LOSSES.get(loss)
        self.loss, self.loss_opts, self.total_epochs = loss, dict(loss_opts), int(total_epochs)
        self.counts = torch.as_tensor(class_counts, dtype=torch.float32)

    def to(self, device) -> "Task":
        self.counts = self.counts.to(device)
        return self

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int):
        logits = model(x)
        loss = compute_loss(self.loss, logits.float(), y, self.counts, epoch=epoch, total_epochs=self.total_epochs,
                            **self.loss_opts)
        return loss, logits
