"""Class text embeddings (``text.h5``): the zero-shot classifier with its class names and templates."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from ...core.errors import LtclipError
from ._h5 import TEXT_KIND, atomic_h5, check_header, file_attrs, header, identity_attrs, open_h5, read_strings, strings
from .reader import check_cache_folder


class TextEmbeddings(NamedTuple):
    """The contents of ``text.h5``: one embedding per class with the prompts that made it."""

    embeds: np.ndarray  # (C, D) float32
    classnames: list[str]
    templates: list[str]
    attrs: dict


def save_text_embeddings(
    path: str | os.PathLike,
    embeds,
    classnames: Sequence[str],
    templates: Sequence[str],
    attrs: dict,
) -> Path:
    """Write the class text embeddings (C, D) with their class names and prompt templates."""
    path = Path(path)
    embeds = np.asarray(embeds, dtype=np.float32)
    if embeds.ndim != 2 or embeds.shape[0] != len(classnames) or not np.isfinite(embeds).all():
        raise ValueError(f"text embeddings must be finite, shape ({len(classnames)}, D)")
    with atomic_h5(path) as h5:
        h5.attrs.update({**header(TEXT_KIND, len(classnames)), **identity_attrs(attrs)})
        h5.create_dataset("embeds", data=embeds)
        h5.create_dataset("classnames", data=strings(classnames))
        h5.create_dataset("templates", data=strings(templates))
    return path


def load_text_embeddings(path: str | os.PathLike) -> TextEmbeddings:
    """Read and validate a file written by :func:`save_text_embeddings`."""
    path = Path(path)
    with open_h5(path, "r") as h5:
        attrs = file_attrs(h5)
        check_header(path, attrs, TEXT_KIND)
        if "embeds" not in h5 or "classnames" not in h5:
            raise LtclipError(f"{path} needs 'embeds' and 'classnames' datasets; re-create it")
        embeds = h5["embeds"][()].astype(np.float32)
        classnames = read_strings(h5, "classnames")
        templates = read_strings(h5, "templates") or []
    num_classes = attrs["num_classes"]
    if embeds.ndim != 2 or not len(embeds) == len(classnames) == num_classes:
        raise LtclipError(
            f"{path}: embeds {embeds.shape} and {len(classnames)} classnames do not match "
            f"num_classes={num_classes}; re-create it"
        )
    check_cache_folder(path, attrs, embeds.shape[1], classnames)
    return TextEmbeddings(embeds, classnames, templates, attrs)
