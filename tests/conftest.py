"""Shared fixtures: a small synthetic long-tailed image set, a tiny open_clip feature cache, and the
committed excerpts and class-count profiles of the real benchmark files (tests/fixtures/)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub

import torch  # noqa: E402

# The tests' tensors are tiny: a second intra-op thread only adds synchronisation (about 1 ms
# per op when the other core is busy), so one thread is both faster and steadier here.
torch.set_num_threads(1)

TINY_MODEL = "ltclip-tiny-vit"
FIXTURES = Path(__file__).resolve().parent / "fixtures"  # what each file is: fixtures/README.md
# The full real split files, when they sit beside the repository. They only ever add test cases
# to those on the committed fixtures; LTCLIP_SHARED_MANIFESTS=/nonexistent runs the suite as on a
# clean clone (or points it at another copy of the files).
SHARED_MANIFESTS = Path(
    os.environ.get("LTCLIP_SHARED_MANIFESTS") or Path(__file__).resolve().parents[1].parent / "shared" / "data_manifests"
)


def shared_files(*names: str) -> list[Path]:
    """The real files ``names`` in SHARED_MANIFESTS, or ``[]`` unless all are there.

    For parametrize lists, computed at collection time: without the files a test has fewer cases,
    and the fixture case always runs.
    """
    paths = [SHARED_MANIFESTS / name for name in names]
    return paths if all(p.is_file() for p in paths) else []


def places_lt_train_counts() -> np.ndarray:
    """The 365 per-class image counts of the real Places-LT train split, in label order (read-only)."""
    profile = json.loads((FIXTURES / "places_lt_train_counts.json").read_text(encoding="utf-8"))
    counts = np.asarray(profile["counts"], dtype=np.int64)
    counts.flags.writeable = False
    return counts


@pytest.fixture(scope="session")
def places_profile_counts() -> np.ndarray:
    """The real Places-LT train profile (4,980 … 5 images per class), from the committed fixture."""
    return places_lt_train_counts()


def write_places_lt_standin(folder: Path) -> Path:
    """A Places_LT_train.txt in ``folder`` with the real profile: for each label its real count of
    lines, under the label's real folder (from the train excerpt), with made-up file names."""
    folder_of: dict[int, str] = {}
    for line in (FIXTURES / "Places_LT_train_excerpt.txt").read_text(encoding="utf-8").splitlines():
        path, label = line.rsplit(maxsplit=1)
        folder_of.setdefault(int(label), path.split("/")[1])
    counts = places_lt_train_counts()
    assert sorted(folder_of) == list(range(len(counts))), "the excerpt has a line of every class"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "Places_LT_train.txt"
    with open(out, "w", encoding="utf-8") as f:
        for label, n in enumerate(counts.tolist()):
            f.writelines(f"train/{folder_of[label]}/{i:08d}.jpg {label}\n" for i in range(n))
    return out


@pytest.fixture(scope="session", autouse=True)
def _work_in_a_temporary_folder(tmp_path_factory):
    """Commands write workspace files (ltclip.toml, features/, runs/) into the current folder: never the checkout's."""
    before = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(before)


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
