"""Long-tailed Gaussian features with a known optimum: for learning tests and method benchmarks.

Isotropic unit-variance Gaussians around class means on a sphere. On a balanced test set with a
shared covariance the Bayes-optimal rule is the nearest true mean, so how far a method stays from
the optimum is measurable.
"""

from __future__ import annotations

import numpy as np


def gaussian_lt(seed: int, counts, dim: int, separation: float, eval_per_class: dict[str, int]) -> tuple[np.ndarray, dict]:
    """Class means (``[C, dim]``, norm ``separation``) and ``{split: (x float32, y int64)}``: ``train``
    with ``counts[j]`` samples of class ``j``, and every split of ``eval_per_class`` balanced."""
    rng = np.random.default_rng(seed)
    c = len(counts)
    means = rng.standard_normal((c, dim))
    means *= separation / np.linalg.norm(means, axis=1, keepdims=True)
    splits = {}
    for split, sizes in (("train", list(counts)), *((s, [n] * c) for s, n in eval_per_class.items())):
        y = np.repeat(np.arange(c), sizes)
        splits[split] = ((means[y] + rng.standard_normal((len(y), dim))).astype(np.float32), y)
    return means, splits


def nearest_mean_logits(x: np.ndarray, means: np.ndarray, block: int = 65536) -> np.ndarray:
    """``−‖x − μ_j‖²`` up to a per-row constant (``2 x·μ_j − ‖μ_j‖²``): the Bayes rule's scores."""
    m = means.astype(np.float64)
    sq = (m * m).sum(1)
    return np.concatenate([2 * x[i : i + block].astype(np.float64) @ m.T - sq for i in range(0, len(x), block)])
