"""Classification metrics for long-tailed evaluation: pure functions of arrays.

Inputs may be numpy arrays or torch tensors (converted with ``.detach().cpu().numpy()``);
results are numpy arrays or plain Python numbers (JSON-ready). Accuracies are in percent.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.errors import LtclipError

# Rows of logits processed at a time: bounds the temporaries to a few MiB per thousand classes.
_ROW_BLOCK = 4096

LOWER_IS_BETTER = ("nll", "ece")  # validation metrics where a smaller value is better


def improves(metric: str, score: float, best: float) -> bool:
    """Whether ``score`` of ``metric`` beats ``best`` (strictly: of equal scores the first is kept)."""
    return score < best if metric in LOWER_IS_BETTER else score > best


def as_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """``x`` (array-like or torch tensor) as a numpy array, optionally of ``dtype``."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def shot_groups(train_counts: Any, many_threshold: int = 100, few_threshold: int = 20) -> np.ndarray:
    """Per-class shot group from training counts: "many" (> many_threshold), "few"
    (< few_threshold), else "medium" — OLTR's many > 100, medium 20-100, few < 20."""
    if few_threshold > many_threshold:
        raise LtclipError(
            f"few_threshold ({few_threshold}) exceeds many_threshold ({many_threshold}); "
            "choose few_threshold <= many_threshold"
        )
    counts = as_numpy(train_counts)
    return np.where(counts > many_threshold, "many", np.where(counts < few_threshold, "few", "medium"))


def ece(probs_max: Any, correct: Any, bins: int = 15) -> float:
    """Expected calibration error in percent (Guo et al., 2017).

    Confidences fall into ``bins`` equal-width bins ((i-1)/bins, i/bins]; ECE is the
    sample-weighted mean over bins of |accuracy - mean confidence|.
    """
    conf = as_numpy(probs_max, np.float64).ravel()
    hit = as_numpy(correct, np.float64).ravel()
    if conf.shape != hit.shape:
        raise LtclipError(
            f"ece: {conf.size} confidences but {hit.size} correctness flags; pass one per sample"
        )
    if bins < 1:
        raise LtclipError(f"ece bins must be >= 1, got {bins}")
    if conf.size == 0:
        return 0.0
    hits, confs = calibration_bins(conf, hit, bins)
    return float(np.abs(hits - confs).sum() / conf.size * 100.0)


def calibration_bins(conf: np.ndarray, hit: np.ndarray, bins: int = 15,
                     group: np.ndarray | None = None, groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per confidence bin ((i-1)/bins, i/bins]: the sum of correctness flags and the sum of confidences.

    Sums from disjoint parts of a set add up, so ECE can be assembled across processes. With
    ``group`` (each sample's index in ``[0, groups)``) the sums are ``[groups, bins]``, a row a group.
    """
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    if group is None:
        return np.bincount(which, weights=hit, minlength=bins), np.bincount(which, weights=conf, minlength=bins)
    which = group * bins + which
    return (np.bincount(which, weights=hit, minlength=groups * bins).reshape(groups, bins),
            np.bincount(which, weights=conf, minlength=groups * bins).reshape(groups, bins))


def average_views(logits: Any, mode: str = "mean") -> np.ndarray:
    """Test-time ensembling of [N, V, C] logits over V views: "mean" of logits or the "first" view."""
    x = as_numpy(logits)
    if x.ndim != 3:
        raise LtclipError(f"average_views expects logits of shape [N, views, classes], got {x.shape}")
    if mode == "mean":
        return x.mean(axis=1)
    if mode == "first":
        return x[:, 0]
    raise LtclipError(f"unknown view mode {mode!r}; choose 'mean' or 'first'")


def row_stats(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per sample: argmax prediction, rank of the true class, max softmax prob, NLL of the true class.

    The rank is the true class's position in a stable descending sort (ties broken by class
    index, as argmax does), so rank 0 is exactly "argmax == label".
    """
    n, c = logits.shape
    pred = np.empty(n, np.int64)
    rank = np.empty(n, np.int64)
    conf = np.empty(n, np.float64)
    nll = np.empty(n, np.float64)
    buf = np.empty((min(n, _ROW_BLOCK), c), logits.dtype)
    classes = np.arange(c)
    for start in range(0, n, _ROW_BLOCK):
        rows = slice(start, min(start + _ROW_BLOCK, n))
        block, y = logits[rows], labels[rows]
        b = np.arange(len(y))
        p = block.argmax(axis=1)
        top, true = block[b, p], block[b, y]
        r = np.count_nonzero(block > true[:, None], axis=1)
        tied = np.flatnonzero(np.count_nonzero(block == true[:, None], axis=1) > 1)
        if tied.size:  # equal scores rank by class index, as argmax does
            same = block[tied] == true[tied, None]
            r[tied] += np.count_nonzero(same & (classes < y[tied, None]), axis=1)
        tmp = buf[: len(y)]
        np.subtract(block, top[:, None], out=tmp)
        np.exp(tmp, out=tmp)
        sum_exp = tmp.sum(axis=1, dtype=np.float64)
        pred[rows], rank[rows] = p, r
        conf[rows] = 1.0 / sum_exp
        nll[rows] = np.log(sum_exp) + top - true
    return pred, rank, conf, nll


def _validate(logits: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> None:
    if logits.ndim != 2:
        raise LtclipError(f"logits must have shape [samples, classes], got {logits.shape}")
    n, c = logits.shape
    if labels.shape != (n,):
        raise LtclipError(f"labels must have shape ({n},) to match logits {logits.shape}, got {labels.shape}")
    if counts.shape != (c,):
        raise LtclipError(
            f"train_counts has {counts.size} entries but logits have {c} classes; "
            "use the counts of the same class list"
        )
    if n == 0:
        raise LtclipError("cannot evaluate zero samples; check the evaluation split")
    if not np.issubdtype(labels.dtype, np.integer):
        raise LtclipError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= c:
        raise LtclipError(f"labels must lie in [0, {c}); found {labels.min()}..{labels.max()}")
    if not np.isfinite(logits).all():
        raise LtclipError("logits contain NaN or infinite values; check the model or its checkpoint")


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def evaluate(
    logits: Any,
    labels: Any,
    train_counts: Any,
    *,
    many_threshold: int = 100,
    few_threshold: int = 20,
    ece_bins: int = 15,
    top_confusions: int = 10,
) -> dict:
    """All metrics of one evaluation, from logits [N, C], labels [N] and training class counts [C].

    Returns a JSON-ready dict (accuracies and ECE in percent):

    - ``top1``, ``top5``: top-k accuracy; top5 uses k = min(5, C) (so 100 when C <= 5).
    - ``many``, ``medium``, ``few``: the mean of per-class accuracies over the classes of that
      shot group (see :func:`shot_groups`) present in ``labels`` — the class-averaged definition
      of OLTR-style papers; None when the group has no such class.
    - ``balanced_accuracy``: mean per-class recall over the classes present in ``labels``.
    - ``macro_f1``: mean F1 over classes that occur in labels or predictions (scikit-learn's
      ``average="macro"``); a predicted class absent from labels has F1 0.
    - ``nll``: mean negative log softmax probability of the true class (nats).
    - ``ece``: expected calibration error of the max softmax probability (see :func:`ece`).
    - ``per_class``: accuracy per class, None for classes absent from ``labels``;
      ``per_class_count``: evaluation samples per class.
    - ``confusions``: the ``top_confusions`` most frequent (true, predicted, count) errors,
      by count, then true class, then predicted class.
    - ``num_samples``: N.

    Prediction is argmax with ties going to the lower class index; top-k ranks are consistent with it.
    """
    x = as_numpy(logits)
    if x.dtype != np.float64:
        x = x.astype(np.float32, copy=False)  # half-precision logits would lose the softmax tail
    y = as_numpy(labels)
    counts = as_numpy(train_counts)
    _validate(x, y, counts)
    n, c = x.shape
    y = y.astype(np.int64)

    pred, rank, conf, nll = row_stats(x, y)
    hit = pred == y
    support = np.bincount(y, minlength=c)
    predicted = np.bincount(pred, minlength=c)
    tp = np.bincount(y[hit], minlength=c)
    present = support > 0

    per_class = np.full(c, np.nan)
    per_class[present] = tp[present] / support[present] * 100.0
    groups = shot_groups(counts, many_threshold, few_threshold)

    occurring = present | (predicted > 0)
    f1 = 2.0 * tp[occurring] / (support[occurring] + predicted[occurring]) * 100.0

    wrong = ~hit
    pairs, pair_counts = np.unique(y[wrong] * c + pred[wrong], return_counts=True)
    order = np.lexsort((pairs, -pair_counts))[:top_confusions]
    confusions = [(int(k // c), int(k % c), int(m)) for k, m in zip(pairs[order], pair_counts[order])]

    return {
        "top1": float(hit.mean() * 100.0),
        "top5": float((rank < min(5, c)).mean() * 100.0),
        **{g: _mean_or_none(per_class[present & (groups == g)]) for g in ("many", "medium", "few")},
        "balanced_accuracy": float(per_class[present].mean()),
        "macro_f1": float(f1.mean()),
        "nll": float(nll.mean()),
        "ece": ece(conf, hit, ece_bins),
        "per_class": [None if np.isnan(v) else float(v) for v in per_class],
        "per_class_count": support.tolist(),
        "confusions": confusions,
        "num_samples": int(n),
    }
