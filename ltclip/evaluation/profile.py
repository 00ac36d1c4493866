"""Dataset summaries: class-count profiles and an image check over every split."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .metrics import shot_groups
from ..data.base import LTDataset


def class_profile(counts: np.ndarray, many_threshold: int = 100, few_threshold: int = 20) -> dict:
    """Max/min images per class, imbalance ratio and many/medium/few class counts of a train split."""
    counts = np.asarray(counts)
    groups = shot_groups(counts, many_threshold, few_threshold)
    present = counts[counts > 0]
    return {
        "classes": int(counts.size),
        "images": int(counts.sum()),
        "max_per_class": int(present.max()),
        "min_per_class": int(present.min()),
        "imbalance_ratio": float(present.max() / present.min()),
        "many": int((groups == "many").sum()),
        "medium": int((groups == "medium").sum()),
        "few": int((groups == "few").sum()),
        "many_threshold": many_threshold,
        "few_threshold": few_threshold,
    }


def check_images(dataset: LTDataset, workers: int = 8, progress=None) -> list[tuple[str, str]]:
    """Open and fully decode every image of every split; returns ``(path, problem)`` per bad file."""

    def one(item):
        split, row = item
        try:
            im = dataset.open_image(split, row)
            im.load()
            return None
        except Exception as err:  # any decode/IO failure
            return f"{split}:{dataset.splits[split].keys[row]}", f"{type(err).__name__}: {err}"

    items = [(s, r) for s, sp in dataset.splits.items() for r in range(len(sp))]
    bad = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for result in pool.map(one, items, chunksize=64):
            if result is not None:
                bad.append(result)
            if progress is not None:
                progress(1)
    return bad
