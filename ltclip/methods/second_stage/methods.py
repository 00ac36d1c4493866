"""The second-stage methods (decoupled classifier learning) on cached penultimate features.

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
  dropped, as in the paper (times a logit-scaled classifier's scale, so τ = 0 keeps its logits). ``τ`` maximises validation balanced accuracy over ``taus``
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
  mean of the L2-normalised train features of class ``j`` (:func:`ltclip.evaluation.retrieval.class_means`).
  The default ``scale`` 16 only sharpens the softmax (cosines in [-1, 1] give a near-uniform
  softmax over many classes); it does not change predictions.

Training (all but ``tau-norm`` and ``ncm``) runs the engine (:func:`ltclip.engine.fit`) with the
second stage's optimization (SGD, momentum 0.9, lr 0.1, weight decay 5e-4, cosine decay stepped
per iteration; :data:`ltclip.config.SECOND_STAGE_OPTIM`) over epochs of ``len(z_train)`` draws
from the method's sampler, with the method's loss; either may be overridden. cRT's random
re-initialisation draws from ``seed`` without touching the global RNG; the other methods start
from fixed values, so runs are deterministic on CPU. With a validation set the epoch of highest
validation balanced accuracy (first on ties) is kept, otherwise the last.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import LtclipError
from ...evaluation.retrieval import class_means
from ...models.heads.embedding import ScaledLinear
from .base import TWO_STAGE, Calibrated, predict
from .posthoc import TAU_GRID, balanced_accuracy, tau_grid


@TWO_STAGE.register("crt")
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
                if isinstance(m, ScaledLinear):  # restarts at scale 1: cRT's step is set for plain linear logits
                    m.init_scale = 1.0
                m.reset_parameters()

    sampler = "class-balanced"
    # A classifier trained afresh in 10 epochs: at SGD lr 0.1 it ends below stage 1 (demo, linear CE:
    # 36.9 % vs 49.1 %; at lr 1, 46.3 %).
    defaults = {"lr": 1.0}

    @classmethod
    def fit(cls, base, data, trainer):
        model = cls(base, **data.dims())
        model.reinitialise(trainer.seed)
        return trainer(model)


@TWO_STAGE.register("lws")
class LearnableWeightScaling(Calibrated):
    """LWS: ``f_j · logits_j``, stage-1 classifier frozen, ``f`` trained with class-balanced sampling."""

    def __init__(self, base: nn.Module, *, in_dim: int, num_classes: int):
        super().__init__(in_dim=in_dim, num_classes=num_classes)
        self.base = base
        self.scales = nn.Parameter(torch.ones(num_classes))

    def forward(self, z: Tensor) -> Tensor:
        return self.base(z) * self.scales

    sampler = "class-balanced"

    @classmethod
    def fit(cls, base, data, trainer):
        return trainer(cls(base, **data.dims()))


@TWO_STAGE.register("tau-norm")
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
        logits = F.linear(z, w / w.norm(dim=1, keepdim=True).clamp_min(1e-12).pow(self.tau))
        return logits * self.base.logit_scale if isinstance(self.base, ScaledLinear) else logits  # τ = 0: the stage-1 logits, bias dropped

    trains = False

    @classmethod
    def fit(cls, base, data, trainer, *, taus: Sequence[float] = TAU_GRID, tau: float = 1.0):
        model = cls(base, **data.dims(), tau=tau)
        if data.z_val is None:
            model.summary = {"tau": model.tau, "tau_table": [], "note": "no validation set: tau is the tau option"}
            return model
        table = []
        for t in tau_grid(taus):
            model.tau = t
            score = balanced_accuracy(predict(model, data.z_val), data.y_val, data.counts)
            table.append({"tau": t, "balanced_accuracy": score})
        best = max(table, key=lambda row: row["balanced_accuracy"])  # first best on ties
        model.tau = model.config["tau"] = best["tau"]
        model.summary = {"tau": best["tau"], "tau_table": table, "val_balanced_accuracy": best["balanced_accuracy"]}
        return model


class _InstanceGRW(Calibrated):
    """Calibrations of a frozen stage-1 classifier trained like DisAlign and MARC: instance
    sampling and the generalised re-weighting loss with weights ``∝ (1/n_j)^exponent``."""

    loss = "grw"

    @classmethod
    def fit(cls, base, data, trainer, *, exponent: float = 1.2):
        return trainer(cls(base, **data.dims()), exponent=exponent)


@TWO_STAGE.register("disalign")
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


@TWO_STAGE.register("marc")
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


@TWO_STAGE.register("ncm")
class NearestClassMean(Calibrated):
    """NCM: ``scale · cos(z, μ_j)`` with class means of the normalised train features."""

    def __init__(self, base: nn.Module, *, in_dim: int, num_classes: int, scale: float = 16.0):
        super().__init__(in_dim=in_dim, num_classes=num_classes)
        self.scale = float(scale)
        self.config["scale"] = self.scale
        self.register_buffer("means", torch.zeros(num_classes, in_dim))

    def forward(self, z: Tensor) -> Tensor:
        return self.scale * F.normalize(z, dim=1) @ self.means.T

    trains = False

    @classmethod
    def fit(cls, base, data, trainer, *, scale: float = 16.0):
        if not scale > 0:
            raise LtclipError(f"ncm scale must be > 0, got {scale}")
        model = cls(base, **data.dims(), scale=scale)
        means = class_means(data.z, data.y, data.num_classes)
        model.means.copy_(torch.from_numpy(means))
        return model
