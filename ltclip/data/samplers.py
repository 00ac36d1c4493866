"""Long-tailed training samplers: instance, class-balanced, square-root, progressively balanced.

Class ``j`` with ``n_j`` images is drawn with probability ``p_j`` (Kang et al. 2020, "Decoupling
representation and classifier for long-tailed recognition"): instance ``n_j / N``, class-balanced
``1 / C'``, square-root ``n_j^(1/2) / sum_i n_i^(1/2)``, progressive a mix of the first two that
moves towards class-balanced over training (see ``ProgressiveSampler``).

- **Determinism.** An epoch's order is a pure function of ``(seed, epoch)``, drawn with
  ``np.random.default_rng((seed, epoch))``; no global RNG is read or advanced.
- **Distributed.** Every rank draws the same global sequence of ``num_samples`` indices (default:
  the number of labels) and rank ``r`` takes positions ``r::world_size`` of its first
  ``world_size * (num_samples // world_size)`` entries: the global length is rounded down to a
  multiple of ``world_size``, so ranks get equal shares and nothing is padded.
- **Empty classes** are never drawn: their probability is 0 and the classes with samples share
  the whole mass (class-balanced is uniform over the ``C'`` non-empty classes).
- **Class-level samplers** (all but ``instance``) draw each position's class independently from
  ``p``, then an image of that class. Within an epoch a class's draws walk through a shuffled list
  of its images, reshuffled only when exhausted, so a class drawn ``k`` times with ``n`` images
  yields each image ``floor(k / n)`` or ``ceil(k / n)`` times.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
from torch.utils.data import Sampler

from ..core.errors import LtclipError
from ..core.registry import Registry


def _nonneg_int(option: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise LtclipError(f"{option} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_counts(class_counts) -> np.ndarray:
    counts = np.asarray(class_counts)
    if (
        counts.ndim != 1
        or not np.issubdtype(counts.dtype, np.integer)
        or (counts < 0).any()
        or counts.sum() == 0
    ):
        raise LtclipError(
            "class_counts must be a 1-D array of non-negative integer counts with at least one "
            "positive entry (pass the per-class image counts of the training split)"
        )
    return counts.astype(np.int64)


class LTSampler(Sampler[int]):
    """This rank's share of the epoch's global index sequence; call ``set_epoch`` every epoch."""

    def __init__(
        self,
        labels,
        num_classes: int,
        *,
        num_samples: int | None = None,
        seed: int = 0,
        total_epochs: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        self.num_classes = _nonneg_int("num_classes", num_classes, minimum=1)
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
            raise LtclipError("labels must be a non-empty 1-D array of integer class indices")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise LtclipError(
                f"labels span {labels.min()}..{labels.max()} but num_classes is "
                f"{self.num_classes}: pass the dataset's number of classes"
            )
        self.labels = labels.astype(np.int64)
        self.class_counts = np.bincount(self.labels, minlength=self.num_classes)
        self.world_size = _nonneg_int("world_size", world_size, minimum=1)
        self.rank = _nonneg_int("rank", rank)
        if self.rank >= self.world_size:
            raise LtclipError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        n = len(self.labels) if num_samples is None else num_samples
        self.num_samples = _nonneg_int("num_samples", n, minimum=self.world_size)
        self.seed = _nonneg_int("seed", seed)
        self.total_epochs = _nonneg_int("total_epochs", total_epochs, minimum=1)
        self.epoch = 0

    @staticmethod
    def class_probabilities(class_counts: np.ndarray, epoch: int, total_epochs: int) -> np.ndarray:
        """Probability of drawing each class at ``epoch`` (float64, sums to 1)."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _nonneg_int("epoch", epoch)

    def __len__(self) -> int:
        return self.num_samples // self.world_size

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        order = self._draw(rng, self.num_samples)[: len(self) * self.world_size]
        return iter(order[self.rank :: self.world_size].tolist())

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """The global sequence of ``n`` dataset indices for the current epoch."""
        raise NotImplementedError


# The constructor's shared keywords are not options: samplers have none today, so ``create_sampler``
# refuses any extra keyword; a sampler's own keyword-only constructor parameters would be its options.
SAMPLERS: Registry[type[LTSampler]] = Registry(
    "sampler", exclude=("num_samples", "seed", "total_epochs", "rank", "world_size")
)


@SAMPLERS.register("instance")
class InstanceSampler(LTSampler):
    """A fresh permutation of all indices (concatenated permutations when ``num_samples > N``)."""

    @staticmethod
    def class_probabilities(class_counts, epoch, total_epochs):
        return class_counts / class_counts.sum()

    def _draw(self, rng, n):
        size = len(self.labels)
        return np.concatenate([rng.permutation(size) for _ in range(-(-n // size))])[:n]


class ClassLevelSampler(LTSampler):
    """Draws a class from ``class_probabilities``, then the next of its shuffled images."""

    @cached_property
    def _members(self) -> list[np.ndarray]:
        by_class = np.argsort(self.labels, kind="stable")
        return np.split(by_class, np.cumsum(self.class_counts)[:-1])

    def _draw(self, rng, n):
        p = self.class_probabilities(self.class_counts, self.epoch, self.total_epochs)
        classes = rng.choice(self.num_classes, size=n, p=p)
        picks = [
            rng.permuted(np.tile(self._members[j], (-(-k // len(self._members[j])), 1)), axis=1)
            .ravel()[:k]
            for j, k in enumerate(np.bincount(classes, minlength=self.num_classes))
            if k
        ]
        order = np.empty(n, dtype=np.int64)
        order[np.argsort(classes, kind="stable")] = np.concatenate(picks)
        return order


@SAMPLERS.register("class-balanced")
class ClassBalancedSampler(ClassLevelSampler):
    """Uniform over the classes that have images (Kang et al.'s q = 0)."""

    @staticmethod
    def class_probabilities(class_counts, epoch, total_epochs):
        present = (class_counts > 0).astype(np.float64)
        return present / present.sum()


@SAMPLERS.register("sqrt")
class SqrtSampler(ClassLevelSampler):
    """Square-root sampling, ``p_j ∝ n_j^(1/2)`` (Kang et al.'s q = 1/2)."""

    @staticmethod
    def class_probabilities(class_counts, epoch, total_epochs):
        root = np.sqrt(class_counts)
        return root / root.sum()


@SAMPLERS.register("progressive")
class ProgressiveSampler(ClassLevelSampler):
    """Progressively balanced: ``p(t) = (1 - t/T) p_instance + (t/T) p_class_balanced``.

    ``t`` is the epoch counted from 0 and ``T`` is ``total_epochs``, as in Kang et al.: the first
    epoch is instance-balanced and the last (``t = T - 1``) is ``(T - 1) / T`` of the way to
    class-balanced. Epochs ``>= T`` (training past the schedule) are fully class-balanced.
    """

    @staticmethod
    def class_probabilities(class_counts, epoch, total_epochs):
        mix = min(epoch / total_epochs, 1.0)
        return (1 - mix) * InstanceSampler.class_probabilities(
            class_counts, epoch, total_epochs
        ) + mix * ClassBalancedSampler.class_probabilities(class_counts, epoch, total_epochs)


def block_shuffled(indices, block_rows: int, pool_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """``indices`` (any order, repeats kept) regrouped so that a slow disk reads them in long runs.

    Rows are cut into contiguous blocks of ``block_rows``; the blocks that ``indices`` touch are
    visited in a random order, and each run of ``pool_blocks`` visited blocks forms a shuffle pool:
    the result is a sequence of pools, each holding exactly the entries of ``indices`` that fall in
    its blocks, in random order. For ``indices = range(n)`` every pool is ``pool_blocks`` whole blocks.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if block_rows < 1 or pool_blocks < 1:
        raise ValueError("block_rows and pool_blocks must be >= 1")
    if indices.size == 0:
        return indices
    blocks, block_of = np.unique(indices // block_rows, return_inverse=True)
    visit = np.empty(len(blocks), dtype=np.int64)
    visit[rng.permutation(len(blocks))] = np.arange(len(blocks))  # block -> its place in the visit order
    shuffle = rng.permutation(len(indices))
    pool = visit[block_of[shuffle]] // pool_blocks
    return indices[shuffle[np.argsort(pool, kind="stable")]]


class BlockShuffledSampler(Sampler[int]):
    """A sampler's draws on this rank, each epoch regrouped by :func:`block_shuffled`.

    The same rows as ``inner`` draws (its class balance, its rank's share), in an order for caches
    streamed from slow disks; the regrouping's randomness comes from ``(seed, epoch, 2, rank)``.
    """

    def __init__(self, inner: LTSampler, block_rows: int, pool_blocks: int):
        super().__init__()
        self.inner = inner
        self.block_rows = _nonneg_int("block_rows", block_rows, minimum=1)
        self.pool_blocks = _nonneg_int("pool_blocks", pool_blocks, minimum=1)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        inner = self.inner
        drawn = np.fromiter(iter(inner), dtype=np.int64, count=len(inner))
        rng = np.random.default_rng((inner.seed, inner.epoch, 2, inner.rank))
        return iter(block_shuffled(drawn, self.block_rows, self.pool_blocks, rng).tolist())


list_samplers = SAMPLERS.names


def class_probabilities(
    name: str, class_counts, epoch: int = 0, total_epochs: int = 1
) -> np.ndarray:
    """Sampler ``name``'s probability of drawing each class at ``epoch`` of ``total_epochs``."""
    return SAMPLERS.get(name).class_probabilities(
        _check_counts(class_counts),
        _nonneg_int("epoch", epoch),
        _nonneg_int("total_epochs", total_epochs, minimum=1),
    )


def create_sampler(
    name: str,
    labels,
    num_classes: int,
    *,
    num_samples: int | None = None,
    seed: int = 0,
    total_epochs: int = 1,
    rank: int = 0,
    world_size: int = 1,
    **params,
) -> LTSampler:
    """Build sampler ``name`` over ``labels``; ``params`` are that sampler's own options
    (``SAMPLERS.options(name)``, empty for every sampler today)."""
    return SAMPLERS.create(
        name,
        labels,
        num_classes,
        num_samples=num_samples,
        seed=seed,
        total_epochs=total_epochs,
        rank=rank,
        world_size=world_size,
        **params,
    )
