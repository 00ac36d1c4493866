"""Post-hoc logit adjustment (Menon et al. 2021) and the τ grid it and τ-normalisation sweep."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ...core.errors import LtclipError
from ..losses import _counts, _log_prior
from ...evaluation.metrics import as_numpy, evaluate

TAU_GRID = tuple(round(0.1 * k, 1) for k in range(21))  # 0.0, 0.1, ..., 2.0


def balanced_accuracy(logits: Any, labels: Any, counts: Any) -> float:
    return evaluate(logits, labels, counts)["balanced_accuracy"]


def tau_grid(taus: Sequence[float]) -> list[float]:
    grid = np.asarray(taus, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0 or not np.isfinite(grid).all():
        raise LtclipError(f"taus must be a non-empty list of finite numbers, got {taus!r}")
    return [float(t) for t in grid]


def posthoc_logit_adjustment(
    logits_val: Any, y_val: Any, class_counts: Any, taus: Sequence[float] = TAU_GRID
) -> tuple[float, list[dict]]:
    """``logits - τ log π`` with ``π`` the train prior: the τ of highest validation balanced accuracy
    (first on ties) and the sweep table ``[{"tau", "balanced_accuracy"}]``. Apply the same shift to test logits.
    """
    logits = as_numpy(logits_val, np.float64)
    log_prior = _log_prior(_counts(class_counts)).numpy()
    if logits.ndim != 2 or logits.shape[1] != len(log_prior):
        raise LtclipError(f"logits_val {logits.shape} must be [N, C] with C = {len(log_prior)} (len(class_counts))")
    table = [
        {"tau": t, "balanced_accuracy": balanced_accuracy(logits - t * log_prior, y_val, class_counts)}
        for t in tau_grid(taus)
    ]
    best = max(table, key=lambda row: row["balanced_accuracy"])
    return best["tau"], table
