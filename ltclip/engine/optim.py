"""Optimizers (timm's factory) and per-step learning-rate schedules with linear warm-up.

Schedules are pure functions of the training progress ``t ∈ [0, 1)`` after warm-up, turned into
one ``LambdaLR`` stepped once per optimizer step: its state is a step counter, so a resumed run
continues exactly. (timm's schedulers are epoch-first objects with their own warm-up convention;
one per-step multiplier covers every schedule here, including the paper's 7/16-cycle cosine.)
"""

from __future__ import annotations

import math

import torch

from ..errors import LtclipError
from ..registry import Registry

SCHEDULES: Registry = Registry("schedule")
# ltclip's optimizer names → timm's (`sgd` is heavy-ball momentum; with nesterov=True timm's "nesterov").
OPTIMIZERS = {"adamw": "adamw", "sgd": "momentum"}


@SCHEDULES.register("cosine")
def cosine(t: float) -> float:
    """Half a cosine from 1 to 0."""
    return 0.5 * (1 + math.cos(math.pi * t))


@SCHEDULES.register("step")
def step(t: float) -> float:
    """×0.1 at 60% and again at 80% of training."""
    return 0.1 ** ((t >= 0.6) + (t >= 0.8))


@SCHEDULES.register("constant")
def constant(t: float) -> float:
    """The peak learning rate throughout."""
    return 1.0


def lr_factor(step_index: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at ``step_index``: linear warm-up over ``warmup`` steps, then the schedule."""
    if step_index < warmup:
        return (step_index + 1) / warmup
    return SCHEDULES.get(schedule)((step_index - warmup) / max(1, total - warmup))


def create_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` over ``model``'s trainable parameters, from an :class:`OptimConfig`.

    ``no_decay_1d`` keeps weight decay off biases, norms and other 1-D parameters (timm's
    ``filter_bias_and_bn``, which also honours a model's ``no_weight_decay()``).
    """
    from timm.optim import create_optimizer_v2

    if cfg.optimizer not in OPTIMIZERS:
        raise LtclipError(f"--optimizer {cfg.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    name = "nesterov" if cfg.optimizer == "sgd" and cfg.nesterov else OPTIMIZERS[cfg.optimizer]
    extra = {"momentum": cfg.momentum} if cfg.optimizer == "sgd" else {}
    params = model if cfg.no_decay_1d else [p for p in model.parameters() if p.requires_grad]
    if not any(p.requires_grad for p in model.parameters()):
        raise LtclipError("nothing to train: every parameter of the model is frozen")
    return create_optimizer_v2(params, opt=name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               filter_bias_and_bn=cfg.no_decay_1d, **extra)


def create_schedule(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_steps: int):
    """A per-step ``LambdaLR`` of :func:`lr_factor` (call ``.step()`` after every optimizer step)."""
    SCHEDULES.get(schedule)  # unknown names fail here, before training
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, schedule))
