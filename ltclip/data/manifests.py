"""Split files (``relative/path label`` per line) and class-name files: parsing and validation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..core.errors import LtclipError
from .base import Split


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _lines(path: Path, what: str):
    """``(lineno, text)`` of a UTF-8 text file (a byte-order mark is dropped); undecodable bytes are a one-line error."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            yield from enumerate(f, 1)
    except UnicodeDecodeError as err:
        raise LtclipError(f"{path}: not a UTF-8 text file (byte {err.start}: {err.reason}); save the {what} as UTF-8") from None


def read_manifest(path: str | Path, split: str, num_classes: int | None = None, classes_from: str = "") -> Split:
    """Parse and validate one split file; every problem is a one-line error naming file and line.

    ``classes_from`` says where ``num_classes`` comes from (e.g. the class-name file), for the messages.
    """
    path = Path(path)
    if not path.is_file():
        raise LtclipError(f"{path}: split file not found; check --data-root / --manifest-dir or the list option")
    keys: list[str] = []
    labels: list[int] = []
    seen: dict[str, int] = {}
    for lineno, raw in _lines(path, "split file"):
        line = raw.strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)
        where = f"{path}:{lineno}"
        if len(parts) != 2:
            raise LtclipError(f"{where}: malformed line {line[:80]!r}; expected 'relative/path label'")
        key, label_text = parts
        try:
            label = int(label_text)
        except ValueError:
            raise LtclipError(f"{where}: label {label_text!r} is not an integer; expected 'relative/path label'") from None
        if label < 0:
            raise LtclipError(f"{where}: negative label {label}; labels must be 0..num_classes-1")
        if num_classes is not None and label >= num_classes:
            source = f" ({classes_from})" if classes_from else ""
            raise LtclipError(
                f"{where}: label {label} >= number of classes {num_classes}{source}; fix the file or the class list"
            )
        if key in seen:
            raise LtclipError(f"{where}: duplicate path {key!r} (first on line {seen[key]}); remove one of them")
        seen[key] = lineno
        keys.append(key)
        labels.append(label)
    if not keys:
        raise LtclipError(f"{path}: split file is empty; expected one 'relative/path label' per line")
    return Split(split, keys, np.asarray(labels, dtype=np.int64), str(path), file_sha256(path))


def check_train_covers_classes(train: Split, num_classes: int, classes_from: str = "") -> None:
    """Every class must have at least one training image (class counts come from the train split)."""
    counts = train.class_counts(num_classes)
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        shown = ", ".join(map(str, missing[:10].tolist())) + (" …" if missing.size > 10 else "")
        source = f" ({classes_from})" if classes_from else ""
        raise LtclipError(
            f"{train.source}: {missing.size} of {num_classes} classes{source} have no training image (labels {shown}); "
            "labels must run 0..C-1 with an image of each: fix the split file or the class list"
        )


def _display_name(text: str) -> str:
    """``/a/airport_terminal`` or ``airport_terminal`` → ``airport terminal``."""
    return text.strip("/").split("/")[-1].replace("_", " ").strip()


def read_classnames(path: str | Path) -> list[tuple[str, str]]:
    """``(key, display name)`` per line in file order, from ``key name…`` lines, a bare name per line,
    or an iNaturalist categories JSON (keys are the ids, rows in id order)."""
    path = Path(path)
    if not path.is_file():
        raise LtclipError(f"{path}: class-name file not found; pass --classnames or put it in the data root")
    if path.suffix == ".json":
        return [(str(i), name) for i, name in enumerate(_read_categories_json(path))]
    pairs = []
    blank = None  # the first empty line seen: fine at the end of the file, refused before a name
    for lineno, raw in _lines(path, "class-name file"):
        parts = raw.split(maxsplit=1)
        if not parts:
            blank = blank or lineno
            continue
        if blank is not None:
            raise LtclipError(
                f"{path}:{blank}: empty line before the class name on line {lineno}; line order is label order, "
                "so a missing name would shift every later class: remove the line or write the name"
            )
        pairs.append((parts[0], _display_name(parts[1] if len(parts) == 2 else parts[0])))
        if not pairs[-1][1]:
            raise LtclipError(f"{path}:{lineno}: empty class name")
    if not pairs:
        raise LtclipError(f"{path}: class-name file is empty")
    return pairs


def align_classnames(pairs: list[tuple[str, str]], train: Split, source: str) -> list[str]:
    """Class names in label order.

    When the file's keys are folder names that appear in the train paths (Places-LT, ImageNet
    wnids), each label takes the name whose key its images live under: the published
    ``Places_LT_classnames.txt`` is sorted differently from the labels for 5 classes. Otherwise
    the file's line order is the label order.
    """
    keys = {key: name for key, name in pairs}
    by_label: dict[int, str] = {}
    for path, label in zip(train.keys, train.labels.tolist()):
        key = next((part for part in path.split("/")[:-1] if part in keys), None)
        if key is None:
            return [name for _, name in pairs]
        if by_label.setdefault(label, key) != key:
            raise LtclipError(f"{source}: label {label} has images under both {by_label[label]!r} and {key!r}; fix the split file")
    return [keys[by_label[label]] for label in range(len(by_label))] if len(by_label) == len(pairs) else [name for _, name in pairs]


def _read_categories_json(path: Path) -> list[str]:
    try:
        cats = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(cats, dict):  # a full train2018.json also carries "categories"
            cats = cats["categories"]
        by_id = {int(c["id"]): str(c["name"]) for c in cats}
    except (ValueError, KeyError, TypeError) as err:
        raise LtclipError(f"{path}: not a categories JSON (list of {{'id', 'name'}}): {err}") from None
    if sorted(by_id) != list(range(len(by_id))):
        raise LtclipError(f"{path}: category ids are not 0..{len(by_id) - 1}")
    return [by_id[i] for i in range(len(by_id))]


def classnames_from_folders(split: Split, num_classes: int, depth: int = 1) -> list[str]:
    """Derive class names from the folder at ``depth`` of each path (e.g. ``train/airfield/x.jpg``)."""
    names: list[str | None] = [None] * num_classes
    for key, label in zip(split.keys, split.labels.tolist()):
        parts = key.split("/")
        if len(parts) <= depth:
            raise LtclipError(f"{split.source}: path {key!r} has no folder at depth {depth} to name its class")
        if names[label] is None:
            names[label] = _display_name(parts[depth])
    missing = [i for i, n in enumerate(names) if n is None]
    if missing:
        raise LtclipError(f"{split.source}: no path names class {missing[0]}; pass --classnames")
    return names  # type: ignore[return-value]


def manifest_from_inat_json(path: str | Path, split: str) -> Split:
    """Build a split from an official iNaturalist ``train2018.json`` / ``val2018.json``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        label_of = {int(a["image_id"]): int(a["category_id"]) for a in data["annotations"]}
        keys = [str(im["file_name"]) for im in data["images"]]
        labels = np.asarray([label_of[int(im["id"])] for im in data["images"]], dtype=np.int64)
    except FileNotFoundError:
        raise LtclipError(f"{path}: iNaturalist JSON not found; put it in --data-root") from None
    except (ValueError, KeyError, TypeError) as err:
        raise LtclipError(f"{path}: not an iNaturalist annotation JSON ({err!r} missing or malformed)") from None
    if not keys:
        raise LtclipError(f"{path}: no images in iNaturalist JSON")
    return Split(split, keys, labels, str(path), file_sha256(path))
