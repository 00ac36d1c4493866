"""Sweeps: a grid of train-head points, batched where their heads stack, scored on val."""

from .run import run_sweep

__all__ = ["run_sweep"]
