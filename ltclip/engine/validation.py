"""Validation summaries assembled from additive per-class statistics, so every process can score
its own share of the validation rows and one ``all_reduce`` gives the metrics of the whole set.

The numbers equal :func:`ltclip.evaluation.metrics.evaluate`'s ``top1``, ``balanced_accuracy``, ``many``,
``medium``, ``few``, ``nll`` and ``ece`` on the concatenated logits.
"""

from __future__ import annotations

import numpy as np
import torch

from ..evaluation.metrics import as_numpy, calibration_bins, row_stats, shot_groups


class ValidationStats:
    """Per-class hits and support, the NLL sum and the calibration bins of the rows seen so far.

    ``heads=K`` keeps them for K models scored on the same rows at once (a sweep's stacked heads):
    ``add`` then takes ``[n, K, C]`` logits and :meth:`summaries` gives one summary a head.
    """

    def __init__(self, num_classes: int, bins: int = 15, heads: int | None = None):
        k = 1 if heads is None else heads
        self.heads = heads
        self.hits = np.zeros((k, num_classes), np.float64)
        self.support = np.zeros(num_classes, np.float64)
        self.nll = np.zeros(k, np.float64)
        self.bin_hits = np.zeros((k, bins), np.float64)
        self.bin_conf = np.zeros((k, bins), np.float64)
        self.bins = bins

    def add(self, logits, labels) -> None:
        """Add rows: ``logits`` [n, C] (views already averaged; [n, K, C] with ``heads=K``) and their ``labels`` [n]."""
        x = as_numpy(logits)
        x = x if x.dtype == np.float64 else x.astype(np.float32, copy=False)
        y = as_numpy(labels).astype(np.int64)
        if not len(y):
            return
        k, c = self.hits.shape
        n = len(y)
        if self.heads is not None:  # head-major rows: head j's are j·n … (j+1)·n − 1
            x = x.transpose(1, 0, 2).reshape(k * n, c)
        head = np.repeat(np.arange(k), n)
        yk = np.tile(y, k)
        pred, _, conf, nll = row_stats(x, yk)
        hit = pred == yk
        self.hits += np.bincount(head[hit] * c + yk[hit], minlength=k * c).reshape(k, c)
        self.support += np.bincount(y, minlength=c)
        self.nll += nll.reshape(k, n).sum(axis=1)
        bin_hits, bin_conf = calibration_bins(conf, hit.astype(np.float64), self.bins, head, k)
        self.bin_hits += bin_hits
        self.bin_conf += bin_conf

    def all_reduce(self, ctx) -> None:
        """Sum the statistics of every process (no-op in a single process)."""
        if not ctx.enabled:
            return
        import torch.distributed as dist

        parts = (self.hits, self.support, self.nll, self.bin_hits, self.bin_conf)
        flat = torch.from_numpy(np.concatenate([p.ravel() for p in parts]))
        dist.all_reduce(flat)
        out = np.split(flat.numpy(), np.cumsum([p.size for p in parts])[:-1])
        self.hits, self.support, self.nll, self.bin_hits, self.bin_conf = (o.reshape(p.shape) for o, p in zip(out, parts))

    def summary(self, train_counts, many_threshold: int = 100, few_threshold: int = 20) -> dict:
        """Accuracies and ECE in percent, NLL in nats (see :func:`ltclip.evaluation.metrics.evaluate`)."""
        if self.heads is not None:
            raise ValueError("ValidationStats(heads=K): use summaries()")
        return self.summaries(train_counts, many_threshold, few_threshold)[0]

    def summaries(self, train_counts, many_threshold: int = 100, few_threshold: int = 20) -> list[dict]:
        """One :meth:`summary` a head."""
        present = self.support > 0
        n = self.support.sum()
        groups = shot_groups(train_counts, many_threshold, few_threshold)
        per_class = self.hits[:, present] / self.support[present] * 100.0  # [K, classes with rows]
        top1 = self.hits.sum(axis=1) / n * 100.0
        nll = self.nll / n
        members = {g: groups[present] == g for g in ("many", "medium", "few")}
        # Means and sums row by row, as 1-D arrays: a 2-D reduction can round the last bit differently.
        return [{"top1": float(top1[k]), "balanced_accuracy": float(row.mean()),
                 **{g: float(row[m].mean()) if m.any() else None for g, m in members.items()},
                 "nll": float(nll[k]), "ece": float(np.abs(self.bin_hits[k] - self.bin_conf[k]).sum() / n * 100.0)}
                for k, row in enumerate(per_class)]
