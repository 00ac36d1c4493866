"""The training engine: one loop (:func:`fit`), its task, optimizers, schedules, checkpoints and logs."""

from .loop import BEST_FILE, LAST_FILE, FitResult, TrainSource, check_optim, fit, run_length, steps_per_epoch
from .log import LOG_FILE
from .optim import OPTIMIZERS, SCHEDULES, create_optimizer, create_schedule, lr_factor
from .task import Task
from .validation import SUMMARY_KEYS, ValidationStats

__all__ = [
    "BEST_FILE", "LAST_FILE", "LOG_FILE", "OPTIMIZERS", "SCHEDULES", "SUMMARY_KEYS", "FitResult", "Task", "TrainSource",
    "ValidationStats", "check_optim", "create_optimizer", "create_schedule", "fit", "lr_factor", "run_length",
    "steps_per_epoch",
]
