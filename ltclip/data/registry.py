"""Datasets by name: one spec file per dataset in ``data_manifests/``, one loader per dataset kind.

A spec names its ``kind``; :data:`DATASET_KINDS` maps each kind to the function that builds the
:class:`LTDataset` (splits + class names + templates + image access) from the spec and a
:class:`DatasetRequest` (where the data is, the caller's overrides). :func:`load_dataset`
dispatches by kind. A new kind is one decorated loader here plus a spec file naming it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..core.errors import LtclipError
from ..core.registry import Registry
from .base import LTDataset, Split
from .cifar import load_cifar100_lt
from .image_files import read_rgb
from .manifests import (
    RootGuard,
    align_classnames,
    check_train_covers_classes,
    classnames_from_folders,
    is_inside,
    manifest_from_inat_json,
    read_classnames,
    read_manifest,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SPLITS = ("train", "val", "test")


def spec_dir() -> Path:
    """The spec folder: inside the installed package, or the repository's ``data_manifests/``."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "data_manifests", here.parent / "data_manifests"):
        if candidate.is_dir():
            return candidate
    raise LtclipError("data_manifests/ not found beside the ltclip package; reinstall ltclip")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    kind: str  # a name in DATASET_KINDS
    num_classes: int | None = None
    citation: str = ""
    get: str = ""
    templates: str = "openai_imagenet"
    splits: dict = field(default_factory=dict)
    inat_json: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=dict)
    classnames: dict = field(default_factory=dict)
    path: str = ""


@dataclass(frozen=True)
class DatasetRequest:
    """What the caller of :func:`load_dataset` adds to a spec: where the data is, and overrides."""

    data_root: Path
    manifest_dir: Path | None = None
    split_files: dict[str, str] = field(default_factory=dict)  # split -> file, overriding the spec's
    classnames_file: str | None = None
    imbalance: float = 100.0
    download: bool = False
    seed: int = 0
    # False for a class profile or an image check: without a class-name source the classes are
    # then numbered (``class 0``, ``class 1``, …) instead of refused.
    need_classnames: bool = True
    # Image paths that lead outside the data root (absolute, ``..``, through a link) are refused unless True.
    allow_outside_root: bool = False


DatasetLoader = Callable[[DatasetSpec, DatasetRequest], LTDataset]
DATASET_KINDS: Registry[DatasetLoader] = Registry("dataset kind")

# A user's own split files: the one dataset without a spec file.
CUSTOM = DatasetSpec(name="custom", title="custom", kind="custom")


def list_dataset_kinds(pattern: str = "*") -> list[str]:
    return DATASET_KINDS.names(pattern)


def _read_spec(path: Path) -> DatasetSpec:
    with open(path, "rb") as f:
        fields = tomllib.load(f)
    kinds = DATASET_KINDS.names()
    if fields.get("kind") not in kinds:
        raise LtclipError(f"{path}: kind {fields.get('kind')!r} is not a dataset kind; choose one of: {', '.join(kinds)}")
    return DatasetSpec(**fields, path=str(path))


def list_datasets() -> list[DatasetSpec]:
    return [_read_spec(path) for path in sorted(spec_dir().glob("*.toml"))]


def get_spec(name: str) -> DatasetSpec:
    specs = {s.name: s for s in list_datasets()}
    if name not in specs:
        raise LtclipError(
            f"unknown dataset {name!r}; registered: {', '.join(specs)} "
            "(or pass --train-list/--test-list/--classnames for your own)"
        )
    return specs[name]


def load_dataset(
    name: str = "custom",
    data_root: str | Path = ".",
    *,
    manifest_dir: str | Path | None = None,
    split_files: dict[str, str] | None = None,
    classnames_file: str | None = None,
    templates: str | None = None,
    imbalance: float = 100.0,
    download: bool = False,
    seed: int = 0,
    need_classnames: bool = True,
    allow_outside_root: bool = False,
) -> LTDataset:
    """Build a dataset by registered name, or a user's own (``custom``) from ``split_files`` + ``classnames_file``.

    Split files are looked up in ``manifest_dir`` and then the data root; ``split_files`` overrides
    a spec's files per split; ``templates`` overrides the dataset's prompt templates. With
    ``need_classnames=False`` (a class profile, an image check) a dataset without a class-name
    source gets numbered names instead of an error. Image paths leading outside the data root are
    refused unless ``allow_outside_root``.
    """
    spec = CUSTOM if name == "custom" else get_spec(name)
    request = DatasetRequest(
        data_root=Path(data_root),
        manifest_dir=Path(manifest_dir) if manifest_dir else None,
        split_files=dict(split_files or {}),
        classnames_file=classnames_file,
        imbalance=imbalance,
        download=download,
        seed=seed,
        need_classnames=need_classnames,
        allow_outside_root=allow_outside_root,
    )
    dataset = DATASET_KINDS.get(spec.kind)(spec, request)
    if templates:
        dataset.templates = templates
    return dataset


def open_dataset(cfg, need_classnames: bool = True) -> LTDataset:
    """:func:`load_dataset` from a :class:`ltclip.config.DataConfig`."""
    return load_dataset(
        cfg.dataset, cfg.data_root, manifest_dir=cfg.manifest_dir, split_files=cfg.split_files(),
        classnames_file=cfg.classnames, templates=cfg.templates, imbalance=cfg.imbalance, download=cfg.download,
        seed=cfg.subset_seed, need_classnames=need_classnames, allow_outside_root=cfg.allow_outside_root,
    )


# ---------------------------------------------------------------- the kinds


@DATASET_KINDS.register("cifar100_lt")
def load_cifar_kind(spec: DatasetSpec, request: DatasetRequest) -> LTDataset:
    """CIFAR-100 read (or downloaded) under the data root, cut to ``imbalance`` (see ltclip.data.cifar)."""
    return load_cifar100_lt(request.data_root, imbalance=request.imbalance, download=request.download, seed=request.seed)


@DATASET_KINDS.register("custom")
def load_custom_kind(spec: DatasetSpec, request: DatasetRequest) -> LTDataset:
    """A user's own split files and class-name file, read like a manifest dataset.

    Only the train list is always needed (class counts come from it); the class names are needed
    for the text classifier (``extract``), not for a class profile or an image check.
    """
    if "train" not in request.split_files:
        raise LtclipError("--dataset custom needs --train-list FILE (one 'relative/path label' per line); "
                          "--val-list, --test-list and --classnames are added as needed")
    if not request.classnames_file and request.need_classnames:
        raise LtclipError("--dataset custom needs --classnames FILE (one class name per line, in label order) "
                          "for the zero-shot text classifier")
    names = {"file": request.classnames_file} if request.classnames_file else {}
    spec = replace(spec, splits=dict(request.split_files), classnames=names)
    return load_manifest_kind(spec, request)


@DATASET_KINDS.register("manifest")
def load_manifest_kind(spec: DatasetSpec, request: DatasetRequest) -> LTDataset:
    """Images under the data root, listed in split files (``relative/path label``) that lie in the
    manifest folder or the data root, or are built from iNaturalist JSON; class names from a
    class-name file, open_clip's ImageNet list or the train paths' folders."""
    root = request.data_root
    if not root.is_dir():
        raise LtclipError(f"--data-root {root}: folder not found")
    dirs = ([request.manifest_dir] if request.manifest_dir else []) + [root]
    names_file = request.classnames_file or spec.classnames.get("file")
    names_path = Path(names_file) if names_file and Path(names_file).is_file() else (names_file and _find(names_file, dirs))
    if names_file and not names_path and request.classnames_file:  # the caller named it: it must exist
        raise LtclipError(f"--classnames {names_file}: class-name file not found in {', '.join(map(str, dirs))}")
    lines = read_classnames(names_path) if names_path else None
    listed = lines if lines is not None else _builtin_classnames(spec)
    num_classes = spec.num_classes
    classes_from = ""
    if num_classes is None and listed is not None:
        num_classes = len(listed)
        classes_from = f"the {num_classes} names in {names_path}" if names_path else ""
    if num_classes is None and request.need_classnames:
        raise LtclipError(f"{names_file}: class-name file not found in {', '.join(map(str, dirs))}; pass --classnames")
    splits = _read_splits(spec, request, dirs, num_classes, classes_from)
    if num_classes is None:  # no class list: the classes are the train split's labels 0..max
        num_classes = int(splits["train"].labels.max()) + 1
        classes_from = f"labels 0..{num_classes - 1} of the train split; pass --classnames for more"
        _check_labels(splits, num_classes, classes_from)
    check_train_covers_classes(splits["train"], num_classes, classes_from)
    classnames = align_classnames(lines, splits["train"], str(names_path)) if lines is not None else listed
    if classnames is None and "folder_depth" in spec.classnames:
        classnames = classnames_from_folders(splits["train"], num_classes, spec.classnames["folder_depth"])
    if classnames is None:
        if request.need_classnames:
            raise LtclipError(f"{names_file}: class-name file not found in {', '.join(map(str, dirs))}; pass --classnames")
        classnames = [f"class {i}" for i in range(num_classes)]
    if len(classnames) != num_classes:
        raise LtclipError(f"{names_path}: {len(classnames)} class names for {num_classes} classes; fix the class-name file")
    keys = {s: sp.keys for s, sp in splits.items()}
    return LTDataset(
        name=spec.name,
        num_classes=num_classes,
        classnames=classnames,
        templates=spec.templates,
        splits=splits,
        open_image=partial(open_file_image, root, keys, request.allow_outside_root),
        data_root=str(root),
        info={"spec": spec.path, "classnames": str(names_path or "builtin")},
    )


def open_file_image(root: Path, keys_by_split: dict[str, list[str]], allow_outside_root: bool, split: str,
                    index: int) -> Image.Image:
    """Open image ``index`` of ``split`` under ``root`` as RGB; a link out of ``root`` is refused unless allowed
    (the split files' paths and folders were checked when the dataset was opened)."""
    path = root / keys_by_split[split][index]
    if not allow_outside_root and os.path.islink(path) and not is_inside(os.path.realpath(path), os.path.realpath(root)):
        raise ValueError(f"a link to {os.path.realpath(path)}, outside --data-root; pass --allow-outside-root")
    return read_rgb(path)


def _find(name: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        if (d / name).is_file():
            return d / name
    return None


def _builtin_classnames(spec: DatasetSpec) -> list[str] | None:
    """The class list a spec takes from a library (``[classnames] builtin = "imagenet"``), if any."""
    if "builtin" not in spec.classnames:
        return None
    # open_clip imports torch: load it only for a dataset that needs its class list.
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def _read_splits(spec: DatasetSpec, request: DatasetRequest, dirs: list[Path], num_classes: int | None,
                 classes_from: str = "") -> dict[str, Split]:
    """Every split whose file is found (the train split and those the caller named must be)."""
    files = {**spec.splits, **request.split_files}
    guard = None if request.allow_outside_root else RootGuard(request.data_root)
    splits: dict[str, Split] = {}
    for split in SPLITS:
        fname = files.get(split)
        if fname is None:
            continue
        path = Path(fname) if Path(fname).is_file() else _find(fname, dirs)
        if path is None and split in spec.inat_json:
            json_path = _find(spec.inat_json[split], dirs)
            if json_path is not None:
                splits[split] = manifest_from_inat_json(json_path, split, guard)
                continue
        if path is None:
            if split == "train" or split in request.split_files:
                raise LtclipError(
                    f"{fname}: {split} split file not found in {', '.join(map(str, dirs))}; "
                    f"{spec.get or 'pass the path with --' + split + '-list'}"
                )
            continue
        splits[split] = read_manifest(path, split, num_classes, classes_from, guard)
    if "train" not in splits:
        raise LtclipError(f"dataset {spec.name}: no train split found (class counts come from it)")
    if num_classes is not None:
        _check_labels(splits, num_classes, classes_from)
    return splits


def _check_labels(splits: dict[str, Split], num_classes: int, classes_from: str) -> None:
    """Every label below ``num_classes`` (labels from JSON, or read before the class count was known)."""
    for split in splits.values():
        if int(split.labels.max()) >= num_classes:
            row = int(np.flatnonzero(split.labels >= num_classes)[0])
            source = f" ({classes_from})" if classes_from else ""
            raise LtclipError(f"{split.source}: label {int(split.labels[row])} of {split.keys[row]!r} >= number of classes "
                              f"{num_classes}{source}; fix the file or the class list")
