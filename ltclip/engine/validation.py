"""Validation summaries assembled from additive per-class statistics, so every process can score
its own share of the validation rows and one ``all_reduce`` gives the metrics of the whole set.

The numbers equal :func:`ltclip.metrics.evaluate`'s ``top1``, ``balanced_accuracy``, ``many``,
``medium``, ``few``, ``nll`` and ``ece`` on the concatenated logits.
"""

from __future__ import annotations

import numpy as np
import torch

from ..metrics import as_numpy, calibration_bins, row_stats, shot_groups

SUMMARY_KEYS = ("top1", "balanced_accuracy", "many", "medium", "few", "nll", "ece")


class ValidationStats:
    """Per-class hits and support, the NLL sum and the calibration bins of the rows seen so far."""

    def __init__(self, num_classes: int, bins: int = 15):
        self.hits = np.zeros(num_classes, np.float64)
        self.support = np.zeros(num_classes, np.float64)
        self.nll = np.zeros(1, np.float64)
        self.bin_hits = np.zeros(bins, np.float64)
        self.bin_conf = np.zeros(bins, np.float64)
        self.bins = bins

    def add(self, logits, labels) -> None:
        """Add rows: ``logits`` [n, C] (views already averaged) and their ``labels`` [n]."""
        x = as_numpy(logits)
        x = x if x.dtype == np.float64 else x.astype(np.float32, copy=False)
        y = as_numpy(labels).astype(np.int64)
        if not len(y):
            return
        pred, _, conf, nll = row_stats(x, y)
        hit = pred == y
        c = len(self.hits)
        self.hits += np.bincount(y[hit], minlength=c)
        self.support += np.bincount(y, minlength=c)
        self.nll += nll.sum()
        bin_hits, bin_conf = calibration_bins(conf, hit.astype(np.float64), self.bins)
        self.bin_hits += bin_hits
        self.bin_conf += bin_conf

    def all_reduce(self, ctx) -> None:
        """Sum the statistics of every process (no-op in a single process)."""
        if not ctx.enabled:
            return
        import torch.distributed as dist

        parts = (self.hits, self.support, self.nll, self.bin_hits, self.bin_conf)
        flat = torch.from_numpy(np.concatenate(parts))
        dist.all_reduce(flat)
        out = np.split(flat.numpy(), np.cumsum([len(p) for p in parts])[:-1])
        self.hits, self.support, self.nll, self.bin_hits, self.bin_conf = out

    def summary(self, train_counts, many_threshold: int = 100, few_threshold: int = 20) -> dict:
        """Accuracies and ECE in percent, NLL in nats (see :func:`ltclip.metrics.evaluate`)."""
        n = self.support.sum()
        present = self.support > 0
        per_class = np.full(len(self.hits), np.nan)
        per_class[present] = self.hits[present] / self.support[present] * 100.0
        groups = shot_groups(train_counts, many_threshold, few_threshold)

        def group_mean(g):
            values = per_class[present & (groups == g)]
            return float(values.mean()) if values.size else None

        return {
            "top1": float(self.hits.sum() / n * 100.0),
            "balanced_accuracy": float(per_class[present].mean()),
            **{g: group_mean(g) for g in ("many", "medium", "few")},
            "nll": float(self.nll[0] / n),
            "ece": float(np.abs(self.bin_hits - self.bin_conf).sum() / n * 100.0),
        }
