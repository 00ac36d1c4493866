"""What every second stage shares: the :class:`Calibrated` module type, its registry, and the
validated inputs (penultimate features of the train and val rows, their labels, the class counts)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ...core.errors import LtclipError
from ..losses import _counts
from ...evaluation.metrics import as_numpy
from ...core.registry import Registry

_EVAL_BATCH = 8192


class Calibrated(nn.Module):
    """A second-stage model: penultimate features ``z [B, F]`` -> logits ``[B, C]``.

    ``name`` is the registry name, ``config`` the JSON-serialisable keyword arguments with which
    :func:`build_two_stage` rebuilds the module (then ``load_state_dict``), ``summary`` what
    fitting measured (per-epoch history, selected epoch or τ). ``trains`` says whether the method
    runs the training loop; ``sampler`` and ``loss`` are the ones it trains with by default, and
    ``defaults`` the ``train-head --from`` options it trains with unless they are given (over
    :data:`~ltclip.config.SECOND_STAGE_OPTIM`; measured in docs/methods_benchmark.md).
    """

    name = ""
    trains = True
    sampler = "instance"
    loss = "ce"
    defaults: dict = {}

    def __init__(self, *, in_dim: int, num_classes: int):
        super().__init__()
        self.config: dict[str, Any] = {"in_dim": int(in_dim), "num_classes": int(num_classes)}
        self.summary: dict[str, Any] = {}

    @classmethod
    def fit(cls, base: nn.Module, data: "StageData", trainer) -> "Calibrated":
        """Build and fit on ``data`` (``trainer(model, sampler, loss, **loss_opts)`` runs the
        engine); the method's options are the keyword-only arguments after ``trainer``."""
        raise NotImplementedError


TWO_STAGE: Registry[type[Calibrated]] = Registry("two-stage method", flag="--two-stage-opt", signature=lambda cls: cls.fit)


def list_two_stage(pattern: str = "*") -> list[str]:
    """Sorted registered two-stage method names matching a glob pattern."""
    return TWO_STAGE.names(pattern)


@dataclass(frozen=True)
class StageData:
    z: Tensor
    y: Tensor
    counts: Tensor  # float64 CPU, [C]
    z_val: Optional[Tensor]
    y_val: Optional[Tensor]

    @property
    def num_classes(self) -> int:
        return len(self.counts)

    def dims(self) -> dict:
        return {"in_dim": self.z.shape[1], "num_classes": self.num_classes}


def _features(z: Any, what: str, device: torch.device) -> Tensor:
    t = torch.as_tensor(as_numpy(z, np.float32)).to(device)
    if t.ndim != 2 or len(t) == 0:
        raise LtclipError(f"{what} must be a non-empty [N, F] array of features, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise LtclipError(f"{what} contains NaN or infinite values; check the feature cache")
    return t


def _labels(y: Any, rows: int, num_classes: int, what: str, device: torch.device) -> Tensor:
    a = as_numpy(y)
    if a.shape != (rows,) or not np.issubdtype(a.dtype, np.integer):
        raise LtclipError(f"{what} must be {rows} integer labels (one per feature row), got {a.dtype} {a.shape}")
    if a.min() < 0 or a.max() >= num_classes:
        raise LtclipError(f"{what} must lie in [0, {num_classes}) (the classifier's classes); found {a.min()}..{a.max()}")
    return torch.as_tensor(a.astype(np.int64)).to(device)


def prepare(classifier: nn.Module, z_train, y_train, class_counts, z_val, y_val, device) -> tuple[nn.Module, StageData]:
    """Validate the inputs; return a frozen copy of the classifier on ``device`` and the data."""
    device = torch.device(device)
    z = _features(z_train, "z_train", device)
    base = copy.deepcopy(classifier).to(device).requires_grad_(False).eval()
    try:
        with torch.no_grad():
            out = base(z[:1])
    except RuntimeError as err:
        raise LtclipError(f"the classifier does not accept features of dim {z.shape[1]}: {err}") from None
    if out.ndim != 2:
        raise LtclipError(f"the classifier must return logits [B, C], got shape {tuple(out.shape)}")
    num_classes = out.shape[1]
    counts = _counts(class_counts)
    if counts.numel() != num_classes:
        raise LtclipError(f"class_counts has {counts.numel()} entries but the classifier has {num_classes} classes")
    y = _labels(y_train, len(z), num_classes, "y_train", device)
    if (z_val is None) != (y_val is None):
        raise LtclipError("pass both z_val and y_val, or neither")
    zv = yv = None
    if z_val is not None:
        zv = _features(z_val, "z_val", device)
        if zv.shape[1] != z.shape[1]:
            raise LtclipError(f"z_val has dim {zv.shape[1]} but z_train has dim {z.shape[1]}; use the same cache model")
        yv = _labels(y_val, len(zv), num_classes, "y_val", device)
    return base, StageData(z, y, counts, zv, yv)


def predict(module: nn.Module, z: Tensor) -> Tensor:
    """Logits of ``module`` on every row of ``z``, in chunks, without gradients."""
    with torch.no_grad():
        return torch.cat([module(chunk) for chunk in z.split(_EVAL_BATCH)])
