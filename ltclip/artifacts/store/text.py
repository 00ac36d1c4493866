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
    # (C, W) float32 or None: LIFT's text start for a head reading the pre-projection feature
    # (``extract --pooled``): the ``pooled_template`` embeddings mapped back through ``proj.T``
    pooled: np.ndarray | None = None
    pooled_template: str | None = None


def save_text_embeddings(
    path: str | os.PathLike,
    embeds,
    classnames: Sequence[str],
    templates: Sequence[str],
    attrs: dict,
    pooled=None,
    pooled_template: str | None = None,
) -> Path:
    """Write the class text embeddings (C, D) with their class names and prompt templates; ``pooled``
    (C, W), the ``pooled_template`` embeddings in the ViT's pre-projection space, is stored beside them."""
    path = Path(path)
    embeds = np.asarray(embeds, dtype=np.float32)
    if embeds.ndim != 2 or embeds.shape[0] != len(classnames) or not np.isfinite(embeds).all():
        raise ValueError(f"text embeddings must be finite, shape ({len(classnames)}, D)")
    if pooled is not None:
        pooled = np.asarray(pooled, dtype=np.float32)
        if pooled.ndim != 2 or pooled.shape[0] != len(classnames) or not np.isfinite(pooled).all() or not pooled_template:
            raise ValueError(f"pooled text embeddings must be finite, shape ({len(classnames)}, W), with their template")
    with atomic_h5(path) as h5:
        h5.attrs.update({**header(TEXT_KIND, len(classnames)), **identity_attrs(attrs)})
        h5.create_dataset("embeds", data=embeds)
        h5.create_dataset("classnames", data=strings(classnames))
        h5.create_dataset("templates", data=strings(templates))
        if pooled is not None:
            h5.create_dataset("pooled_embeds", data=pooled)
            h5.create_dataset("pooled_template", data=strings([pooled_template]))
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
        pooled = h5["pooled_embeds"][()].astype(np.float32) if "pooled_embeds" in h5 else None
        pooled_template = (read_strings(h5, "pooled_template") or [None])[0]
    num_classes = attrs["num_classes"]
    if embeds.ndim != 2 or not len(embeds) == len(classnames) == num_classes:
        raise LtclipError(
            f"{path}: embeds {embeds.shape} and {len(classnames)} classnames do not match "
            f"num_classes={num_classes}; re-create it"
        )
    if pooled is not None and (pooled.ndim != 2 or len(pooled) != num_classes or pooled_template is None):
        raise LtclipError(f"{path}: pooled_embeds {pooled.shape} (template {pooled_template!r}) do not match "
                          f"num_classes={num_classes}; re-create it")
    check_cache_folder(path, attrs, embeds.shape[1], classnames)
    return TextEmbeddings(embeds, classnames, templates, attrs, pooled, pooled_template)


def zero_shot_text(features: str | os.PathLike) -> TextEmbeddings:
    """The class text embeddings ``--zero-shot`` classifies with: cache ``features``'s ``text.h5``
    (missing: one line saying how to write it)."""
    path = Path(features) / "text.h5"
    if not path.is_file():
        raise LtclipError(f"--zero-shot: {path} is missing; rerun `ltclip extract` to write the text embeddings")
    return load_text_embeddings(path)
