"""The training engine: one loop (:func:`fit`) with its hooks, optimizers, schedules, checkpoints and logs."""

from ..config.values import SUMMARY_KEYS
from .checkpoint import BEST_FILE, LAST_FILE
from .log import LOG_FILE
from .loop import FitResult, TrainSource, fit
from .optim import OPTIMIZERS, SCHEDULES, create_optimizer, create_schedule, lr_factor
from .options import ParamGroups, RunEnv
from .plan import check_optim, run_length, steps_per_epoch
from .validation import ValidationStats

__all__ = [
    "BEST_FILE", "LAST_FILE", "LOG_FILE", "OPTIMIZERS", "SCHEDULES", "SUMMARY_KEYS", "FitResult", "ParamGroups", "RunEnv",
    "TrainSource", "ValidationStats", "check_optim", "create_optimizer", "create_schedule", "fit", "lr_factor",
    "run_length", "steps_per_epoch",
]
