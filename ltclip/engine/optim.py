"""Optimizers (timm's factory) and per-step learning-rate schedules with linear warm-up.

Schedules are pure functions of the training progress ``t ∈ [0, 1)`` after warm-up, turned into
one ``LambdaLR`` stepped once per optimizer step: its state is a step counter, so a resumed run
continues exactly. Stepped per epoch (``schedule_unit="epoch"``, LIFT's ``CosineAnnealingLR``), the
lr is constant within an epoch: the schedule's value at the epoch's first step.
(timm's schedulers are epoch-first objects with their own warm-up convention;
one per-step multiplier covers every schedule here, including the paper's 7/16-cycle cosine.)
"""

from __future__ import annotations

import math
from typing import Collection

import torch

from ..config import OptimConfig
from ..core.errors import LtclipError
from ..config.fields import check_values
from ..config.values import OPTIMIZERS
from ..core.registry import Registry
from .grouped_optim import GroupedAdamW

SCHEDULES: Registry = Registry("schedule")
# ltclip's optimizer names (--optimizer) → timm's (`sgd` is heavy-ball momentum; with nesterov=True timm's "nesterov").
TIMM_NAMES = dict(zip(OPTIMIZERS, ("adamw", "momentum")))


@SCHEDULES.register("cosine")
def cosine(t: float) -> float:
    """Half a cosine from 1 to 0."""
    return 0.5 * (1 + math.cos(math.pi * t))


@SCHEDULES.register("truncated-cosine")
def truncated_cosine(t: float) -> float:
    """cos(7πt/16): a cosine cut at 7/16 of a cycle, ending at 0.195× the peak (FixMatch's, Imbalance-VLM's)."""
    return math.cos(7 * math.pi * t / 16)


@SCHEDULES.register("step")
def step(t: float) -> float:
    """×0.1 at 60% and again at 80% of training."""
    return 0.1 ** ((t >= 0.6) + (t >= 0.8))


@SCHEDULES.register("constant")
def constant(t: float) -> float:
    """The peak learning rate throughout."""
    return 1.0


def lr_factor(step_index: int, total: int, warmup: int, schedule: str, epoch_steps: int = 0) -> float:
    """Multiplier of the peak lr at ``step_index``: linear warm-up over ``warmup`` steps, then the schedule.

    ``epoch_steps > 0`` steps the schedule per epoch of that many steps: a step takes the value of
    its epoch's first step after warm-up (without warm-up, epoch ``e`` of ``E`` runs at ``t = e/E``).
    """
    if step_index < warmup:
        return (step_index + 1) / warmup
    if epoch_steps > 0:
        step_index = max(warmup, step_index - step_index % epoch_steps)
    return SCHEDULES.get(schedule)((step_index - warmup) / max(1, total - warmup))


def schedule_epoch_steps(cfg, steps_per_epoch: int) -> int:
    """The ``epoch_steps`` of :func:`lr_factor` for :class:`OptimConfig` ``cfg`` (0: stepped per optimizer step)."""
    return steps_per_epoch if cfg.schedule_unit == "epoch" else 0


def warmup_steps(cfg, steps_per_epoch: int) -> int:
    """Optimizer steps of linear warm-up: ``cfg.warmup_steps`` when set, else ``cfg.warmup`` epochs."""
    return cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup * steps_per_epoch))


def create_optimizer(model: torch.nn.Module, cfg, parts: dict[str, float] | None = None,
                     no_decay: Collection[str] = (), grouped: bool = False) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` over ``model``'s trainable parameters, from an :class:`OptimConfig`.

    ``parts`` maps submodule names to their learning rates (default: the whole model at ``cfg.lr``),
    e.g. ``{"backbone": 1e-5, "head": 1e-3}``, or to an :class:`OptimConfig` of their own: then the
    part's groups take its lr, weight decay, ``decay_1d`` and (sgd) momentum, and carry
    ``"part": name`` for :func:`create_schedule`. Weight decay stays off ``no_decay`` parameter names
    and, without ``decay_1d``, off biases, norms and other 1-D parameters (timm's
    ``param_groups_weight_decay``). ``grouped``: AdamW as :class:`GroupedAdamW` (the same updates, one
    call per operation for all groups: for models of many parts).
    """
    from timm.optim import create_optimizer_v2, param_groups_weight_decay

    check_values(cfg)  # --optimizer among OPTIMIZERS, the other fields in their ranges
    if not any(p.requires_grad for p in model.parameters()):
        raise LtclipError("nothing to train: every parameter of the model is frozen")
    groups = []
    for prefix, setting in (parts or {"": cfg.lr}).items():
        own = setting if isinstance(setting, OptimConfig) else None
        part_cfg = own or cfg
        module = model.get_submodule(prefix) if prefix else model
        skip = [n.removeprefix(prefix + ".") if prefix else n for n in no_decay if not prefix or n.startswith(prefix + ".")]
        if not part_cfg.decay_1d or skip:
            part = param_groups_weight_decay(module, part_cfg.weight_decay, not part_cfg.decay_1d, skip)
        else:
            part = [{"params": [p for p in module.parameters() if p.requires_grad]}]
        if own is None:
            groups += [{**g, "lr": setting} for g in part if g["params"]]
        else:
            extra = {"momentum": own.momentum} if cfg.optimizer == "sgd" else {}
            groups += [{"weight_decay": own.weight_decay, **g, "lr": own.lr, "part": prefix, **extra} for g in part if g["params"]]
    name = "nesterov" if cfg.optimizer == "sgd" and cfg.nesterov else TIMM_NAMES[cfg.optimizer]
    extra = {"momentum": cfg.momentum} if cfg.optimizer == "sgd" else {}
    optimizer = create_optimizer_v2(groups, opt=name, lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)
    if grouped and type(optimizer) is torch.optim.AdamW:
        defaults = {k: v for k, v in optimizer.defaults.items() if k != "decoupled_weight_decay"}  # AdamW's own
        return GroupedAdamW(optimizer.param_groups, **defaults)
    return optimizer


def create_schedule(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_steps: int,
                    parts: dict[str, tuple[str, int, int, int]] | None = None, epoch_steps: int = 0):
    """A per-step ``LambdaLR`` of :func:`lr_factor` (call ``.step()`` after every optimizer step).

    ``epoch_steps > 0``: the schedule stepped per epoch of that many steps (:func:`lr_factor`).
    ``parts`` gives the groups tagged ``"part": name`` (:func:`create_optimizer`) their own
    ``(schedule, total_steps, warmup_steps, epoch_steps)``; such a group's lr is 0 from its
    ``total_steps`` on (the part stops updating: AdamW and SGD leave a parameter exactly as it is at lr 0).
    """
    def factor(name: str, total: int, warmup: int, per_epoch: int):
        SCHEDULES.get(name)  # unknown names fail here, before training
        return lambda s: lr_factor(s, total, warmup, name, per_epoch)

    def part_factor(name: str, total: int, warmup: int, per_epoch: int):
        inner = factor(name, total, warmup, per_epoch)
        return lambda s: inner(s) if s < total else 0.0

    shared = factor(schedule, total_steps, warmup_steps, epoch_steps)
    lambdas = [part_factor(*parts[g["part"]]) if "part" in g else shared for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
