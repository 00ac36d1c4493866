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
    from ltclip.store import write_arrays

    folder.mkdir(parents=True, exist_ok=True)
    return write_arrays(folder / f"{split}.h5", embeds, labels, [f"class {i}" for i in range(num_classes)],
                        {"dataset": dataset, "split": split, "model": "gaussian"}, tokens)
