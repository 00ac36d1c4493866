"""THE training loop: every stage that trains (train-head, second stages, finetune) calls :func:`fit`.

One optimizer step consumes ``batch_size`` sampled rows in total: ``world_size`` processes each take
their share of the sampler's order (rank ``r`` its positions ``r::world_size``) in ``accum``
micro-batches, so the same config gives the same optimization on any number of processes or
accumulation steps. Each micro-batch's loss is weighted by its share of the step's rows, and DDP
averages the processes' gradients. The loop adds AMP (bf16/fp16 autocast, a GradScaler for fp16),
gradient clipping, the NaN guard, validation with model selection, jsonl/TensorBoard logging and
checkpoints at optimizer-step granularity (:mod:`.checkpoint`): a killed run resumed with
``resume=True`` ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np
import torch

from ..data.samplers import BlockShuffledSampler, create_sampler
from ..core.distributed import PRECISIONS, DistContext, autocast as precision_autocast
from ..core.errors import LtclipError
from ..evaluation.metrics import improves
from ..core.progress import Progress
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state, to_python
from .log import TrainLog
from .optim import create_optimizer, create_schedule, warmup_steps

LAST_FILE = "last.pt"
BEST_FILE = "best.pt"
NAN_CHECK_EVERY = 25  # optimizer steps between finiteness checks (each is a host sync)


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


@dataclass
class _State:
    step: int = 0
    epoch: int = 0
    epoch_steps: int = 0  # optimizer steps already taken in ``epoch``
    best: dict | None = None
    loss_sum: float = 0.0  # over the rows of ``epoch`` so far (this process)
    loss_rows: int = 0


def check_optim(cfg, world_size: int = 1) -> None:
    """Refuse an :class:`OptimConfig` the loop cannot run, before anything is trained or written."""
    from .optim import OPTIMIZERS, SCHEDULES

    if cfg.batch_size < 1 or cfg.accum < 1 or cfg.epochs < 1 or (cfg.steps is not None and cfg.steps < 1):
        raise LtclipError("--epochs, --steps, --batch-size and --accum must be >= 1")
    if cfg.batch_size % (world_size * cfg.accum):
        raise LtclipError(f"--batch-size {cfg.batch_size} must be a multiple of processes × --accum "
                          f"({world_size} × {cfg.accum}); it is the rows of one optimizer step in total")
    steps = cfg.warmup_steps
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise LtclipError(f"--warmup-steps {cfg.warmup_steps!r}: must be an integer >= 0")
    if not cfg.lr > 0 or cfg.weight_decay < 0 or cfg.warmup < 0 or cfg.grad_clip < 0:
        raise LtclipError(f"--lr must be positive and --weight-decay, --warmup, --grad-clip >= 0 "
                          f"(got {cfg.lr}, {cfg.weight_decay}, {cfg.warmup}, {cfg.grad_clip})")
    if cfg.optimizer not in OPTIMIZERS:
        raise LtclipError(f"--optimizer {cfg.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        raise LtclipError(f"--schedule {cfg.schedule!r}: choose one of {', '.join(SCHEDULES.names())}")
    if cfg.precision not in PRECISIONS:
        raise LtclipError(f"--precision {cfg.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if cfg.eval_every < 0 or cfg.checkpoint_every < 0:
        raise LtclipError("--eval-every and --checkpoint-every must be >= 0 (0: at epoch ends only)")


def steps_per_epoch(cfg, rows: int, world_size: int = 1) -> int:
    """Optimizer steps in one epoch of ``rows`` training rows."""
    return _plan(cfg, rows, world_size)[2]


def run_length(cfg, per_epoch: int) -> tuple[int, int]:
    """``(optimizer steps, epochs)`` of a run of :class:`OptimConfig` ``cfg`` at ``per_epoch`` steps an epoch."""
    total = cfg.steps or cfg.epochs * per_epoch
    return total, math.ceil(total / per_epoch)


def _plan(cfg, rows: int, world: int) -> tuple[int, int, int]:
    """(micro-batch size, rows per process and step, optimizer steps per epoch)."""
    check_optim(cfg, world)
    if rows // world < 1:
        raise LtclipError(f"{rows} training rows cannot be shared by {world} processes")
    local = cfg.batch_size // world
    return local // cfg.accum, local, math.ceil(rows // world / local)


class _NanGuard:
    """Collects step losses on the device and checks them every few steps (and before checkpoints)."""

    def __init__(self, ctx: DistContext, out: Path | None):
        self.ctx, self.out, self.pending = ctx, out, []

    def add(self, loss: torch.Tensor) -> None:
        self.pending.append(loss.detach().float())

    def check(self, state: _State, weights=()) -> None:
        """Raise if a pending loss is not finite, or (before a checkpoint) any of ``weights`` is not:
        a step with a finite loss can still overflow the weights (the next loss is then NaN)."""
        weights = list(weights)
        if not self.pending and not weights:
            return
        recent = torch.stack(self.pending) if self.pending else torch.zeros(0)
        self.pending = []
        flags = [(~torch.isfinite(recent)).any()] + [~torch.isfinite(p.detach()).all() for p in weights]
        bad = torch.stack([f.to(flags[-1].device) for f in flags]).any().float()
        if self.ctx.enabled:
            import torch.distributed as dist

            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            where = recent[~torch.isfinite(recent)]
            value = (where[0].item() if where.numel() else
                     "unstable: the weights are no longer finite" if any(f.item() for f in flags[1:]) else
                     "not finite on another process")
            kept = (f"{self.out / LAST_FILE} keeps step {self._kept_step()}" if self.out is not None and (self.out / LAST_FILE).exists()
                    else "no checkpoint was written")
            raise LtclipError(f"loss became {value} in epoch {state.epoch + 1} (by step {state.step}); {kept}: "
                              "lower --lr or set --grad-clip", exit_code=1)

    def _kept_step(self) -> int:
        return int(load_checkpoint(self.out / LAST_FILE)["state"]["step"])


def fit(
    model: torch.nn.Module,
    task,
    source: TrainSource,
    cfg,
    *,
    sampler: str = "instance",
    num_classes: int,
    device: torch.device | str = "cpu",
    out: Path | None = None,
    resume: bool = False,
    validate: Callable[[torch.nn.Module], dict] | None = None,
    ctx: DistContext = DistContext(),
    progress: Progress | None = None,
    on_record: Callable[[dict], None] | None = None,
    tensorboard: bool = False,
    lrs: dict[str, float] | None = None,
    no_decay: tuple[str, ...] = (),
    parts: dict | None = None,
    block_order: tuple[int, int] | None = None,
    epoch_checkpoint_s: float = 0.0,
) -> FitResult:
    """Train ``model``'s trainable parameters with ``task`` on ``source`` as :class:`OptimConfig` ``cfg`` says.

    ``validate(model) -> metrics`` runs after every epoch (and every ``cfg.eval_every`` steps) on
    every process; the weights with the best ``cfg.select`` metric (highest; lowest for nll and ece) are kept and loaded at the
    end (the last weights without ``validate``, or with ``cfg.select=None``: validation for the log only). With ``out`` the loop writes ``train_log.jsonl``,
    ``last.pt`` (each epoch and every ``cfg.checkpoint_every`` steps) and ``best.pt`` there, on
    rank 0; ``resume=True`` continues from ``last.pt``. ``lrs`` maps submodules to their own peak
    learning rates and ``no_decay`` names parameters kept out of weight decay (:func:`create_optimizer`).

    ``parts`` maps submodules to an :class:`OptimConfig` of their own (instead of ``lrs``): each part
    trains on the same batches with its own lr, weight decay, momentum, schedule, warm-up and length
    (``epochs``/``steps``), and stops updating at its end; the loop runs until the longest part ends,
    with ``cfg``'s batch size, sampler, seed, optimizer and precision.

    ``block_order=(block_rows, pool_blocks)`` regroups each epoch's draws (:class:`BlockShuffledSampler`):
    the same rows, read from a slow disk in long runs. ``epoch_checkpoint_s`` skips an epoch's
    ``last.pt`` when the previous one is more recent than that many seconds (the last epoch's is
    always written; ``cfg.checkpoint_every`` still applies): for runs of many sub-second epochs.
    """
    device = torch.device(device)
    progress = progress if progress is not None and ctx.is_main else Progress()
    labels = np.asarray(source.labels)
    micro, local_batch, per_epoch = _plan(cfg, len(labels), ctx.world_size)
    part_steps = _part_steps(cfg, parts, lrs, per_epoch)
    total = max(t for _, t, _ in part_steps.values()) if parts else run_length(cfg, per_epoch)[0]
    epochs = math.ceil(total / per_epoch)
    order_sampler = create_sampler(sampler, labels, num_classes, seed=cfg.seed, total_epochs=epochs,
                                   rank=ctx.rank, world_size=ctx.world_size)
    if block_order is not None:
        order_sampler = BlockShuffledSampler(order_sampler, *block_order)
    autocast = precision_autocast(device, cfg.precision)
    optimizer = create_optimizer(model, cfg, parts or lrs, no_decay, grouped=parts is not None)
    schedule = create_schedule(optimizer, cfg.schedule, total, warmup_steps(cfg, per_epoch), part_steps)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    task = task.to(device) if hasattr(task, "to") else task
    task.total_epochs = epochs
    trained = model
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    state = _State()
    log = TrainLog(out if ctx.is_main else None, tensorboard=tensorboard, on_record=on_record)
    best_weights = None
    if resume:
        if out is None or not (out / LAST_FILE).is_file():
            raise LtclipError(f"--resume: {out} holds no interrupted run ({LAST_FILE} missing); drop --resume")
        saved = load_checkpoint(out / LAST_FILE)
        _load_state(model, saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"])
        state = _State(**saved["state"])
        progress.log(f"resuming {out} at step {state.step} of {total} (epoch {state.epoch + 1} of {epochs})")
    log.start(state.step)
    guard = _NanGuard(ctx, out)

    params = [p for p in model.parameters() if p.requires_grad]
    if epoch_checkpoint_s and ctx.enabled:
        raise ValueError("fit: epoch_checkpoint_s is a per-process clock; use it on one process")
    saved_at = time.monotonic()

    def checkpoint() -> None:
        nonlocal saved_at
        guard.check(state, params)  # never save (or return) weights a NaN or an overflow has already reached
        saved_at = time.monotonic()
        if out is not None and ctx.is_main:
            save_checkpoint(out / LAST_FILE, {
                "model": _state(model), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng_state(),
                "state": to_python(vars(state)),
            })

    def evaluate_now() -> dict:
        nonlocal best_weights
        if validate is None:
            return {}
        model.eval()
        metrics = validate(model)
        model.train()
        summary = {f"val_{k}": v for k, v in metrics.items()}
        if cfg.select is None:
            return summary
        score = metrics[cfg.select]
        if state.best is None or improves(cfg.select, score, state.best[f"val_{cfg.select}"]):
            state.best = to_python({"epoch": state.epoch, "step": state.step, **summary})
            if out is None:
                best_weights = copy.deepcopy(_state(model))
            elif ctx.is_main:
                save_checkpoint(out / BEST_FILE, {"model": _state(model)})
        return summary

    for epoch in range(state.epoch, epochs):
        model.train()
        order_sampler.set_epoch(epoch)
        order = np.fromiter(iter(order_sampler), dtype=np.int64, count=len(order_sampler))
        positions = ctx.rank + ctx.world_size * np.arange(len(order))
        steps_now = min(per_epoch, total - epoch * per_epoch)
        lo, hi = state.epoch_steps * local_batch, min(len(order), steps_now * local_batch)
        batches = source.batches(order[lo:hi], micro, epoch, positions[lo:hi])
        running = torch.zeros((), dtype=torch.float64, device=device)
        with progress.task(f"epoch {epoch + 1}/{epochs}", steps_now - state.epoch_steps, "step") as advance:
            for start in range(lo, hi, local_batch):
                rows = min(local_batch, hi - start)
                for k in range(math.ceil(rows / micro)):
                    x, y = next(batches)
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    last = k == math.ceil(rows / micro) - 1
                    with (trained.no_sync() if ctx.enabled and not last else nullcontext()), autocast:
                        loss, _ = task(trained, x, y, epoch)
                    weighted = loss * (len(y) / rows) if rows != len(y) else loss
                    (scaler.scale(weighted) if scaler is not None else weighted).backward()
                    guard.add(loss)
                    running += loss.detach().double() * len(y)
                    state.loss_rows += len(y)
                if cfg.grad_clip > 0:
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
                state.step += 1
                state.epoch_steps += 1
                advance(1)
                if len(guard.pending) >= NAN_CHECK_EVERY:
                    guard.check(state)
                due_eval = cfg.eval_every and state.step % cfg.eval_every == 0 and state.epoch_steps < steps_now
                due_ckpt = cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.epoch_steps < steps_now
                if due_eval:
                    log.record({"epoch": epoch, "step": state.step, **evaluate_now()})
                if due_ckpt:
                    state.loss_sum += running.item()
                    running.zero_()
                    checkpoint()
        guard.check(state)
        state.loss_sum += running.item()
        loss_sum, loss_rows = _reduce_sum(ctx, state.loss_sum, state.loss_rows, device)
        record = {"epoch": epoch, "step": state.step, "loss": loss_sum / loss_rows if loss_rows else None,
                  "lr": schedule.get_last_lr()[0], **evaluate_now()}
        log.record(record)
        progress.log(_epoch_line(epoch, epochs, record))
        state.epoch, state.epoch_steps, state.loss_sum, state.loss_rows = epoch + 1, 0, 0.0, 0
        if epoch == epochs - 1 or time.monotonic() - saved_at >= epoch_checkpoint_s:
            checkpoint()
    log.close()
    if state.best is not None:  # model selection: the best validated weights
        if out is not None:
            ctx.barrier()
            best_weights = load_checkpoint(out / BEST_FILE)["model"]
        _load_state(model, best_weights)
    return FitResult(state.best, log.history, state.step, epochs)


def _part_steps(cfg, parts: dict | None, lrs: dict | None, per_epoch: int) -> dict[str, tuple[str, int, int]]:
    """Each part's ``(schedule, total steps, warm-up steps)``, its options checked first."""
    if not parts:
        return {}
    if lrs:
        raise ValueError("fit: pass parts or lrs, not both")
    for name, part in parts.items():
        check_optim(part)
        if (part.optimizer, part.nesterov) != (cfg.optimizer, cfg.nesterov):
            raise LtclipError(f"part {name!r}: --optimizer {part.optimizer} (nesterov {part.nesterov}) differs from the "
                              f"loop's {cfg.optimizer} (nesterov {cfg.nesterov}); parts share one optimizer")
    return {name: (p.schedule, run_length(p, per_epoch)[0], warmup_steps(p, per_epoch)) for name, p in parts.items()}


def _state(model: torch.nn.Module) -> dict:
    """What checkpoints hold: ``model.training_state_dict()`` where the model defines one (a finetuned
    encoder stores only what trains), else its whole state dict."""
    return model.training_state_dict() if hasattr(model, "training_state_dict") else model.state_dict()


def _load_state(model: torch.nn.Module, state: dict) -> None:
    (model.load_training_state_dict if hasattr(model, "load_training_state_dict") else model.load_state_dict)(state)


def _reduce_sum(ctx: DistContext, total: float, rows: int, device) -> tuple[float, int]:
    """The epoch's loss sum and row count over every process."""
    if not ctx.enabled:
        return total, rows
    import torch.distributed as dist

    t = torch.tensor([total, float(rows)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t[0].item(), int(t[1].item())


def _epoch_line(epoch: int, epochs: int, record: dict) -> str:
    fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    line = f"epoch {epoch + 1}/{epochs}" + (f": loss {record['loss']:.4f}" if record["loss"] is not None else "")
    if "val_balanced_accuracy" in record:
        line += (f", val balanced acc {fmt(record['val_balanced_accuracy'])}%" +
                 (f" (many {fmt(record.get('val_many'))} / medium {fmt(record.get('val_medium'))} / few {fmt(record.get('val_few'))})"
                  if "val_many" in record else ""))
    return line
