"""The tuning-mode registry and what every mode shares: applying a mode, its trained state, counts.

A mode is a function ``mode(visual, *, <options>)`` registered with ``@TUNING.register(name)``: it
receives the frozen image tower ``model.visual`` and makes its own parameters trainable or inserts
new modules (subclasses of :class:`Inserted`) into it. Its keyword-only parameters are its options
(``--tune-opt key=value``), except ``num_classes``, which :func:`apply_tuning` passes to the modes
that declare it; its docstring's first line says what it trains.

The modes follow LIFT (Shi et al. 2024, github.com/shijxcs/LIFT, ``models/peft_vit.py``): what a
mode trains lies inside the transformer blocks, and the adapters' and LoRA's width defaults to
LIFT's class-count rule (:func:`lift_width`).
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from ...core.errors import LtclipError
from ...core.registry import Registry

TUNING: Registry = Registry("tuning mode", flag="--tune-opt", exclude=("num_classes",))
AUTO = "auto"
ALL = "all"


class Inserted(nn.Module):
    """A module a tuning mode adds to the image tower; its parameters train, its buffers are stored."""


def require(ok: bool, option: str, value, requirement: str) -> None:
    """A one-line ``--tune-opt`` error unless ``ok``."""
    if not ok:
        raise LtclipError(f"--tune-opt {option}={value!r}: {requirement}")


def require_vit(visual, mode: str):
    """``visual``'s residual blocks; LtclipError unless it is open_clip's own VisionTransformer."""
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise LtclipError(f"tuning mode {mode!r} needs an open_clip ViT image tower, not {type(visual).__name__}")
    return visual.transformer.resblocks


def placed(module: nn.Module, like: torch.Tensor) -> nn.Module:
    """``module`` (built on the CPU from the global RNG) moved to ``like``'s device and dtype."""
    return module.to(device=like.device, dtype=like.dtype)


def lift_width(num_classes: int, num_blocks: int) -> int:
    """LIFT's adapter / LoRA width: ``2 ** max(0, int(log2(C / 2L)))`` (``models/peft_vit.py``, ViT_Tuner);
    32, 8 and 256 for ImageNet-LT, Places-LT and iNat18 on a 12-block ViT."""
    return 2 ** max(0, int(math.log2(num_classes / (2 * num_blocks))))


def _integer(option: str, value) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    require(number is not None and number == float(value), option, value, "must be an integer")
    return number


def width(option: str, value, num_classes: int | None, num_blocks: int) -> int:
    """A bottleneck / rank option: an integer >= 1, or ``auto`` for :func:`lift_width` of the class count."""
    if value == AUTO:
        require(num_classes is not None, option, value, "needs the class count; pass an integer")
        return lift_width(num_classes, num_blocks)
    number = _integer(option, value)
    require(number >= 1, option, value, "must be >= 1 (or auto)")
    return number


def last_blocks(visual, mode: str, blocks) -> list[nn.Module]:
    """The last ``blocks`` residual blocks of ``visual`` (LIFT's ``partial``); ``all``: every block."""
    resblocks = list(require_vit(visual, mode))
    if blocks == ALL:
        return resblocks
    k, count = _integer("blocks", blocks), len(resblocks)
    require(1 <= k <= count, "blocks", blocks, f"the image tower has {count} blocks; choose 1 … {count} or all")
    return resblocks[count - k:]


def tune_visual(visual, name: str, options: dict, num_classes: int | None = None) -> None:
    """Apply mode ``name`` to a frozen image tower; ``num_classes`` goes to the modes that take it."""
    extra = {"num_classes": num_classes} if "num_classes" in inspect.signature(TUNING.get(name)).parameters else {}
    TUNING.create(name, visual, **options, **extra)


def apply_tuning(model, name: str, options: dict, num_classes: int | None = None) -> None:
    """On an open_clip CLIP whose parameters are all frozen: make mode ``name``'s parameters of the
    IMAGE tower trainable and insert any new modules (LoRA, adapters, prompts) into ``model.visual``.

    ``num_classes`` sets the width of ``bottleneck=auto`` / ``rank=auto``. New parameters come from
    the global torch RNG (callers seed it). The text tower stays frozen.
    """
    model.requires_grad_(False)
    tune_visual(model.visual, name, options, num_classes)


def _inserted(model) -> list[tuple[str, Inserted]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Inserted)]


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The state-dict entries a finetuned run stores: every parameter with ``requires_grad`` and every
    buffer of an inserted module (names as in ``model.state_dict()``)."""
    keys = {name for name, p in model.named_parameters() if p.requires_grad}
    for prefix, module in _inserted(model):
        keys.update(f"{prefix}.{b}" for b, _ in module.named_buffers())
    return {k: v for k, v in model.state_dict().items() if k in keys}


def load_trainable_state(model, state: dict) -> None:
    """After :func:`apply_tuning` on a freshly loaded base model: load ``state`` (from
    :func:`trainable_state`); a missing, unexpected or misshapen entry is a one-line LtclipError."""
    expected = trainable_state(model)
    hint = "(was it trained with another --tune or --tune-opt?)"
    for what, keys in (("missing", expected.keys() - state.keys()), ("unexpected", state.keys() - expected.keys())):
        if keys:
            more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
            raise LtclipError(f"trained encoder state: {what} entry {sorted(keys)[0]}{more} {hint}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise LtclipError(
                f"trained encoder state: {key} has shape {tuple(value.shape)}, the model {tuple(expected[key].shape)} {hint}"
            )
    model.load_state_dict(state, strict=False)


def no_weight_decay_names(model) -> set[str]:
    """Trainable parameter names that must not be weight-decayed besides 1-D ones: the image tower's
    own exemptions (open_clip's ``visual.no_weight_decay()``: the class and positional embeddings,
    trained by ``full tower=true`` only). Inserted modules are decayed like LIFT's tuner."""
    names = {f"visual.{n}" for n in getattr(model.visual, "no_weight_decay", lambda: set())()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return names & trainable


def count_trainable(model) -> int:
    """The number of trainable parameter values (the whole model: the text tower is frozen)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
