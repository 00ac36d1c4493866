"""Training state on disk: everything a killed run needs to continue exactly, at any optimizer step.

``last.pt`` holds the model, optimizer, schedule and gradient-scaler states, the step, the epoch
and the optimizer steps already taken in it (the sampler's position: an epoch's order is a pure
function of ``(seed, epoch)``), the best validation so far, the epoch's running loss and every RNG
state. It is written atomically and read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..core.atomic import save_torch
from ..core.errors import LtclipError
from .state import FitState, Trained

CHECKPOINT_VERSION = 1
LAST_FILE = "last.pt"
BEST_FILE = "best.pt"


def rng_state() -> dict:
    """The global torch (and CUDA) RNG states: dropout and augmentations draw from them."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict) -> None:
    save_torch(path, {"version": CHECKPOINT_VERSION, **state})


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by :func:`save_checkpoint`; a damaged or foreign file is a one-line error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors of any kind
        raise LtclipError(f"{path}: not a readable ltclip checkpoint ({type(err).__name__}); delete it and start again") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        found = state.get("version") if isinstance(state, dict) else None
        raise LtclipError(f"{path}: checkpoint version {found!r}, this ltclip resumes version {CHECKPOINT_VERSION}; "
                          "start the run again in a new folder")
    return state


def to_python(value):
    """Numbers in ``value`` (nested dicts/lists) as plain Python scalars, so JSON and weights_only loads take them."""
    if isinstance(value, dict):
        return {k: to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    return value


def resume(out: Path | None, trained: Trained) -> FitState:
    """Load ``out/last.pt`` into ``trained`` and the RNGs; the loop's state to continue from."""
    if out is None or not (out / LAST_FILE).is_file():
        raise LtclipError(f"--resume: {out} holds no interrupted run ({LAST_FILE} missing); drop --resume")
    saved = load_checkpoint(out / LAST_FILE)
    trained.load_state_dict(saved)
    set_rng_state(saved["rng"])
    return FitState(**saved["state"])
