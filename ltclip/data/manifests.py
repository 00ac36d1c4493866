"""Split files (``relative/path label`` per line) and class-name files: parsing and validation."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple

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


def is_inside(real_path: str, real_root: str) -> bool:
    """Whether ``real_path`` is ``real_root`` or lies under it (both already resolved)."""
    return real_path == real_root or real_path.startswith(real_root.rstrip(os.sep) + os.sep)


class RootGuard:
    """Refuses image paths that lead outside the data root: absolute, with a ``..`` component, or
    whose folder resolves (through a link) elsewhere. Each folder is resolved once; a link at the
    image file itself is checked when the image is read (:func:`is_inside`)."""

    def __init__(self, root: Path):
        self.root = root
        self.real_root = os.path.realpath(root)
        self.folders: dict[str, bool] = {}

    def check(self, key: str, where: str) -> None:
        reason = None
        if os.path.isabs(key):
            reason = "an absolute path"
        elif ".." in key.split("/"):
            reason = "a '..' component"
        else:
            folder = os.path.dirname(key)
            if folder and folder not in self.folders:
                self.folders[folder] = is_inside(os.path.realpath(self.root / folder), self.real_root)
            if folder and not self.folders[folder]:
                reason = f"its folder is a link to {os.path.realpath(self.root / folder)}"
        if reason:
            raise LtclipError(
                f"{where}: image path {key[:200]!r} leads outside --data-root {self.root} ({reason}); "
                "move the images under the data root or pass --allow-outside-root"
            )


def read_manifest(path: str | Path, split: str, num_classes: int | None = None, classes_from: str = "",
                  guard: RootGuard | None = None) -> Split:
    """Parse and validate one split file; every problem is a one-line error naming file and line.

    ``classes_from`` says where ``num_classes`` comes from (e.g. the class-name file), for the
    messages; ``guard`` (when given) refuses paths outside the data root.
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
        if guard is not None:
            guard.check(key, where)
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


class ClassLine(NamedTuple):
    """One class of a class-name file, in file order, read both ways until the train split decides."""

    ref: str  # "line 3" (a text file) or "category id 3" (a categories JSON), for messages
    key: str  # the first column (a JSON category's id)
    name: str  # the display name of the whole line (a JSON category's name)
    keyed_name: str  # the display name of the rest of the line when the first column is a key


def read_classnames(path: str | Path) -> list[ClassLine]:
    """The classes of a class-name file: a name per line, ``key name…`` lines (ImageNet wnids,
    Places folders) or an iNaturalist categories JSON (keys are the ids, rows in id order).

    Whether a text file's first column is a key is decided by :func:`align_classnames`.
    """
    path = Path(path)
    if not path.is_file():
        raise LtclipError(f"{path}: class-name file not found; pass --classnames or put it in the data root")
    if path.suffix == ".json":
        return [ClassLine(f"category id {i}", str(i), name, name) for i, name in enumerate(_read_categories_json(path))]
    lines = []
    blank = None  # the first empty line seen: fine at the end of the file, refused before a name
    for lineno, raw in _lines(path, "class-name file"):
        words = raw.split()
        if not words:
            blank = blank or lineno
            continue
        if blank is not None:
            raise LtclipError(
                f"{path}:{blank}: empty line before the class name on line {lineno}; line order is label order, "
                "so a missing name would shift every later class: remove the line or write the name"
            )
        line = ClassLine(f"line {lineno}", words[0], _display_name(" ".join(words)), _display_name(" ".join(words[1:]) or words[0]))
        if not line.name or not line.keyed_name:
            raise LtclipError(f"{path}:{lineno}: empty class name {raw.strip()!r}; write the name")
        lines.append(line)
    if not lines:
        raise LtclipError(f"{path}: class-name file is empty")
    return lines


def _labels_by_folder_key(lines: list[ClassLine], train: Split, source: str) -> dict[int, str] | None:
    """Label → key when every class's train images live under a folder named by one first column."""
    keys = {line.key for line in lines}
    if len(keys) != len(lines):
        return None
    by_label: dict[int, str] = {}
    for path, label in zip(train.keys, train.labels.tolist()):
        key = next((part for part in path.split("/")[:-1] if part in keys), None)
        if key is None:
            return None
        if by_label.setdefault(label, key) != key:
            raise LtclipError(f"{source}: label {label} has images under both {by_label[label]!r} and {key!r}; fix the split file")
    return by_label if len(by_label) == len(lines) else None


def align_classnames(lines: list[ClassLine], train: Split, source: str) -> list[str]:
    """Class names in label order, all different.

    A first column is a key only when it names the train split's folders (ImageNet wnids,
    Places-LT's category folders) or the file is a categories JSON: each label then takes the name
    whose key its images live under (the published ``Places_LT_classnames.txt`` is sorted
    differently from the labels for 5 classes). Otherwise the whole line is the name (``sea lion``)
    and line order is label order.
    """
    by_label = _labels_by_folder_key(lines, train, source)
    if by_label is not None:
        by_key = {line.key: line for line in lines}
        chosen = [by_key[by_label[label]] for label in range(len(lines))]
        named = [(line.ref, line.keyed_name) for line in chosen]
    else:
        named = [(line.ref, line.name) for line in lines]  # a JSON category's name is both
    _check_distinct(named, source)
    return [name for _, name in named]


def _check_distinct(named: list[tuple[str, str]], source: str) -> None:
    """Refuse two classes of the same name (compared as the text encoder sees them: case-blind)."""
    first: dict[str, str] = {}
    for ref, name in named:
        seen = first.setdefault(name.casefold(), ref)
        if seen != ref:
            where = f"{source}:{ref.removeprefix('line ')}" if ref.startswith("line ") else f"{source}: {ref}"
            raise LtclipError(
                f"{where}: class name {name!r} again (first on {seen}); class names must differ "
                "(zero-shot prompts and reports tell classes apart by name)"
            )


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


def manifest_from_inat_json(path: str | Path, split: str, guard: RootGuard | None = None) -> Split:
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
    if guard is not None:
        for i, key in enumerate(keys):
            guard.check(key, f"{path}: image {i}")
    return Split(split, keys, labels, str(path), file_sha256(path))
