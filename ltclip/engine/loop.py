"""THE training loop: every stage that trains (train-head, second stages, finetune) calls :func:`fit`.

Each optimizer step takes ``batch_size`` sampled rows in micro-batches (:mod:`.plan`); a
micro-batch's loss is weighted by its share of the step's rows, and DDP averages the processes'
gradients. The loop adds AMP (bf16/fp16 autocast, a GradScaler for fp16) and gradient clipping;
the NaN guard, validation with model selection, jsonl/TensorBoard logging and checkpoints at
optimizer-step granularity are hooks (:mod:`.hooks`): a killed run resumed with ``resume=True``
ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import numpy as np
import torch

from ..core.distributed import autocast as precision_autocast, device_precision
from ..core.progress import Progress
from ..data.samplers import BlockShuffledSampler, create_sampler
from .checkpoint import resume
from .hooks import Checkpoints, EpochLog, Hook, ModelSelection, NanGuard
from .log import TrainLog
from .optim import create_optimizer, create_schedule, schedule_epoch_steps, warmup_steps
from .options import ParamGroups, RunEnv
from .plan import Plan, plan_run
from .state import FitState, LossTally, Trained


class TrainSource(Protocol):
    """Training rows: ``labels`` for the sampler, and batches of any rows in a given order."""

    labels: np.ndarray

    def batches(self, order: np.ndarray, batch_size: int, epoch: int, positions: np.ndarray) -> Iterator[tuple]:
        """``(x, y)`` batches over ``order``; ``positions`` are the rows' places in the epoch's global order."""


@dataclass
class FitResult:
    best: dict | None  # {"epoch", "step", "val_<metric>"...} of the selected weights, None without validation
    history: list = field(default_factory=list)  # every log record
    steps: int = 0
    epochs: int = 0


def fit(
    model: torch.nn.Module,
    task: Callable,
    source: TrainSource,
    cfg,
    *,
    num_classes: int,
    sampler: str = "instance",
    validate: Callable[[torch.nn.Module], dict] | None = None,
    groups: ParamGroups = ParamGroups(),
    env: RunEnv = RunEnv(),
) -> FitResult:
    """Train ``model``'s trainable parameters with ``task(model, x, y, epoch) -> (loss, _)`` on ``source``
    as :class:`OptimConfig` ``cfg`` says, in the order of ``sampler`` over ``num_classes`` classes.

    ``validate(model) -> metrics`` drives model selection (:class:`~.hooks.ModelSelection`);
    ``groups`` optimizes submodules their own way; ``env`` says where the run lives and reports.
    """
    ctx = env.ctx
    progress = env.progress if env.progress is not None and ctx.is_main else Progress()
    labels = np.asarray(source.labels)
    plan = plan_run(cfg, len(labels), ctx.world_size, groups)
    order = create_sampler(sampler, labels, num_classes, seed=cfg.seed, total_epochs=plan.epochs,
                           rank=ctx.rank, world_size=ctx.world_size)
    if env.block_order is not None:
        order = BlockShuffledSampler(order, *env.block_order)
    autocast = precision_autocast(torch.device(env.device), cfg.precision)
    optimizer = create_optimizer(model, cfg, groups.parts or groups.lrs, groups.no_decay, grouped=groups.parts is not None)
    schedule = create_schedule(optimizer, cfg.schedule, plan.total, warmup_steps(cfg, plan.per_epoch), plan.part_steps,
                               schedule_epoch_steps(cfg, plan.per_epoch))
    fp16 = device_precision(torch.device(env.device), cfg.precision) == "fp16"
    trained = Trained(model, optimizer, schedule, torch.amp.GradScaler("cuda") if fp16 else None)
    loop = _Loop(trained, task, source, order, cfg, plan, autocast, env, progress)
    log = TrainLog(env.out if ctx.is_main else None, tensorboard=env.tensorboard, on_record=env.on_record)
    state = FitState()
    if env.resume:
        state = resume(env.out, trained)
        progress.log(f"resuming {env.out} at step {state.step} of {plan.total} (epoch {state.epoch + 1} of {plan.epochs})")
    log.start(state.step)
    loop.run(state, [loop.guard, ModelSelection(model, validate, cfg, plan.epochs, log, env), EpochLog(log, progress, plan.epochs),
                     Checkpoints(trained, loop.guard, loop.tally, cfg, plan.epochs, env)])
    return FitResult(state.best, log.history, state.step, plan.epochs)


class _Loop:
    """The epochs of optimizer steps in the sampler's order; everything else is the hooks' work."""

    def __init__(self, trained: Trained, task: Callable, source: TrainSource, sampler, cfg, plan: Plan, autocast,
                 env: RunEnv, progress: Progress):
        self.device, self.ctx = torch.device(env.device), env.ctx
        self.task = task.to(self.device) if hasattr(task, "to") else task
        self.task.total_epochs = plan.epochs
        self.forward_module = trained.model  # what the forward passes call: the model, DDP-wrapped across processes
        if self.ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_module = DistributedDataParallel(trained.model, device_ids=ids)
        self.trained, self.source, self.sampler, self.cfg, self.plan = trained, source, sampler, cfg, plan
        self.autocast, self.progress = autocast, progress
        self.tally, self.guard = LossTally(self.device, self.ctx), NanGuard(self.ctx, env.out)

    def run(self, state: FitState, hooks: list[Hook]) -> None:
        """Train from ``state`` to the end of the plan, calling ``hooks`` at each event."""
        for epoch in range(state.epoch, self.plan.epochs):
            self.trained.model.train()
            self._epoch(state, epoch, hooks)
            record = {"epoch": epoch, "step": state.step, "loss": self.tally.epoch_mean(state),
                      "lr": self.trained.schedule.get_last_lr()[0]}
            state.epoch, state.epoch_steps, state.loss_sum, state.loss_rows = epoch + 1, 0, 0.0, 0
            for hook in hooks:
                hook.on_epoch_end(state, record)
        for hook in reversed(hooks):
            hook.on_end(state)

    def _epoch(self, state: FitState, epoch: int, hooks: list[Hook]) -> None:
        """The steps of ``epoch`` not taken yet (all but ``state.epoch_steps``)."""
        plan, ctx = self.plan, self.ctx
        self.sampler.set_epoch(epoch)
        order = np.fromiter(iter(self.sampler), dtype=np.int64, count=len(self.sampler))
        positions = ctx.rank + ctx.world_size * np.arange(len(order))
        steps = plan.steps_in(epoch)
        lo, hi = state.epoch_steps * plan.local_batch, min(len(order), steps * plan.local_batch)
        batches = self.source.batches(order[lo:hi], plan.micro, epoch, positions[lo:hi])
        with self.progress.task(f"epoch {epoch + 1}/{plan.epochs}", steps - state.epoch_steps, "step") as advance:
            for start in range(lo, hi, plan.local_batch):
                self._step(batches, min(plan.local_batch, hi - start), epoch)
                state.step += 1
                state.epoch_steps += 1
                advance(1)
                for hook in hooks:
                    hook.on_step_end(state, state.epoch_steps < steps)

    def _step(self, batches: Iterator[tuple], rows: int, epoch: int) -> None:
        """One optimizer step on the next ``rows`` rows of ``batches``, in micro-batches."""
        scaler, count = self.trained.scaler, math.ceil(rows / self.plan.micro)
        for k in range(count):
            x, y = next(batches)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with (self.forward_module.no_sync() if self.ctx.enabled and k < count - 1 else nullcontext()), self.autocast:
                loss, _ = self.task(self.forward_module, x, y, epoch)
            weighted = loss * (len(y) / rows) if rows != len(y) else loss
            (scaler.scale(weighted) if scaler is not None else weighted).backward()
            self.guard.add(loss)
            self.tally.add(loss, len(y))
        self.trained.update(self.cfg.grad_clip)
