"""Long-tailed classification losses: one registry, name -> pure loss function.

Every loss has the signature::

    fn(logits[N, C], targets[N], class_counts[C], *, epoch=0, total_epochs=1, **params) -> scalar

and is differentiable, with no I/O and no state. ``epoch``/``total_epochs`` are passed to every
loss so schedules (e.g. LDAM's DRW) need no special casing by the trainer; losses without a
schedule ignore them. The keyword parameters after them (with their defaults) are the loss's
options: ``LOSSES.options(name)`` reads them from the signature and ``LOSSES.parse(name, opts)``
parses ``--loss-opt key=value`` strings against them (see :class:`ltclip.core.registry.Registry`).

A loss that is a softmax cross-entropy of the logits plus a fixed per-class offset says so where
it is registered: ``@LOSSES.register(name, softmax_offset=fn)``, with ``fn(counts, *, <the loss's
options, same names and defaults>)`` giving the float64 offsets ``[C]`` from the clamped float64
counts, or None for option values that leave that form (``ce``'s label smoothing); the form must
hold at every epoch. :func:`softmax_offset` reads them: a batched sweep computes all such heads'
losses in one cross-entropy call, whatever their names.

Class weights and priors are computed from ``class_counts`` in float64 and then cast to the
logits' device and dtype. A count of zero is clamped to one, so a class absent from the training
set gets the weight/prior of a single-sample class instead of an inf or nan.

Reductions follow each method's reference code: re-weighted cross-entropies (``cbw``, ``grw``,
LDAM's DRW) use torch's weighted mean ``sum_i w[y_i] l_i / sum_i w[y_i]`` (as ``F.cross_entropy``
with ``weight=``); ``cb`` divides ``sum_i w[y_i] l_i`` by the batch size, as Cui et al.'s code
does; all other losses are plain batch means (LADE adds its class-summed regulariser).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.errors import LtclipError
from ..core.registry import Registry

Counts = Union[Tensor, Sequence[float]]
LossFn = Callable[..., Tensor]
LOSSES: Registry[LossFn] = Registry("loss", flag="--loss-opt", exclude=("epoch", "total_epochs"))

get_loss = LOSSES.get
list_losses = LOSSES.names


def compute_loss(
    name: str,
    logits: Tensor,
    targets: Tensor,
    class_counts: Counts,
    *,
    epoch: int = 0,
    total_epochs: int = 1,
    **params,
) -> Tensor:
    """Check shapes and options, then evaluate loss ``name`` (a scalar tensor)."""
    fn = LOSSES.get(name)
    LOSSES.check(name, params)
    if logits.ndim != 2:
        raise LtclipError(f"loss {name!r} needs logits of shape [N, C], got {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise LtclipError(f"loss {name!r}: targets have shape {tuple(targets.shape)}, expected ({logits.shape[0]},)")
    n_counts = torch.as_tensor(class_counts).numel()
    if n_counts != logits.shape[1]:
        raise LtclipError(
            f"loss {name!r}: class_counts has {n_counts} entries but logits have {logits.shape[1]} classes"
        )
    return fn(logits, targets, class_counts, epoch=epoch, total_epochs=total_epochs, **params)


def softmax_offset(name: str, class_counts: Counts, **params) -> Tensor | None:
    """Offsets ``o`` (float64 ``[C]``) with loss ``name`` equal to ``F.cross_entropy(logits + o, targets)``
    under options ``params``, or None where the loss, with these options, is not of that form."""
    LOSSES.check(name, params)
    offset = LOSSES.meta(name, "softmax_offset")
    return None if offset is None else offset(_counts(class_counts), **params)


def parse_loss(name: str, opts) -> dict:
    """``LOSSES.parse(name, opts)``, then one call of the loss on a zero row, so that an option value
    the loss itself refuses (``gamma < 0``, ``drw_at > 1``, …) is reported before anything trains."""
    params = LOSSES.parse(name, opts)
    compute_loss(name, torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, dtype=torch.long),
                 torch.ones(2, dtype=torch.float64), **params)
    return params


# ---------------------------------------------------------------- shared helpers (float64, CPU)


def _counts(class_counts: Counts) -> Tensor:
    """Per-class counts as float64 on the CPU, zeros clamped to one."""
    return torch.as_tensor(class_counts, dtype=torch.float64).detach().cpu().clamp(min=1.0)


def _normalised_weights(raw: Tensor) -> Tensor:
    """Scale per-class weights so they sum to the number of classes."""
    return raw / raw.sum() * raw.numel()


def _inverse_power_weights(counts: Tensor, exponent: float) -> Tensor:
    """``w_j ∝ (1 / n_j) ** exponent``, summing to C."""
    return _normalised_weights(counts.pow(-exponent))


def _effective_number_weights(counts: Tensor, beta: float, option: str) -> Tensor:
    """Cui et al.'s ``w_j ∝ (1 - β) / (1 - β ** n_j)``, summing to C."""
    if not 0.0 <= beta < 1.0:
        raise LtclipError(f"loss option {option} must be in [0, 1), got {beta} (e.g. --loss-opt {option}=0.9999)")
    return _normalised_weights((1.0 - beta) / (1.0 - torch.pow(beta, counts)))


def _focal_modulator(log_probs: Tensor, targets: Tensor, gamma: float) -> Tensor:
    """``(1 - p_y)^γ`` per row, as ``exp(γ · log(1 - p_y))`` with ``log(1 - p_y)`` the ``logsumexp``
    of the other classes' log-probabilities.

    Accurate, with a finite gradient, even where ``p_y`` rounds to 1 (``pow`` on
    ``-expm1(log p_y)`` differentiates to ``0 · inf`` there for ``γ < 1``). A row with no other
    finite class (one class, or all others at ``-inf``) has ``1 - p_y = 0`` exactly: it gets
    ``0^γ`` (1 when ``γ = 0``) by a safe where: its logsumexp runs on zeros, so no NaN reaches the
    backward pass.
    """
    others = log_probs.masked_fill(F.one_hot(targets, log_probs.shape[1]).bool(), -math.inf)
    empty = torch.isneginf(others).all(dim=1)
    log_one_minus_p = torch.logsumexp(torch.where(empty[:, None], torch.zeros_like(others), others), dim=1)
    at_zero = torch.full_like(log_one_minus_p, 1.0 if gamma == 0 else 0.0)
    return torch.where(empty, at_zero, torch.exp(gamma * log_one_minus_p))


def _log_prior(counts: Tensor) -> Tensor:
    """``log π_j`` with ``π_j = n_j / Σ n``."""
    return torch.log(counts / counts.sum())


def _scaled_log_prior(counts: Tensor, *, tau: float = 1.0) -> Tensor:
    """``τ log π_j``, the offset of ``logit_adjusted``."""
    return tau * _log_prior(counts)


def _zero_unless_smoothed(counts: Tensor, *, label_smoothing: float = 0.0) -> Tensor | None:
    """``ce``'s offset: zero; None with label smoothing, which mixes in every class's log-probability."""
    return None if label_smoothing else torch.zeros_like(counts)


# ---------------------------------------------------------------- losses


@LOSSES.register("ce", softmax_offset=_zero_unless_smoothed)
def cross_entropy(
    logits: Tensor, targets: Tensor, class_counts: Counts, *, epoch: int = 0, total_epochs: int = 1,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Softmax cross-entropy, optionally with torch's label smoothing."""
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


@LOSSES.register("focal")
def focal(
    logits: Tensor, targets: Tensor, class_counts: Counts, *, epoch: int = 0, total_epochs: int = 1,
    gamma: float = 2.0,
) -> Tensor:
    """Focal loss (Lin et al. 2017) on the softmax, without alpha: ``-(1 - p_y)^γ log p_y``.

    ``gamma=0`` is cross-entropy.
    """
    if not gamma >= 0:
        raise LtclipError(f"loss option gamma must be >= 0, got {gamma} (e.g. --loss-opt gamma=2)")
    log_probs = F.log_softmax(logits, dim=1)
    log_p = log_probs.gather(1, targets[:, None]).squeeze(1)
    return (-_focal_modulator(log_probs, targets, gamma) * log_p).mean()


@LOSSES.register("grw")
def generalised_reweighting(
    logits: Tensor, targets: Tensor, class_counts: Counts, *, epoch: int = 0, total_epochs: int = 1,
    exponent: float = 1.2, label_smoothing: float = 0.0,
) -> Tensor:
    """Generalised re-weighting (Zhang et al. 2021, DisAlign): CE with ``w_j ∝ (1/n_j)^exponent``.

    Weights sum to C; the batch reduction is torch's weighted mean. The default exponent is the
    one DisAlign's and Imbalance-VLM's code use (1.2); exponent 1 is ``cbw``.
    """
    weight = _inverse_power_weights(_counts(class_counts), exponent).to(logits)
    return F.cross_entropy(logits, targets, weight=weight, label_smoothing=label_smoothing)


@LOSSES.register("cbw")
def class_balanced_weighting(
    logits: Tensor, targets: Tensor, class_counts: Counts, *, epoch: int = 0, total_epochs: int = 1,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Inverse-frequency weighted CE (``w_j ∝ 1/n_j``, summing to C): ``grw`` with exponent 1."""
    return generalised_reweighting(logits, targets, class_counts, exponent=1.0, label_smoothing=label_smoothing)


@LOSSES.register("cb")
def class_balanced(
    logits: Tensor, targets: Tensor, class_counts: Counts, *, epoch: int = 0, total_epochs: int = 1,
    beta: float = 0.9999, base: str = "softmax", gamma: float = 2.0,
) -> Tensor:
    """Class-balanced loss by effective number (Cui et al. 2019), as in the authors' code.

    Each sample is weighted by ``w_{y_i}`` with ``w_j ∝ (1 - β) / (1 - β^{n_j})``, summing to C,
    and the weighted sum is divided by the batch size. ``base="softmax"``: weighted softmax CE.
    ``base="focal"``: Cui's sigmoid focal loss, one-vs-all over all C classes,
    ``Σ_c w_{y_i} (1 - p_t)^γ BCE(z_ic, [c = y_i])`` with ``p_t = σ(±z_ic)``; the reference code
    pairs it with a classifier bias initialised to ``-log(99)`` (the head's business, not the loss's).
    """
    if base not in ("softmax", "focal"):
        raise LtclipError(f"loss option base must be 'softmax' or 'focal', got {base!r} (e.g. --loss-opt base=focal)")
    weight = _effective_number_weights(_counts(class_counts), beta, "beta").to(logits)[targets]
    if base == "softmax":
        return (weight * F.cross_entropy(logits, targets, reduction="none")).mean()
    onehot = F.one_hot(targets, logits.shape[1]).to(logits)
    bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    modulator = torch.exp(gamma * F.logsigmoid(-logits * (2.0 * onehot - 1.0)))  # (1 - p_t)^γ, stable
    return (weight[:, None] * modulator * bce).sum() / logits.shape[0]


@LOSSES.register("logit_adjusted", softmax_offset=_scaled_log_prior)
def logit_adjusted(
    logits: Tensor, targets: Tensor, class_counts: Counts, *, epoch: int = 0, total_epochs: int = 1,
    tau: float = 1.0,
) -> Tensor:
    """Logit-adjusted loss (Menon et al. 2021): CE on ``logits + τ log π_j``."""
    return F.cross_entropy(logits + _scaled_log_prior(_counts(class_counts), tau=tau).to(logits), targets)


@LOSSES.register("balanced_softmax", softmax_offset=_log_prior)
def balanced_softmax(
    logits: Tensor, targets: Tensor, class_counts: Counts, *, epoch: int = 0, total_epochs: int = 1,
) -> Tensor:
    """Balanced Softmax (Ren et al. 2020): CE on ``logits + log n_j``.

    Softmax ignores a constant shift, so this is ``logit_adjusted`` with ``tau=1``.
    """
    return logit_adjusted(logits, targets, class_counts, tau=1.0)


@LOSSES.register("ldam")
def ldam(
    logits: Tensor, targets: Tensor, class_counts: Counts, *, epoch: int = 0, total_epochs: int = 1,
    max_m: float = 0.5, s: float = 30.0, drw_epoch: int = -1, drw_at: float = -1.0, drw_beta: float = 0.9999,
) -> Tensor:
    """LDAM (Cao et al. 2019) with optional deferred re-weighting (DRW).

    Margins ``m_j ∝ n_j^{-1/4}`` are scaled so the largest is ``max_m``; as in the reference code
    the loss is ``CE(s · (logits - m_y 1[c = y]))``, so ``logits`` are meant to be cosine
    similarities (a normalised head). From epoch ``drw_epoch`` on (or from the fraction ``drw_at``
    of ``total_epochs``, rounded: Cao et al.'s epoch 160 of 200 is ``drw_at=0.8``) the CE is
    weighted by Cui's effective-number weights with ``drw_beta`` (summing to C, torch's weighted
    mean); both -1 (the default) never re-weights.
    """
    if drw_epoch >= 0 and drw_at >= 0:
        raise LtclipError("loss options drw_epoch and drw_at both set; give one (e.g. --loss-opt drw_at=0.8)")
    if drw_at > 1:
        raise LtclipError(f"loss option drw_at is a fraction of training in [0, 1], got {drw_at} (e.g. --loss-opt drw_at=0.8)")
    counts = _counts(class_counts)
    margins = counts.pow(-0.25)
    margins = (margins * (max_m / margins.max())).to(logits)
    onehot = F.one_hot(targets, logits.shape[1]).to(logits)
    weight = None
    start = round(drw_at * total_epochs) if drw_at >= 0 else drw_epoch
    if 0 <= start <= epoch:
        weight = _effective_number_weights(counts, drw_beta, "drw_beta").to(logits)
    return F.cross_entropy(s * (logits - onehot * margins[targets, None]), targets, weight=weight)


@LOSSES.register("lade")
def lade(
    logits: Tensor, targets: Tensor, class_counts: Counts, *, epoch: int = 0, total_epochs: int = 1,
    alpha: float = 0.1, remine_lambda: float = 0.1,
) -> Tensor:
    """LADE (Hong et al. CVPR 2021): PC-softmax CE plus ``alpha`` × the LADER regulariser.

    Follows the authors' code (hyperconnect/LADE, ``PriorCELoss`` + ``LADELoss``) with a uniform
    target prior at train time. With prior ``π`` from the counts, for every class c:
    ``first_c`` = mean of ``z_ic`` over the batch samples of class c (0 if none),
    ``second_c = logsumexp_i(z_ic - log π_c - log C) - log N`` over the whole batch,
    ``LADER = -Σ_c π_c (first_c - second_c - remine_lambda · second_c²)``;
    the loss is ``CE(logits + log π) + alpha · LADER``, both on the same logits.
    """
    n, c = logits.shape
    log_prior = _log_prior(_counts(class_counts)).to(logits)
    pc_softmax = F.cross_entropy(logits + log_prior, targets)
    onehot = F.one_hot(targets, c).to(logits)
    first = (logits * onehot).sum(0) / onehot.sum(0).clamp(min=1.0)
    second = torch.logsumexp(logits - log_prior - math.log(c), dim=0) - math.log(n)
    lader = -(log_prior.exp() * (first - second - remine_lambda * second.pow(2))).sum()
    return pc_softmax + alpha * lader
