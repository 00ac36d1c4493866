"""Shared fixtures: a small synthetic long-tailed image set and a tiny open_clip feature cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub

import torch  # noqa: E402

# The tests' tensors are tiny: a second intra-op thread only adds synchronisation (about 1 ms
# per op when the other core is busy), so one thread is both faster and steadier here.
torch.set_num_threads(1)

SHARED_MANIFESTS = Path(__file__).resolve().parents[1].parent / "shared" / "data_manifests"
TINY_MODEL = "ltclip-tiny-vit"


@pytest.fixture(scope="session")
def shared_manifests() -> Path:
    if not SHARED_MANIFESTS.is_dir():
        pytest.skip(f"real split files not found at {SHARED_MANIFESTS}")
    return SHARED_MANIFESTS


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """10 classes, imbalance 20, 40 images in the largest class, 32 px."""
    from ltclip.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, classes=10, imbalance=20, max_per_class=40, val_per_class=4, test_per_class=6, size=32, seed=0)
    return root


def write_cache(folder: Path, split: str, embeds, labels, num_classes: int, tokens=None, dataset: str = "gaussian") -> Path:
    """A feature cache file written by the real writer (as `ltclip extract` would)."""
    import numpy as np

    from ltclip.store import FeatureWriter

    folder.mkdir(parents=True, exist_ok=True)
    embeds = np.asarray(embeds)
    n = len(labels)
    views = 1 if embeds.ndim == 2 else embeds.shape[1]
    with FeatureWriter.open(
        folder / f"{split}.h5", num_rows=n, embed_dim=embeds.shape[-1], block_size=max(1, n),
        attrs={"dataset": dataset, "split": split, "model": "gaussian"}, labels=labels,
        classnames=[f"class {i}" for i in range(num_classes)], views=views,
        token_shape=None if tokens is None else tuple(np.asarray(tokens).shape[-2:]),
    ) as writer:
        writer.write_block(0, embeds, tokens)
        writer.finalise()
    return folder / f"{split}.h5"


def gaussian_lt(seed: int, counts, dim: int, separation: float, per_class_eval: int):
    """Isotropic unit-variance Gaussians around random means: long-tailed train, balanced val/test.

    Returns (means, {split: (x, y)}). With a balanced test set and shared covariance the
    Bayes-optimal rule is the nearest true mean.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    c = len(counts)
    means = rng.standard_normal((c, dim))
    means *= separation / np.linalg.norm(means, axis=1, keepdims=True)
    splits = {}
    for split, sizes in (("train", counts), ("val", [per_class_eval] * c), ("test", [per_class_eval] * c)):
        y = np.repeat(np.arange(c), sizes)
        splits[split] = ((means[y] + rng.standard_normal((len(y), dim))).astype(np.float32), y)
    return means, splits
