"""CIFAR-100-LT on a small fake CIFAR-100 written in the on-disk format torchvision reads."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torchvision

from ltclip.data.base import rows_sha256
from ltclip.data.cifar import load_cifar100_lt, long_tail_counts, long_tail_indices
from ltclip.data.templates import CIFAR100_TEMPLATES
from ltclip.core.errors import LtclipError

CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 100, 30, 5


def _write_split(path: Path, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    with open(path, "wb") as f:
        entry = {"data": data, "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist()}
        pickle.dump(entry, f, protocol=2)
    return data


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory):
    """100 classes × 30 train / 5 test images of 32×32, labels interleaved as in the real files."""
    root = tmp_path_factory.mktemp("cifar")
    base = root / "cifar-100-python"
    base.mkdir()
    rng = np.random.default_rng(0)
    train_labels = rng.permutation(np.repeat(np.arange(CLASSES), TRAIN_PER_CLASS))
    test_labels = rng.permutation(np.repeat(np.arange(CLASSES), TEST_PER_CLASS))
    train = _write_split(base / "train", train_labels, rng)
    test = _write_split(base / "test", test_labels, rng)
    names = [f"class_{i}" for i in range(CLASSES - 1)] + ["maple_tree"]
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names, "coarse_label_names": [f"super_{i}" for i in range(20)]}, f, protocol=2)
    return root, (train, train_labels), (test, test_labels)


def _hwc(row: np.ndarray) -> np.ndarray:
    return row.reshape(3, 32, 32).transpose(1, 2, 0)


def test_counts_follow_ldam_profile():
    counts = long_tail_counts(CLASSES, TRAIN_PER_CLASS, 10)
    # int(30 · 10^(−i/99)): i=1 → 29.31, i=50 → 9.37, i=78 → 4.20, i=87 → 3.98, i=99 → 3.00…
    assert (counts[0], counts[1], counts[50], counts[78], counts[87], counts[99]) == (30, 29, 9, 4, 3, 3)
    assert counts == sorted(counts, reverse=True)
    # The published CIFAR-100-LT training-set sizes.
    assert [sum(long_tail_counts(100, 500, r)) for r in (10, 50, 100)] == [19573, 12608, 10847]
    assert long_tail_counts(5, 8, 1) == [8] * 5


def test_indices_match_ldam_procedure():
    targets = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 20))
    # LDAM's IMBALANCECIFAR: global seed, then per class in order np.where + shuffle + head.
    np.random.seed(3)
    expected = []
    for label, n in enumerate(long_tail_counts(10, 20, 50)):
        idx = np.where(targets == label)[0]
        np.random.shuffle(idx)
        expected.append(idx[:n])
    got = long_tail_indices(targets, 50, seed=3)
    np.testing.assert_array_equal(got, np.concatenate(expected))
    assert np.all(np.diff(targets[got]) >= 0)  # grouped in ascending class order
    with pytest.raises(LtclipError, match="do not cover all 11 classes"):
        long_tail_indices(targets, 50, num_classes=11)


def test_load_builds_long_tailed_train_and_balanced_test(fake_cifar):
    root, (train, train_labels), (test, test_labels) = fake_cifar
    ds = load_cifar100_lt(root, imbalance=10)
    assert set(ds.splits) == {"train", "test"}
    assert ds.num_classes == CLASSES and ds.name == "cifar100_lt"
    assert ds.classnames[-1] == "maple tree"
    assert ds.prompt_templates() == list(CIFAR100_TEMPLATES)
    assert ds.train_counts().tolist() == long_tail_counts(CLASSES, TRAIN_PER_CLASS, 10)
    assert ds.split("test").class_counts(CLASSES).tolist() == [TEST_PER_CLASS] * CLASSES
    assert ds.info == {"imbalance": 10.0, "seed": 0, "official_files": False}
    assert "imbalance 10, seed 0" in ds.split("train").source

    for name, (data, labels) in {"train": (train, train_labels), "test": (test, test_labels)}.items():
        split = ds.split(name)
        assert split.sha256 == rows_sha256(split.keys, split.labels)
        for row in (0, len(split) // 2, len(split) - 1):
            prefix, index = split.keys[row].split("/")
            assert prefix == name and split.labels[row] == labels[int(index)]
            image = ds.open_image(name, row)
            assert image.mode == "RGB" and image.size == (32, 32)
            np.testing.assert_array_equal(np.asarray(image), _hwc(data[int(index)]))
    assert ds.split("test").keys == [f"test/{i}" for i in range(CLASSES * TEST_PER_CLASS)]


def test_subset_is_deterministic_by_seed(fake_cifar):
    root = fake_cifar[0]
    a, b, c = (load_cifar100_lt(root, imbalance=10, seed=s) for s in (0, 0, 1))
    assert a.split("train").keys == b.split("train").keys
    assert a.split("train").sha256 == b.split("train").sha256
    assert a.split("train").keys != c.split("train").keys
    assert a.train_counts().tolist() == c.train_counts().tolist()
    assert a.split("test").sha256 == c.split("test").sha256


def test_reader_agrees_with_torchvision(fake_cifar, monkeypatch):
    """torchvision refuses the fake (md5); with its md5 check bypassed it parses the same arrays."""
    root = fake_cifar[0]
    with pytest.raises(RuntimeError):
        torchvision.datasets.CIFAR100(root, train=True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    reference = torchvision.datasets.CIFAR100(root, train=True)
    ds = load_cifar100_lt(root, imbalance=1)
    assert ds.classnames == [c.replace("_", " ") for c in reference.classes]
    split = ds.split("train")
    for row in (0, 7, len(split) - 1):
        index = int(split.keys[row].split("/")[1])
        image, label = reference[index]
        assert label == split.labels[row]
        np.testing.assert_array_equal(np.asarray(image), np.asarray(ds.open_image("train", row)))


def test_missing_data_says_how_to_fix(tmp_path):
    with pytest.raises(LtclipError, match=r"CIFAR-100 not found under .*--download.*--data-root.*cifar-100-python"):
        load_cifar100_lt(tmp_path)


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(LtclipError, match="could not download CIFAR-100"):
        load_cifar100_lt(tmp_path, download=True)


def test_corrupt_file_is_a_clear_error(fake_cifar, tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    for name in ("meta", "test"):
        (base / name).write_bytes((fake_cifar[0] / "cifar-100-python" / name).read_bytes())
    (base / "train").write_bytes(b"not a pickle")
    with pytest.raises(LtclipError, match="train: not a CIFAR-100 python file"):
        load_cifar100_lt(tmp_path)


@pytest.mark.parametrize("ratio", [0.5, 0, float("nan"), float("inf"), "ten"])
def test_bad_imbalance_is_refused(ratio):
    with pytest.raises(LtclipError, match="--imbalance"):
        long_tail_counts(100, 500, ratio)
