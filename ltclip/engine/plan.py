"""How a run's rows become optimizer steps: the options checked, micro-batches, steps and epochs.

One optimizer step consumes ``batch_size`` sampled rows in total: ``world_size`` processes each take
their share of the sampler's order (rank ``r`` its positions ``r::world_size``) in ``accum``
micro-batches, so the same config gives the same optimization on any number of processes or
accumulation steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Collection

from ..config.fields import check_select, check_values
from ..config.values import SUMMARY_KEYS
from ..core.errors import LtclipError
from .optim import SCHEDULES, schedule_epoch_steps, warmup_steps
from .options import ParamGroups


def check_optim(cfg, world_size: int = 1, metrics: Collection[str] | None = SUMMARY_KEYS) -> None:
    """Refuse an :class:`OptimConfig` the loop cannot run, before anything is trained or written:
    every value in its field's range or set (:func:`~ltclip.config.fields.check_values`), then the options
    that depend on each other.

    ``metrics``: the validation metrics ``--select`` may name besides ``last`` (None: any, for a
    ``validate`` of the caller's own).
    """
    check_values(cfg)
    if cfg.batch_size % (world_size * cfg.accum):
        raise LtclipError(f"--batch-size {cfg.batch_size} must be a multiple of processes × --accum "
                          f"({world_size} × {cfg.accum}); it is the rows of one optimizer step in total")
    if cfg.schedule not in SCHEDULES:
        raise LtclipError(f"--schedule {cfg.schedule!r}: choose one of {', '.join(SCHEDULES.names())}")
    if metrics is not None:
        check_select(cfg.select, metrics)


def check_warmup(cfg, per_epoch: int) -> None:
    """Refuse ``--warmup-steps`` beyond a run whose length is in epochs: known only once the rows are
    (``per_epoch`` optimizer steps an epoch). A warm-up and a length in one unit are checked with the
    options given (:func:`ltclip.recipes.resolve.checked`); a warm-up in epochs may outlast ``--steps``."""
    if cfg.steps is not None or cfg.warmup_steps is None:
        return
    total, epochs = run_length(cfg, per_epoch)
    if cfg.warmup_steps > total:
        raise LtclipError(f"--warmup-steps {cfg.warmup_steps}: longer than the run's {total} optimizer steps ({epochs} "
                          f"epoch(s) of {per_epoch}); give at most {total}, or --warmup in epochs")


def steps_per_epoch(cfg, rows: int, world_size: int = 1) -> int:
    """Optimizer steps in one epoch of ``rows`` training rows."""
    return _batches(cfg, rows, world_size)[2]


def run_length(cfg, per_epoch: int) -> tuple[int, int]:
    """``(optimizer steps, epochs)`` of a run of :class:`OptimConfig` ``cfg`` at ``per_epoch`` steps an epoch."""
    total = cfg.steps or cfg.epochs * per_epoch
    return total, math.ceil(total / per_epoch)


@dataclass(frozen=True)
class Plan:
    """A run's batches and length, on each process."""

    micro: int  # rows of one micro-batch
    local_batch: int  # rows of one optimizer step
    per_epoch: int  # optimizer steps in an epoch
    total: int  # optimizer steps in the run
    part_steps: dict[str, tuple[str, int, int, int]]  # each part's (schedule, total, warm-up and epoch steps)

    @property
    def epochs(self) -> int:
        return math.ceil(self.total / self.per_epoch)

    def steps_in(self, epoch: int) -> int:
        """Optimizer steps in ``epoch``: a run of ``--steps`` may end mid-epoch."""
        return min(self.per_epoch, self.total - epoch * self.per_epoch)


def plan_run(cfg, rows: int, world_size: int, groups: ParamGroups) -> Plan:
    """The :class:`Plan` of ``cfg`` on ``rows`` training rows; the options (each part's too) checked first.
    With ``groups.parts`` the run lasts until the longest part ends."""
    micro, local, per_epoch = _batches(cfg, rows, world_size)
    check_warmup(cfg, per_epoch)
    part_steps = _part_steps(cfg, groups, per_epoch)
    total = max(t for _, t, _, _ in part_steps.values()) if groups.parts else run_length(cfg, per_epoch)[0]
    return Plan(micro, local, per_epoch, total, part_steps)


def _batches(cfg, rows: int, world: int) -> tuple[int, int, int]:
    """(micro-batch size, rows per process and step, optimizer steps per epoch)."""
    check_optim(cfg, world, metrics=None)
    if rows // world < 1:
        raise LtclipError(f"{rows} training rows cannot be shared by {world} processes")
    local = cfg.batch_size // world
    return local // cfg.accum, local, math.ceil(rows // world / local)


def _part_steps(cfg, groups: ParamGroups, per_epoch: int) -> dict[str, tuple[str, int, int, int]]:
    """Each part's ``(schedule, total steps, warm-up steps, epoch steps)``, its options checked first."""
    if not groups.parts:
        return {}
    if groups.lrs:
        raise ValueError("fit: pass parts or lrs, not both")
    for name, part in groups.parts.items():
        check_optim(part, metrics=None)
        check_warmup(part, per_epoch)
        if (part.optimizer, part.nesterov) != (cfg.optimizer, cfg.nesterov):
            raise LtclipError(f"part {name!r}: --optimizer {part.optimizer} (nesterov {part.nesterov}) differs from the "
                              f"loop's {cfg.optimizer} (nesterov {cfg.nesterov}); parts share one optimizer")
    return {name: (p.schedule, run_length(p, per_epoch)[0], warmup_steps(p, per_epoch), schedule_epoch_steps(p, per_epoch))
            for name, p in groups.parts.items()}
