"""What one fit trains and counts: the model with its optimizer (:class:`Trained`), the loop's
position (:class:`FitState`) and the epoch's running loss (:class:`LossTally`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.distributed import DistContext


@dataclass
class FitState:
    """The loop's position, the best validation so far and the epoch's loss: ``last.pt``'s ``state``."""

    step: int = 0
    epoch: int = 0
    epoch_steps: int = 0  # optimizer steps already taken in ``epoch``
    best: dict | None = None
    loss_sum: float = 0.0  # over the rows of ``epoch`` so far (this process)
    loss_rows: int = 0


def model_state(model: torch.nn.Module) -> dict:
    """What checkpoints hold: ``model.training_state_dict()`` where the model defines one (a finetuned
    encoder stores only what trains), else its whole state dict."""
    return model.training_state_dict() if hasattr(model, "training_state_dict") else model.state_dict()


def load_model_state(model: torch.nn.Module, state: dict) -> None:
    (model.load_training_state_dict if hasattr(model, "load_training_state_dict") else model.load_state_dict)(state)


@dataclass
class Trained:
    """The model and what updates it: the optimizer, its schedule and the fp16 gradient scaler."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    params: list[torch.nn.Parameter] = field(init=False)  # the trainable ones

    def __post_init__(self):
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def update(self, grad_clip: float) -> None:
        """One optimizer step on the accumulated gradients (clipped when ``grad_clip`` > 0), then the schedule's."""
        if grad_clip > 0:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()

    def state_dict(self) -> dict:
        return {"model": model_state(self.model), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, saved: dict) -> None:
        load_model_state(self.model, saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.schedule.load_state_dict(saved["schedule"])
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])


class LossTally:
    """The epoch's training loss, summed on the device and moved into :class:`FitState` only at host syncs."""

    def __init__(self, device: torch.device, ctx: DistContext):
        self.running = torch.zeros((), dtype=torch.float64, device=device)
        self.rows = 0
        self.device, self.ctx = device, ctx

    def add(self, loss: torch.Tensor, rows: int) -> None:
        """A micro-batch's mean ``loss`` over its ``rows``."""
        self.running += loss.detach().double() * rows
        self.rows += rows

    def flush(self, state: FitState) -> None:
        """Move the sums into ``state`` (before it is checkpointed, and at the epoch's end)."""
        state.loss_sum += self.running.item()
        state.loss_rows += self.rows
        self.running.zero_()
        self.rows = 0

    def epoch_mean(self, state: FitState) -> float | None:
        """The epoch's mean loss over the rows of every process; None without rows."""
        self.flush(state)
        total, rows = state.loss_sum, state.loss_rows
        if self.ctx.enabled:
            import torch.distributed as dist

            t = torch.tensor([total, float(rows)], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            total, rows = t[0].item(), int(t[1].item())
        return total / rows if rows else None
