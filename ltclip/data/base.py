"""What every dataset provides: named splits of (key, label) rows and a way to open each image."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image

from ..core.errors import LtclipError
from .templates import resolve_templates

# (split name, row index) -> RGB PIL image. Raises on a missing or undecodable image.
ImageOpener = Callable[[str, int], Image.Image]


@dataclass(frozen=True)
class Split:
    """One split: row i is image ``keys[i]`` (a path relative to the data root) with ``labels[i]``."""

    name: str
    keys: list[str]
    labels: np.ndarray  # int64, shape (N,)
    source: str  # the manifest file (or generator description) the rows came from
    sha256: str  # of that source's bytes (or of a canonical rendering of the rows)

    def __len__(self) -> int:
        return len(self.keys)

    def class_counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=num_classes).astype(np.int64)


def rows_sha256(keys: list[str], labels: np.ndarray) -> str:
    """Hash of a split given as rows (for splits that are not read from a file)."""
    h = hashlib.sha256()
    for key, label in zip(keys, labels.tolist()):
        h.update(f"{key} {label}\n".encode())
    return h.hexdigest()


@dataclass
class LTDataset:
    """A long-tailed classification dataset: class names, prompt templates, splits, image access."""

    name: str
    num_classes: int
    classnames: list[str]
    templates: str  # a named template set or a template file; see prompt_templates()
    splits: dict[str, Split]
    open_image: ImageOpener
    data_root: str = ""
    info: dict = field(default_factory=dict)  # free-form provenance (spec file, options)

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise LtclipError(
                f"dataset {self.name!r} has no split {name!r}; it has: {', '.join(self.splits)}"
            )
        return self.splits[name]

    def prompt_templates(self) -> list[str]:
        return resolve_templates(self.templates)

    def train_counts(self) -> np.ndarray:
        return self.split("train").class_counts(self.num_classes)
