"""How many encoder parameters each tuning mode trains on a model (``ltclip list tuning --model``)."""

from __future__ import annotations

import copy
import logging

from .core import apply_tuning, count_trainable


def trainable_counts(model: str, modes: list[str]) -> dict[str, int]:
    """Trainable encoder parameters of each tuning mode (default options) on open_clip ``model`` (random weights)."""
    from ..backbone import load_backbone

    logging.getLogger("ltclip.models.backbone").setLevel(logging.ERROR)  # weights do not matter for a count
    base = load_backbone(model, "none").model
    counts = {}
    for mode in modes:
        tuned = copy.deepcopy(base)
        apply_tuning(tuned, mode, {})
        counts[mode] = count_trainable(tuned)
    return counts
