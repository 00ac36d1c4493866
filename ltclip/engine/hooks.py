"""What :func:`ltclip.engine.fit` does around its optimizer steps, one hook a concern: the NaN
guard, validation with model selection, the epoch log and ``last.pt`` checkpoints.

The loop calls every hook at each event in the order it was given them, and ``on_end`` in the
reverse order, as nested contexts exit.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable

import torch

from ..core.distributed import DistContext
from ..config.values import SELECT_LAST
from ..core.errors import LtclipError
from ..core.progress import Progress
from ..evaluation.metrics import improves
from .checkpoint import BEST_FILE, LAST_FILE, load_checkpoint, rng_state, save_checkpoint, to_python
from .log import TrainLog
from .options import RunEnv
from .state import FitState, LossTally, Trained, load_model_state, model_state

NAN_CHECK_EVERY = 25  # optimizer steps between finiteness checks (each is a host sync)


class Hook:
    """One concern of the loop; it defines the events it acts on."""

    def on_step_end(self, state: FitState, mid_epoch: bool) -> None:
        """After each optimizer step; ``mid_epoch``: not the last step of its epoch."""

    def on_epoch_end(self, state: FitState, record: dict) -> None:
        """After each epoch, ``state`` already at the next one; hooks add to the epoch's log ``record``."""

    def on_end(self, state: FitState) -> None:
        """After the last epoch."""


class NanGuard(Hook):
    """Collects step losses on the device and checks them every few steps, at epoch ends and before checkpoints."""

    def __init__(self, ctx: DistContext, out: Path | None):
        self.ctx, self.out, self.pending = ctx, out, []

    def add(self, loss: torch.Tensor) -> None:
        self.pending.append(loss.detach().float())

    def on_step_end(self, state: FitState, mid_epoch: bool) -> None:
        if len(self.pending) >= NAN_CHECK_EVERY:
            self.check(state.epoch, state.step)

    def on_epoch_end(self, state: FitState, record: dict) -> None:
        self.check(record["epoch"], record["step"])

    def check(self, epoch: int, step: int, weights=()) -> None:
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
            raise LtclipError(f"loss became {value} in epoch {epoch + 1} (by step {step}); {kept}: "
                              "lower --lr or set --grad-clip", exit_code=1)

    def _kept_step(self) -> int:
        return int(load_checkpoint(self.out / LAST_FILE)["state"]["step"])


class ModelSelection(Hook):
    """``validate(model) -> metrics`` every ``cfg.eval_every`` steps and at the epoch ends :func:`epoch_end_due`
    names, on every process.

    The weights with the best ``cfg.select`` metric (highest; lowest for nll and ece) are kept in
    memory, or in ``best.pt`` with an ``out`` folder, and loaded at the end; ``cfg.select=None``
    validates for the log only, and without ``validate`` the last weights stay. ``cfg.select="last"``
    keeps the last weights, with the latest validation as ``state.best`` (no ``best.pt``).
    """

    def __init__(self, model: torch.nn.Module, validate: Callable[[torch.nn.Module], dict] | None, cfg, epochs: int,
                 log: TrainLog, env: RunEnv):
        self.model, self.validate, self.select, self.every, self.log = model, validate, cfg.select, cfg.eval_every, log
        self.every_epochs, self.epochs = cfg.eval_every_epochs, epochs
        self.out, self.ctx = env.out, env.ctx
        self.best_weights: dict | None = None  # without ``out``

    def on_step_end(self, state: FitState, mid_epoch: bool) -> None:
        if self.every and state.step % self.every == 0 and mid_epoch:
            self.log.record({"epoch": state.epoch, "step": state.step, **self._validate(state, state.epoch)})

    def on_epoch_end(self, state: FitState, record: dict) -> None:
        if epoch_end_due(record["epoch"], self.every_epochs, self.epochs):
            record.update(self._validate(state, record["epoch"]))

    def on_end(self, state: FitState) -> None:
        if state.best is None or self.select == SELECT_LAST:
            return
        if self.out is not None:
            self.ctx.barrier()
            self.best_weights = load_checkpoint(self.out / BEST_FILE)["model"]
        load_model_state(self.model, self.best_weights)

    def _validate(self, state: FitState, epoch: int) -> dict:
        """The ``val_`` metrics of the current weights, which become ``state.best`` when they improve on it."""
        if self.validate is None:
            return {}
        self.model.eval()
        metrics = self.validate(self.model)
        self.model.train()
        summary = {f"val_{k}": v for k, v in metrics.items()}
        if self.select is None:
            return summary
        if self.select == SELECT_LAST:
            state.best = to_python({"epoch": epoch, "step": state.step, **summary})
            return summary
        score = metrics[self.select]
        if state.best is None or improves(self.select, score, state.best[f"val_{self.select}"]):
            state.best = to_python({"epoch": epoch, "step": state.step, **summary})
            if self.out is None:
                self.best_weights = copy.deepcopy(model_state(self.model))
            elif self.ctx.is_main:
                save_checkpoint(self.out / BEST_FILE, {"model": model_state(self.model)})
        return summary


class EpochLog(Hook):
    """Each epoch's record into the :class:`TrainLog` and one progress line; the log closes at the end."""

    def __init__(self, log: TrainLog, progress: Progress, epochs: int):
        self.log, self.progress, self.epochs = log, progress, epochs

    def on_epoch_end(self, state: FitState, record: dict) -> None:
        self.log.record(record)
        self.progress.log(_epoch_line(self.epochs, record))

    def on_end(self, state: FitState) -> None:
        self.log.close()


class Checkpoints(Hook):
    """``last.pt`` every ``cfg.checkpoint_every`` steps and at the epoch ends :func:`epoch_end_due` names,
    these at most every ``env.epoch_checkpoint_s`` seconds (the last epoch's always), once the NaN
    guard has passed the losses and the weights: a checkpoint never holds weights a NaN or an
    overflow has reached."""

    def __init__(self, trained: Trained, guard: NanGuard, tally: LossTally, cfg, epochs: int, env: RunEnv):
        if env.epoch_checkpoint_s and env.ctx.enabled:
            raise ValueError("fit: epoch_checkpoint_s is a per-process clock; use it on one process")
        self.trained, self.guard, self.tally, self.every, self.epochs = trained, guard, tally, cfg.checkpoint_every, epochs
        self.every_epochs = cfg.eval_every_epochs
        self.path = env.out / LAST_FILE if env.out is not None and env.ctx.is_main else None
        self.epoch_interval_s = env.epoch_checkpoint_s
        self.saved_at = time.monotonic()

    def on_step_end(self, state: FitState, mid_epoch: bool) -> None:
        if self.every and state.step % self.every == 0 and mid_epoch:
            self.save(state)

    def on_epoch_end(self, state: FitState, record: dict) -> None:
        last = record["epoch"] == self.epochs - 1
        if last or (epoch_end_due(record["epoch"], self.every_epochs, self.epochs)
                    and time.monotonic() - self.saved_at >= self.epoch_interval_s):
            self.save(state)

    def save(self, state: FitState) -> None:
        self.tally.flush(state)
        self.guard.check(state.epoch, state.step, self.trained.params)
        self.saved_at = time.monotonic()
        if self.path is not None:
            save_checkpoint(self.path, {**self.trained.state_dict(), "rng": rng_state(), "state": to_python(vars(state))})


def epoch_end_due(epoch: int, every_epochs: int, epochs: int) -> bool:
    """Whether the end of ``epoch`` (from 0) of ``epochs`` validates and checkpoints: every
    ``every_epochs``-th epoch's (``--eval-every-epochs``), and the last one's."""
    return (epoch + 1) % every_epochs == 0 or epoch == epochs - 1


def _epoch_line(epochs: int, record: dict) -> str:
    fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    line = f"epoch {record['epoch'] + 1}/{epochs}" + (f": loss {record['loss']:.4f}" if record["loss"] is not None else "")
    if "val_balanced_accuracy" in record:
        line += (f", val balanced acc {fmt(record['val_balanced_accuracy'])}%" +
                 (f" (many {fmt(record.get('val_many'))} / medium {fmt(record.get('val_medium'))} / few {fmt(record.get('val_few'))})"
                  if "val_many" in record else ""))
    return line
