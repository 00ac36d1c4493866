"""CIFAR-100-LT: the CIFAR-100 training set cut to an exponential class profile (Cao et al., LDAM).

Splits: ``train`` (the long-tailed subset) and ``test`` (the balanced 10,000 test images).
CIFAR-100 has no official validation set and none is invented here: tune on a held-out part of
``train`` or report on ``test``. Keys are ``train/<index>`` / ``test/<index>``, the row in the
original arrays. The standard imbalance ratios are 10, 50 and 100; any ratio >= 1 is accepted.

Reading: torchvision's ``CIFAR100`` downloads the files (``download=True``) and checks their md5
there; reading itself parses the same pickles in the same way torchvision does, here, because
torchvision refuses any file whose md5 differs from the official one (a subset, a re-pickled copy,
a test fixture). Whether the files are the official ones is recorded in ``info["official_files"]``.
The pickles are read by an unpickler that constructs only what CIFAR-100's files hold (plain data
and numpy arrays), so a planted file cannot run code.
"""

from __future__ import annotations

import codecs
import math
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

try:
    from numpy._core import multiarray as np_multiarray, numeric as np_numeric
except ImportError:  # numpy < 2
    from numpy.core import multiarray as np_multiarray, numeric as np_numeric

from ..core.errors import LtclipError
from .base import LTDataset, Split, rows_sha256

BASE_FOLDER = "cifar-100-python"  # torchvision's CIFAR100.base_folder
STANDARD_IMBALANCES = (10, 50, 100)


def _check_imbalance(imbalance: float) -> float:
    try:
        value = float(imbalance)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 1):
        raise LtclipError(
            f"--imbalance must be a number >= 1 (standard CIFAR-100-LT ratios: "
            f"{', '.join(map(str, STANDARD_IMBALANCES))}); got {imbalance!r}"
        )
    return value


def long_tail_counts(num_classes: int, n_max: int, imbalance: float) -> list[int]:
    """Images kept per class: n_i = int(n_max · imbalance^(−i/(C−1))), LDAM's exact expression."""
    factor = 1.0 / _check_imbalance(imbalance)
    if num_classes == 1:
        return [int(n_max)]
    return [int(n_max * factor ** (i / (num_classes - 1.0))) for i in range(num_classes)]


def long_tail_indices(targets, imbalance: float, seed: int = 0, num_classes: int | None = None) -> np.ndarray:
    """Indices of the long-tailed subset of a balanced set with labels ``targets``.

    One ``np.random.RandomState(seed)`` shuffles each class's indices in turn (ascending class
    order) and the first n_i are kept; the result is grouped by class in that shuffled order. This
    is LDAM's ``IMBALANCECIFAR100`` procedure, so seed 0 selects the same images as its code.
    n_max is the size of the smallest class (all classes are equal in CIFAR); ``num_classes``
    defaults to the largest label + 1.
    """
    targets = np.asarray(targets, dtype=np.int64)
    per_class = np.bincount(targets, minlength=num_classes or 0)
    if targets.size == 0 or per_class.min() == 0:
        raise LtclipError(f"the training labels do not cover all {len(per_class)} classes; check the dataset files")
    rng = np.random.RandomState(seed)
    kept = []
    for label, n in enumerate(long_tail_counts(len(per_class), int(per_class.min()), imbalance)):
        idx = np.flatnonzero(targets == label)
        rng.shuffle(idx)
        kept.append(idx[:n])
    return np.concatenate(kept)


# Every global the official CIFAR-100 python pickles refer to (numpy arrays, written by Python 2's
# numpy as numpy.core.*), and those of the same data re-pickled by numpy 1.x/2.x (protocols 2-5).
# Nothing else is constructed: a file naming any other global (os.system, builtins.exec, …) is refused.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how protocol 2 writes bytes under Python 3
    **{(module, "_reconstruct"): np_multiarray._reconstruct for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "_frombuffer"): np_numeric._frombuffer for module in ("numpy.core.numeric", "numpy._core.numeric")},
}


class _CifarUnpickler(pickle.Unpickler):
    """Reads dicts, lists, strings, numbers and numpy arrays; refuses every other global, so a file cannot run code."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-100 file never holds") from None


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise LtclipError(
            f"CIFAR-100 not found under {path.parent.parent}; pass --download (needs internet) "
            f"or point --data-root at a folder holding {BASE_FOLDER}"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, MemoryError, OverflowError) as err:
        raise LtclipError(f"{path}: not a CIFAR-100 python file ({err}); delete it and pass --download") from None


def _read_split(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images N×32×32×3 uint8, labels int64) from one CIFAR-100 pickle, as torchvision reads it."""
    entry = _read_pickle(path)
    try:
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.asarray(entry["fine_labels"], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as err:
        raise LtclipError(f"{path}: not a CIFAR-100 python file ({err!r}); delete it and pass --download") from None
    if len(labels) == 0 or len(labels) != len(data) or labels.min() < 0 or labels.max() >= num_classes:
        raise LtclipError(
            f"{path}: labels do not match the images or the {num_classes} classes; delete it and pass --download"
        )
    return data, labels


class _ArrayImages:
    """``open_image`` over in-memory HWC arrays per split (a class, so it pickles for workers)."""

    def __init__(self, images: dict[str, np.ndarray]):
        self.images = images

    def __call__(self, split: str, row: int) -> Image.Image:
        return Image.fromarray(self.images[split][row])


def _official_files(root: Path) -> bool:
    from torchvision.datasets import CIFAR100
    from torchvision.datasets.utils import check_integrity

    files = CIFAR100.train_list + CIFAR100.test_list + [[CIFAR100.meta["filename"], CIFAR100.meta["md5"]]]
    return all(check_integrity(str(root / BASE_FOLDER / name), md5) for name, md5 in files)


def _download(root: Path) -> None:
    from torchvision.datasets import CIFAR100

    try:
        CIFAR100(str(root), train=True, download=True)
    except (OSError, RuntimeError) as err:
        raise LtclipError(
            f"could not download CIFAR-100 into {root} ({err}); check the connection or --data-root"
        ) from None


def load_cifar100_lt(root: str | Path, *, imbalance: float = 100, download: bool = False, seed: int = 0) -> LTDataset:
    """CIFAR-100-LT with ``train`` (long-tailed, ratio ``imbalance``, subset chosen by ``seed``) and ``test``."""
    root = Path(root)
    ratio = _check_imbalance(imbalance)
    if download:
        _download(root)
    meta = _read_pickle(root / BASE_FOLDER / "meta")
    try:
        classnames = [str(name).replace("_", " ") for name in meta["fine_label_names"]]
    except (KeyError, TypeError):
        raise LtclipError(f"{root / BASE_FOLDER}/meta: no fine_label_names; delete it and pass --download") from None
    train_x, train_y = _read_split(root / BASE_FOLDER / "train", len(classnames))
    test_x, test_y = _read_split(root / BASE_FOLDER / "test", len(classnames))

    keep = long_tail_indices(train_y, ratio, seed, num_classes=len(classnames))
    base = root / BASE_FOLDER
    splits = {}
    for name, indices, labels, source in (
        ("train", keep, train_y[keep], f"{base}/train, long-tailed with imbalance {ratio:g}, seed {seed}"),
        ("test", np.arange(len(test_y)), test_y, f"{base}/test"),
    ):
        keys = [f"{name}/{i}" for i in indices.tolist()]
        splits[name] = Split(name, keys, labels, source, rows_sha256(keys, labels))

    return LTDataset(
        name="cifar100_lt",
        num_classes=len(classnames),
        classnames=classnames,
        templates="cifar",
        splits=splits,
        open_image=_ArrayImages({"train": train_x[keep], "test": test_x}),
        data_root=str(root),
        info={"imbalance": ratio, "seed": seed, "official_files": _official_files(root)},
    )
