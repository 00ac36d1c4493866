"""What ``ltclip finetune`` trains in the image encoder: one registry of tuning modes, one file per family.

``partial`` (frozen, full, last-k, bitfit, ln) selects the tower's own parameters; ``lora``,
``adapters`` (adapter, adaptformer) and ``prompts`` (vpt-shallow, vpt-deep) insert new modules.
Every mode's defaults are LIFT's definition (github.com/shijxcs/LIFT; each file cites its source).
``ltclip list tuning`` and ``--tune`` / ``--tune-opt`` read :data:`TUNING`.
"""

from . import adapters, lora, partial, prompts  # noqa: F401  (register the modes)
from .core import (
    TUNING,
    apply_tuning,
    count_trainable,
    load_trainable_state,
    no_weight_decay_names,
    trainable_state,
)
from .counts import trainable_counts

__all__ = [
    "TUNING",
    "apply_tuning",
    "count_trainable",
    "load_trainable_state",
    "no_weight_decay_names",
    "trainable_counts",
    "trainable_state",
]
