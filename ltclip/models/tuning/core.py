"""The tuning-mode registry and what every mode shares: applying a mode, its trained state, counts.

A mode is a function ``mode(visual, *, <options>)`` registered with ``@TUNING.register(name)``: it
receives the frozen image tower ``model.visual`` and makes its own parameters trainable or inserts
new modules (subclasses of :class:`Inserted`) into it. Its keyword-only parameters are its options
(``--tune-opt key=value``); its docstring's first line says what it trains.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.errors import LtclipError
from ...core.registry import Registry

TUNING: Registry = Registry("tuning mode", flag="--tune-opt")


class Inserted(nn.Module):
    """A module a tuning mode adds to the image tower; its parameters train, its buffers are stored.

    ``no_decay`` names its own parameters that must not be weight-decayed (beyond 1-D ones).
    """

    no_decay: tuple[str, ...] = ()


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


def apply_tuning(model, name: str, options: dict) -> None:
    """On an open_clip CLIP whose parameters are all frozen: make mode ``name``'s parameters of the
    IMAGE tower trainable and insert any new modules (LoRA, adapters, prompts) into ``model.visual``.

    New parameters come from the global torch RNG (callers seed it). The text tower stays frozen.
    """
    model.requires_grad_(False)
    TUNING.create(name, model.visual, **options)


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
    """Trainable parameter names that must not be weight-decayed besides 1-D ones: VPT prompt tokens
    and the image tower's own exemptions (open_clip's ``visual.no_weight_decay()``: the class and
    positional embeddings)."""
    names = {f"visual.{n}" for n in getattr(model.visual, "no_weight_decay", lambda: set())()}
    for prefix, module in _inserted(model):
        names.update(f"{prefix}.{n}" for n in module.no_decay)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return names & trainable


def count_trainable(model) -> int:
    """The number of trainable parameter values (the whole model: the text tower is frozen)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
