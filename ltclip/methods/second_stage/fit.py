"""Fitting a second stage: validate the inputs, let the method build its module, train it through
the engine when the method trains, and rebuild fitted modules from their configs."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from ...config import SECOND_STAGE_OPTIM, OptimConfig
from ...engine import RunEnv, ValidationStats, fit
from ..task import Task
from ...core.errors import LtclipError
from . import methods  # noqa: F401  (registers the methods)
from .base import TWO_STAGE, Calibrated, StageData, predict, prepare


class TensorSource:
    """Engine training rows held as one tensor of features (on the training device)."""

    def __init__(self, z: torch.Tensor, y: torch.Tensor):
        self.z, self.y, self.labels = z, y, y.cpu().numpy()

    def batches(self, order, batch_size, epoch, positions):
        rows = torch.as_tensor(order, device=self.z.device)
        for chunk in rows.split(batch_size):
            yield self.z[chunk], self.y[chunk]


class Trainer:
    """What a method calls to train its module: the engine with the stage's optimization.

    ``sampler``/``loss``/``loss_opts`` given here replace the method's own (cRT trains with
    class-balanced sampling and CE unless told otherwise); ``env`` is where the engine runs, on the
    features' device and with ``log`` receiving every record.
    """

    def __init__(self, data: StageData, optim: OptimConfig, *, sampler=None, loss=None, loss_opts=None,
                 log=None, env: RunEnv = RunEnv()):
        self.data, self.optim, self.seed = data, optim, optim.seed
        self.sampler, self.loss, self.loss_opts = sampler, loss, loss_opts
        self.log, self.env = log, env

    def __call__(self, model: Calibrated, **method_loss_opts) -> Calibrated:
        data = self.data
        model.to(data.z.device)
        if self.optim.epochs == 0:
            model.summary = {"history": [], "best_epoch": None}
            return model
        loss = self.loss or model.loss
        loss_opts = self.loss_opts if self.loss is not None else {**method_loss_opts, **(self.loss_opts or {})}

        def validate(m):
            stats = ValidationStats(data.num_classes)
            stats.add(predict(m, data.z_val), data.y_val)
            return stats.summary(data.counts.numpy())

        result = fit(model, Task(loss, loss_opts or {}, data.counts), TensorSource(data.z, data.y), self.optim,
                     sampler=self.sampler or model.sampler, num_classes=data.num_classes,
                     validate=validate if data.z_val is not None else None,
                     env=dataclasses.replace(self.env, device=data.z.device, on_record=self.log))
        model.summary = {"history": result.history,
                         "best_epoch": result.best["epoch"] if result.best else self.optim.epochs - 1,
                         "sampler": self.sampler or model.sampler, "loss": loss}
        if result.best is not None:
            model.summary["val_balanced_accuracy"] = result.best["val_balanced_accuracy"]
        return model


def _optim(optim: OptimConfig, **overrides) -> OptimConfig:
    given = {k: v for k, v in overrides.items() if v is not None}
    for option in ("epochs", "batch_size", "seed"):
        value = given.get(option, getattr(optim, option))
        minimum = 1 if option == "batch_size" else 0
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise LtclipError(f"{option} must be an integer >= {minimum}, got {value!r}")
    lr, wd = given.get("lr", optim.lr), given.get("weight_decay", optim.weight_decay)
    if not lr > 0 or not wd >= 0:
        raise LtclipError(f"lr must be > 0 and weight_decay >= 0, got lr={lr}, weight_decay={wd}")
    return dataclasses.replace(optim, **given)


def fit_two_stage(
    name: str,
    *,
    classifier: nn.Module,
    z_train: Any,
    y_train: Any,
    class_counts: Any,
    z_val: Any = None,
    y_val: Any = None,
    optim: OptimConfig = SECOND_STAGE_OPTIM,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    seed: int | None = None,
    sampler: str | None = None,
    loss: str | None = None,
    loss_opts: dict | None = None,
    device: str | torch.device = "cpu",
    log: Optional[Callable[[dict], None]] = None,
    env: RunEnv = RunEnv(),
    **params,
) -> Calibrated:
    """Fit two-stage method ``name`` on frozen features; ``params`` are the method's own options
    (``TWO_STAGE.options(name)``). ``optim`` (with the keyword overrides) is the engine's
    optimization, ``env`` the engine's run folder, resume, processes and progress (its device and
    ``on_record`` are ``device`` and ``log``); ``epochs=0`` returns the initialised calibration. The
    result lives on ``device`` in eval mode; ``log`` receives every training record."""
    cls = TWO_STAGE.get(name)
    TWO_STAGE.check(name, params)
    optim = _optim(optim, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed)
    base, data = prepare(classifier, z_train, y_train, class_counts, z_val, y_val, device)
    trainer = Trainer(data, optim, sampler=sampler, loss=loss, loss_opts=loss_opts, log=log, env=env)
    return cls.fit(base, data, trainer, **params).to(data.z.device).eval()


def build_two_stage(name: str, config: dict, base_classifier: nn.Module) -> Calibrated:
    """Rebuild a fitted method's module from its ``config`` (then ``load_state_dict``)."""
    cls = TWO_STAGE.get(name)
    base = copy.deepcopy(base_classifier).requires_grad_(False).eval()
    try:
        return cls(base, **config).eval()
    except TypeError as err:
        raise LtclipError(f"config {config!r} does not fit two-stage method {name!r}: {err}") from None
