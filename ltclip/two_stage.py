"""Second stage on a trained head (decoupled classifier learning), on cached penultimate features.

Every method takes the stage-1 classifier (``nn.Linear`` or a cosine classifier) and the
penultimate features ``z`` it was trained on, and returns a :class:`Calibrated` module mapping
``z [B, F]`` to logits ``[B, C]``. The stage-1 classifier is copied, never modified; inside a
:class:`Calibrated` it is frozen (``requires_grad=False``) except where a method retrains it.

- ``crt`` (Kang et al. ICLR 2020, "Decoupling representation and classifier"): classifier
  re-training. A copy of the stage-1 classifier is **re-initialised** (``reset_parameters()`` of
  every submodule that has one, i.e. a fresh torch default init drawn from ``seed``) and trained
  with class-balanced sampling and cross-entropy, as in the paper and in Kang et al.'s code
  (facebookresearch/classifier-balancing skips loading stage-1 weights into the
  ``DotProductClassifier`` it retrains).
- ``lws`` (Kang et al.): learnable weight scaling, ``logits'_j = f_j · logits_j`` with the stage-1
  ``W, b`` frozen, ``f`` initialised to 1, class-balanced sampling, cross-entropy. Scaling the
  logit scales ``w_j`` and ``b_j`` alike, as their ``TauNormClassifier`` (``fc(x) * scales``) does.
- ``tau-norm`` (Kang et al.): no training; ``logits'_j = z · w_j / ||w_j||^τ`` with the bias
  dropped, as in the paper. ``τ`` maximises validation balanced accuracy over ``taus``
  (first best on ties); without a validation set ``τ = tau`` (default 1, the paper's usual
  choice). The sweep table is ``summary["tau_table"]``. Needs an ``nn.Linear`` classifier.
- ``disalign`` (Zhang et al. CVPR 2021, "Distribution Alignment"): the adaptive calibration
  function ``logits' = (1 - σ) · logits + σ · (α ⊙ logits + β)`` with ``σ = sigmoid(w_g · z + b_g)``,
  stage-1 classifier frozen, trained with instance sampling and the generalised re-weighting loss
  (``grw``, weights ``∝ (1/n_j)^exponent``, ``exponent`` 1.2 as in the authors' ImageNet-LT config).
  ``α = 1, β = 0`` as in the authors' segmentation head (which writes this formula); their
  classification layer writes ``(1 + σ s) · logits + σ β`` with ``s = 1``, i.e. ``α = 2``. We
  start at ``α = 1`` so the calibrated model starts at the stage-1 logits. The gate starts at
  ``w_g = 0, b_g = 0`` (σ = 0.5 everywhere) instead of the authors' constant weight 0.1, which
  would saturate the sigmoid on wide, unnormalised embeddings.
- ``marc`` (Wang et al. ACML 2022, "Margin Calibration"): ``logits'_j = ω_j · logits_j + β_j ||w_j||``,
  ``ω = 1, β = 0`` initially, stage-1 classifier frozen. Following the authors' code
  (microsoft/robustlearn ``marc/``: ``MARCLinear``, ``GRWLoss.py``, ``sampler: null``) it is trained
  with instance sampling and the ``grw`` loss, ``exponent`` 1.2 (not a logit-adjusted loss).
  ``||w_j||`` is the row norm of the classifier's ``weight`` [C, F] (for ``nn.Linear`` the paper's
  quantity; for another head it is that head's raw weight, so ``β_j ||w_j||`` stays a learned
  per-class offset).
- ``ncm``: nearest class mean, no training: ``scale · cos(z, μ_j)`` with ``μ_j`` the renormalised
  mean of the L2-normalised train features of class ``j`` (:func:`ltclip.retrieval.class_means`).
  The default ``scale`` 16 only sharpens the softmax (cosines in [-1, 1] give a near-uniform
  softmax over many classes); it does not change predictions.

Training (all but ``tau-norm`` and ``ncm``): SGD, momentum 0.9, ``weight_decay`` on every trained
parameter, cosine learning-rate decay to 0 stepped per iteration over ``epochs`` epochs of
``len(z_train)`` draws from the method's sampler (:mod:`ltclip.data.samplers`, seeded by ``seed``),
losses from :mod:`ltclip.losses`. cRT's random re-initialisation draws from ``seed`` without
touching the global RNG; the other methods start from fixed values, so runs are deterministic on CPU. With a validation set the epoch of highest
validation balanced accuracy (first on ties) is kept, otherwise the last; ``log`` receives
``{"epoch", "loss", "lr"[, "val_balanced_accuracy"]}`` after every epoch (epochs count from 0).
``epochs=0`` returns the initialised calibration. ``summary`` records the per-epoch history.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data.samplers import create_sampler
from .errors import LtclipError
from .losses import _counts, _log_prior, compute_loss
from .metrics import as_numpy, evaluate
from .registry import Registry, keyword_defaults, parse_options
from .retrieval import class_means

TAU_GRID = tuple(round(0.1 * k, 1) for k in range(21))  # 0.0, 0.1, ..., 2.0
_EVAL_BATCH = 8192


class Calibrated(nn.Module):
    """A second-stage model: penultimate features ``z [B, F]`` -> logits ``[B, C]``.

    ``name`` is the registry name, ``config`` the JSON-serialisable keyword arguments with which
    :func:`build_two_stage` rebuilds the module (then ``load_state_dict``), ``summary`` what
    fitting measured (per-epoch history, selected epoch or τ).
    """

    name = ""

    def __init__(self, *, in_dim: int, num_classes: int):
        super().__init__()
        self.config: dict[str, Any] = {"in_dim": int(in_dim), "num_classes": int(num_classes)}
        self.summary: dict[str, Any] = {}

    @classmethod
    def fit(cls, base: nn.Module, data: "_Data", opts: "_Options") -> "Calibrated":
        """Build and fit on ``data``; method options are the keyword-only arguments after ``opts``."""
        raise NotImplementedError


TWO_STAGE: Registry[type[Calibrated]] = Registry("two-stage method")


def _register(name: str):
    def decorator(cls: type[Calibrated]) -> type[Calibrated]:
        cls.name = name
        return TWO_STAGE.register(name)(cls)

    return decorator


def list_two_stage(pattern: str = "*") -> list[str]:
    """Sorted registered two-stage method names matching a glob pattern."""
    return TWO_STAGE.names(pattern)


def two_stage_defaults(name: str) -> dict:
    """Method ``name``'s own options (the ``**params`` of :func:`fit_two_stage`) and defaults."""
    return keyword_defaults(TWO_STAGE.get(name).fit)


def parse_two_stage_opts(name: str, opts: Sequence[str]) -> dict:
    """Parse ``["key=value", ...]`` into options of method ``name`` (``taus=0,0.5,1`` for lists)."""
    return parse_options("--two-stage-opt", f"two-stage method {name!r}", two_stage_defaults(name), opts)


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class _Data:
    z: Tensor
    y: Tensor
    counts: Tensor  # float64 CPU, [C]
    z_val: Optional[Tensor]
    y_val: Optional[Tensor]

    @property
    def num_classes(self) -> int:
        return len(self.counts)


@dataclass(frozen=True)
class _Options:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    log: Optional[Callable[[dict], None]]


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
        raise LtclipError(
            f"{what} must lie in [0, {num_classes}) (the classifier's classes); found {a.min()}..{a.max()}"
        )
    return torch.as_tensor(a.astype(np.int64)).to(device)


def _prepare(classifier: nn.Module, z_train, y_train, class_counts, z_val, y_val, device) -> tuple[nn.Module, _Data]:
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
    return base, _Data(z, y, counts, zv, yv)


def _dims(data: _Data) -> dict:
    return {"in_dim": data.z.shape[1], "num_classes": data.num_classes}


def _predict(module: nn.Module, z: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.cat([module(chunk) for chunk in z.split(_EVAL_BATCH)])


def _balanced_accuracy(logits: Any, labels: Any, counts: Any) -> float:
    return evaluate(logits, labels, counts)["balanced_accuracy"]


# ---------------------------------------------------------------- training


def _train(model: Calibrated, data: _Data, opts: _Options, sampler: str, loss: str, **loss_params) -> Calibrated:
    """Train ``model``'s parameters that require grad (see the module docstring) and return it."""
    model.to(data.z.device)
    params = [p for p in model.parameters() if p.requires_grad]
    order_sampler = create_sampler(
        sampler, data.y.cpu().numpy(), data.num_classes, seed=opts.seed, total_epochs=max(opts.epochs, 1)
    )
    steps = math.ceil(len(order_sampler) / opts.batch_size)
    optimiser = torch.optim.SGD(params, lr=opts.lr, momentum=0.9, weight_decay=opts.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(1, opts.epochs * steps))
    history: list[dict] = []
    best: Optional[tuple[float, int, dict]] = None
    for epoch in range(opts.epochs):
        order_sampler.set_epoch(epoch)
        order = torch.as_tensor(list(order_sampler), device=data.z.device)
        lr = optimiser.param_groups[0]["lr"]
        model.train()
        total = 0.0
        for batch in order.split(opts.batch_size):
            value = compute_loss(
                loss, model(data.z[batch]), data.y[batch], data.counts,
                epoch=epoch, total_epochs=opts.epochs, **loss_params,
            )
            if not torch.isfinite(value):
                raise LtclipError(
                    f"{model.name}: the loss became {value.item()} in epoch {epoch}; lower lr (now {opts.lr})"
                )
            optimiser.zero_grad(set_to_none=True)
            value.backward()
            optimiser.step()
            schedule.step()
            total += value.item() * len(batch)
        model.eval()
        record = {"epoch": epoch, "loss": total / len(order), "lr": lr}
        if data.z_val is not None:
            score = _balanced_accuracy(_predict(model, data.z_val), data.y_val, data.counts)
            record["val_balanced_accuracy"] = score
            if best is None or score > best[0]:
                best = (score, epoch, copy.deepcopy(model.state_dict()))
        history.append(record)
        if opts.log is not None:
            opts.log(dict(record))
    model.summary = {"history": history, "best_epoch": opts.epochs - 1 if opts.epochs else None}
    if best is not None:
        model.load_state_dict(best[2])
        model.summary.update(best_epoch=best[1], val_balanced_accuracy=best[0])
    return model


# ---------------------------------------------------------------- methods


@_register("crt")
class ClassifierRetraining(Calibrated):
    """cRT: a re-initialised copy of the stage-1 classifier, trained with class-balanced sampling."""

    def __init__(self, base: nn.Module, *, in_dim: int, num_classes: int):
        super().__init__(in_dim=in_dim, num_classes=num_classes)
        self.classifier = copy.deepcopy(base).requires_grad_(True)

    def forward(self, z: Tensor) -> Tensor:
        return self.classifier(z)

    def reinitialise(self, seed: int) -> None:
        """Fresh default init (``reset_parameters()`` of every submodule) drawn from ``seed``."""
        resettable = [m for m in self.classifier.modules() if hasattr(m, "reset_parameters")]
        if not resettable:
            raise LtclipError(
                f"crt re-initialises the classifier, but {type(self.classifier).__name__} has no "
                "reset_parameters(); give the head class one"
            )
        self.classifier.cpu()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in resettable:
                m.reset_parameters()

    @classmethod
    def fit(cls, base, data, opts):
        model = cls(base, **_dims(data))
        model.reinitialise(opts.seed)
        return _train(model, data, opts, "class-balanced", "ce")


@_register("lws")
class LearnableWeightScaling(Calibrated):
    """LWS: ``f_j · logits_j``, stage-1 classifier frozen, ``f`` trained with class-balanced sampling."""

    def __init__(self, base: nn.Module, *, in_dim: int, num_classes: int):
        super().__init__(in_dim=in_dim, num_classes=num_classes)
        self.base = base
        self.scales = nn.Parameter(torch.ones(num_classes))

    def forward(self, z: Tensor) -> Tensor:
        return self.base(z) * self.scales

    @classmethod
    def fit(cls, base, data, opts):
        return _train(cls(base, **_dims(data)), data, opts, "class-balanced", "ce")


@_register("tau-norm")
class TauNormalisation(Calibrated):
    """τ-normalisation: ``z · w_j / ||w_j||^τ``, bias dropped; τ from a validation sweep."""

    def __init__(self, base: nn.Module, *, in_dim: int, num_classes: int, tau: float = 1.0):
        super().__init__(in_dim=in_dim, num_classes=num_classes)
        if not isinstance(base, nn.Linear):
            raise LtclipError(
                f"tau-norm rescales the rows of a linear classifier; got {type(base).__name__} "
                "(a cosine classifier's rows are already normalised)"
            )
        self.base = base
        self.tau = float(tau)
        self.config["tau"] = self.tau

    def forward(self, z: Tensor) -> Tensor:
        w = self.base.weight
        return F.linear(z, w / w.norm(dim=1, keepdim=True).clamp_min(1e-12).pow(self.tau))

    @classmethod
    def fit(cls, base, data, opts, *, taus: Sequence[float] = TAU_GRID, tau: float = 1.0):
        model = cls(base, **_dims(data), tau=tau)
        if data.z_val is None:
            model.summary = {"tau": model.tau, "tau_table": [], "note": "no validation set: tau is the tau option"}
            return model
        table = []
        for t in _tau_grid(taus):
            model.tau = t
            score = _balanced_accuracy(_predict(model, data.z_val), data.y_val, data.counts)
            table.append({"tau": t, "balanced_accuracy": score})
        best = max(table, key=lambda row: row["balanced_accuracy"])  # first best on ties
        model.tau = model.config["tau"] = best["tau"]
        model.summary = {"tau": best["tau"], "tau_table": table, "val_balanced_accuracy": best["balanced_accuracy"]}
        return model


class _InstanceGRW(Calibrated):
    """Calibrations of a frozen stage-1 classifier trained like DisAlign and MARC: instance
    sampling and the generalised re-weighting loss with weights ``∝ (1/n_j)^exponent``."""

    @classmethod
    def fit(cls, base, data, opts, *, exponent: float = 1.2):
        return _train(cls(base, **_dims(data)), data, opts, "instance", "grw", exponent=exponent)


@_register("disalign")
class DistributionAlignment(_InstanceGRW):
    """DisAlign: ``(1 - σ(z)) · logits + σ(z) · (α ⊙ logits + β)``, stage-1 classifier frozen."""

    def __init__(self, base: nn.Module, *, in_dim: int, num_classes: int):
        super().__init__(in_dim=in_dim, num_classes=num_classes)
        self.base = base
        self.gate = nn.Linear(in_dim, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.alpha = nn.Parameter(torch.ones(num_classes))
        self.beta = nn.Parameter(torch.zeros(num_classes))

    def forward(self, z: Tensor) -> Tensor:
        logits = self.base(z)
        sigma = torch.sigmoid(self.gate(z))
        return (1 - sigma) * logits + sigma * (self.alpha * logits + self.beta)


@_register("marc")
class MarginCalibration(_InstanceGRW):
    """MARC: ``ω_j · logits_j + β_j · ||w_j||``, stage-1 classifier frozen."""

    def __init__(self, base: nn.Module, *, in_dim: int, num_classes: int):
        super().__init__(in_dim=in_dim, num_classes=num_classes)
        weight = getattr(base, "weight", None)
        if not isinstance(weight, Tensor) or weight.ndim != 2 or weight.shape[0] != num_classes:
            raise LtclipError(
                f"marc needs the classifier's weight [C={num_classes}, F]; {type(base).__name__} has no such .weight"
            )
        self.base = base
        self.omega = nn.Parameter(torch.ones(num_classes))
        self.beta = nn.Parameter(torch.zeros(num_classes))

    def forward(self, z: Tensor) -> Tensor:
        return self.omega * self.base(z) + self.beta * self.base.weight.detach().norm(dim=1)


@_register("ncm")
class NearestClassMean(Calibrated):
    """NCM: ``scale · cos(z, μ_j)`` with class means of the normalised train features."""

    def __init__(self, base: nn.Module, *, in_dim: int, num_classes: int, scale: float = 16.0):
        super().__init__(in_dim=in_dim, num_classes=num_classes)
        self.scale = float(scale)
        self.config["scale"] = self.scale
        self.register_buffer("means", torch.zeros(num_classes, in_dim))

    def forward(self, z: Tensor) -> Tensor:
        return self.scale * F.normalize(z, dim=1) @ self.means.T

    @classmethod
    def fit(cls, base, data, opts, *, scale: float = 16.0):
        if not scale > 0:
            raise LtclipError(f"ncm scale must be > 0, got {scale}")
        model = cls(base, **_dims(data), scale=scale)
        means = class_means(data.z, data.y, data.num_classes)
        model.means.copy_(torch.from_numpy(means))
        return model


# ---------------------------------------------------------------- public entry points


def fit_two_stage(
    name: str,
    *,
    classifier: nn.Module,
    z_train: Any,
    y_train: Any,
    class_counts: Any,
    z_val: Any = None,
    y_val: Any = None,
    epochs: int = 10,
    batch_size: int = 512,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log: Optional[Callable[[dict], None]] = None,
    **params,
) -> Calibrated:
    """Fit two-stage method ``name`` on frozen features; ``params`` are the method's own options
    (:func:`two_stage_defaults`). The result lives on ``device`` in eval mode."""
    cls = TWO_STAGE.get(name)
    defaults = two_stage_defaults(name)
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise LtclipError(
            f"unknown option(s) {', '.join(unknown)} for two-stage method {name!r}; "
            f"valid keys: {', '.join(defaults) or 'none'}"
        )
    for option, value, minimum in (("epochs", epochs, 0), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise LtclipError(f"{option} must be an integer >= {minimum}, got {value!r}")
    if not lr > 0 or not weight_decay >= 0:
        raise LtclipError(f"lr must be > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
    base, data = _prepare(classifier, z_train, y_train, class_counts, z_val, y_val, device)
    opts = _Options(int(epochs), int(batch_size), float(lr), float(weight_decay), int(seed), log)
    return cls.fit(base, data, opts, **params).to(data.z.device).eval()


def build_two_stage(name: str, config: dict, base_classifier: nn.Module) -> Calibrated:
    """Rebuild a fitted method's module from its ``config`` (then ``load_state_dict``)."""
    cls = TWO_STAGE.get(name)
    base = copy.deepcopy(base_classifier).requires_grad_(False).eval()
    try:
        return cls(base, **config).eval()
    except TypeError as err:
        raise LtclipError(f"config {config!r} does not fit two-stage method {name!r}: {err}") from None


def _tau_grid(taus: Sequence[float]) -> list[float]:
    grid = np.asarray(taus, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0 or not np.isfinite(grid).all():
        raise LtclipError(f"taus must be a non-empty list of finite numbers, got {taus!r}")
    return [float(t) for t in grid]


def posthoc_logit_adjustment(
    logits_val: Any, y_val: Any, class_counts: Any, taus: Sequence[float] = TAU_GRID
) -> tuple[float, list[dict]]:
    """Post-hoc logit adjustment (Menon et al. 2021): ``logits - τ log π`` with ``π`` the train prior.

    Returns the τ of highest validation balanced accuracy (first on ties) and the sweep table
    ``[{"tau", "balanced_accuracy"}]``. Apply the same shift to test logits.
    """
    logits = as_numpy(logits_val, np.float64)
    log_prior = _log_prior(_counts(class_counts)).numpy()
    if logits.ndim != 2 or logits.shape[1] != len(log_prior):
        raise LtclipError(f"logits_val {logits.shape} must be [N, C] with C = {len(log_prior)} (len(class_counts))")
    table = [
        {"tau": t, "balanced_accuracy": _balanced_accuracy(logits - t * log_prior, y_val, class_counts)}
        for t in _tau_grid(taus)
    ]
    best = max(table, key=lambda row: row["balanced_accuracy"])
    return best["tau"], table
