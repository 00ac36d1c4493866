"""How many encoder parameters each tuning mode trains on a model (``ltclip list tuning --model``)."""

from __future__ import annotations

import copy
import logging

from .core import count_trainable, tune_visual

COUNT_CLASSES = 1000  # the class count that sets bottleneck=auto / rank=auto in the listing (ImageNet-LT's)


def trainable_counts(model: str, modes: list[str], num_classes: int = COUNT_CLASSES) -> dict[str, int]:
    """Trainable encoder parameters of each tuning mode (default options, ``num_classes`` classes) on
    open_clip ``model`` (random weights; only the image tower is copied, the text tower never trains)."""
    from ..backbone import load_backbone

    logging.getLogger("ltclip.models.backbone").setLevel(logging.ERROR)  # weights do not matter for a count
    visual = load_backbone(model, "none").model.visual.requires_grad_(False)
    counts = {}
    for mode in modes:
        tuned = copy.deepcopy(visual)
        tune_visual(tuned, mode, {}, num_classes)
        counts[mode] = count_trainable(tuned)
    return counts
