"""Shared fixtures: a small synthetic long-tailed image set, a tiny open_clip feature cache, the
committed excerpts and class-count profiles of the real benchmark files (tests/fixtures/), and the
SIGKILL-at-random-moments driver of the crash tests."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

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


# A toy CLIP for the tests (`ltclip pretrain-toy` in a few seconds): the first 10 synthetic concepts, as in
# synthetic_root, on the tiny test config. Its zero-shot accuracy on synthetic_root is far above chance.
TOY_CLIP = dict(model=TINY_MODEL, classes=10, images_per_class=16, steps=80, batch_size=32, lr=3e-3)


@pytest.fixture(scope="session")
def toy_clip(tmp_path_factory) -> Path:
    """The checkpoint file of a pretrained toy CLIP: ``--model TINY_MODEL --pretrained <this path>``."""
    from ltclip.stages.toy_clip import ToyClipSettings, pretrain_toy_clip

    out = tmp_path_factory.mktemp("toy_clip")
    return out / pretrain_toy_clip(out, ToyClipSettings(**TOY_CLIP))["checkpoint"]


def write_cache(folder: Path, split: str, embeds, labels, num_classes: int, tokens=None, dataset: str = "gaussian") -> Path:
    """A feature cache file written by the real writer (as `ltclip extract` would)."""
    from ltclip.artifacts.store import write_arrays

    folder.mkdir(parents=True, exist_ok=True)
    return write_arrays(folder / f"{split}.h5", embeds, labels, [f"class {i}" for i in range(num_classes)],
                        {"dataset": dataset, "split": split, "model": "gaussian"}, tokens)


def write_token_cache(folder: Path) -> Path:
    """A long-tailed token cache for the decoder head: 6 classes, 240 train rows (96 … 8), 60 val rows."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", [96, 60, 40, 24, 12, 8]), ("val", [10] * 6)):
        y = np.repeat(np.arange(6), per_class)
        tokens = rng.standard_normal((len(y), 5, 16)).astype(np.float32)
        tokens[:, 0, :6] += 2.0 * np.eye(6)[y]
        write_cache(folder, split, tokens[:, 0], y, 6, tokens=tokens)
    return folder


def kill_at_random_moments(
    command: Callable[[], list[str]],
    progress: Callable[[], object],
    *,
    kills: int,
    seed: int,
    max_delay: float,
    env: dict | None = None,
    timeout: float = 120.0,
) -> int:
    """Start ``command()``, wait until ``progress()`` differs from its value at the start (the process
    has written something: a checkpoint, a block), sleep a seeded ``uniform(0, max_delay)`` and
    SIGKILL the process if it still runs; ``kills`` times, ``command()`` asked anew before each start
    (it may add ``--resume`` once a checkpoint exists). Returns how many kills landed before the
    process finished by itself."""
    rnd = random.Random(seed)
    landed = 0
    for _ in range(kills):
        before = progress()
        proc = subprocess.Popen(command(), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.time() + timeout
            while proc.poll() is None and time.time() < deadline and progress() == before:
                time.sleep(0.005)
            time.sleep(rnd.uniform(0.0, max_delay))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group: DataLoader workers too
                landed += 1
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return landed


def newest_mtime(*paths: Path) -> int | None:
    """The latest modification time (ns) of the files among ``paths`` that exist, or None: a progress marker."""
    times = [p.stat().st_mtime_ns for p in paths if p.exists()]
    return max(times) if times else None


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Fixed tiny weights in a file, so every run (and the reference) uses the same model."""
    from ltclip.models.backbone import load_backbone

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(load_backbone(TINY_MODEL, "none").model.state_dict(), path)
    return path
