"""Dataset registry: one spec file per dataset in ``data_manifests/``; one function builds the dataset."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from PIL import Image

from ..errors import LtclipError
from .base import LTDataset, Split
from .manifests import (
    align_classnames,
    check_train_covers_classes,
    classnames_from_folders,
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
    kind: str = "manifest"
    num_classes: int | None = None
    citation: str = ""
    get: str = ""
    templates: str = "openai_imagenet"
    splits: dict = field(default_factory=dict)
    inat_json: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=dict)
    classnames: dict = field(default_factory=dict)
    path: str = ""


def list_datasets() -> list[DatasetSpec]:
    specs = []
    for path in sorted(spec_dir().glob("*.toml")):
        with open(path, "rb") as f:
            specs.append(DatasetSpec(**tomllib.load(f), path=str(path)))
    return specs


def get_spec(name: str) -> DatasetSpec:
    specs = {s.name: s for s in list_datasets()}
    if name not in specs:
        raise LtclipError(
            f"unknown dataset {name!r}; registered: {', '.join(specs)} "
            "(or pass --train-list/--test-list/--classnames for your own)"
        )
    return specs[name]


def open_file_image(root: Path, keys_by_split: dict[str, list[str]], split: str, index: int) -> Image.Image:
    """Open image ``index`` of ``split`` under ``root`` as RGB."""
    with Image.open(root / keys_by_split[split][index]) as im:
        return im.convert("RGB")


def _find(name: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        if (d / name).is_file():
            return d / name
    return None


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
) -> LTDataset:
    """Build a dataset by registered name, or a user's own from ``split_files`` + ``classnames_file``.

    Split files are looked up in ``manifest_dir`` and then the data root; ``split_files`` overrides
    a spec's files per split.
    """
    root = Path(data_root)
    if name == "custom":
        if not split_files or "train" not in split_files or not classnames_file:
            raise LtclipError("your own dataset needs --train-list, --classnames and at least one of --val-list/--test-list")
        spec = DatasetSpec(name="custom", title="custom", splits=dict(split_files), classnames={"file": classnames_file})
    else:
        spec = get_spec(name)
    if spec.kind == "cifar100_lt":
        from .cifar import load_cifar100_lt

        ds = load_cifar100_lt(root, imbalance=imbalance, download=download, seed=seed)
        if templates:
            ds.templates = templates
        return ds
    if not root.is_dir():
        raise LtclipError(f"--data-root {root}: folder not found")
    dirs = [Path(manifest_dir)] if manifest_dir else []
    dirs.append(root)
    files = {**spec.splits, **(split_files or {})}
    num_classes = spec.num_classes
    pairs = None
    classnames = None
    names_file = classnames_file or spec.classnames.get("file")
    names_path = Path(names_file) if names_file and Path(names_file).is_file() else (names_file and _find(names_file, dirs))
    if names_path:
        pairs = read_classnames(names_path)
        classnames = [name for _, name in pairs]
    elif "builtin" in spec.classnames:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        classnames = list(IMAGENET_CLASSNAMES)
    if num_classes is None:
        if classnames is None:
            raise LtclipError(f"{names_file}: class-name file not found in {', '.join(map(str, dirs))}; pass --classnames")
        num_classes = len(classnames)
    splits: dict[str, Split] = {}
    for split in SPLITS:
        fname = files.get(split)
        if fname is None:
            continue
        path = Path(fname) if Path(fname).is_file() else _find(fname, dirs)
        if path is None and split in spec.inat_json:
            json_path = _find(spec.inat_json[split], dirs)
            if json_path is not None:
                splits[split] = manifest_from_inat_json(json_path, split)
                continue
        if path is None:
            if split == "train" or split_files and split in split_files:
                raise LtclipError(
                    f"{fname}: {split} split file not found in {', '.join(map(str, dirs))}; "
                    f"{spec.get or 'pass the path with --' + split + '-list'}"
                )
            continue
        splits[split] = read_manifest(path, split, num_classes)
    if "train" not in splits:
        raise LtclipError(f"dataset {spec.name}: no train split found (class counts come from it)")
    for split in splits.values():
        if int(split.labels.max()) >= num_classes:  # labels from JSON are not range-checked while read
            raise LtclipError(f"{split.source}: label {int(split.labels.max())} >= number of classes {num_classes}")
    check_train_covers_classes(splits["train"], num_classes)
    if pairs is not None:
        classnames = align_classnames(pairs, splits["train"], str(names_path))
    if classnames is None:
        if "folder_depth" not in spec.classnames:
            raise LtclipError(f"{names_file}: class-name file not found in {', '.join(map(str, dirs))}; pass --classnames")
        classnames = classnames_from_folders(splits["train"], num_classes, spec.classnames["folder_depth"])
    if len(classnames) != num_classes:
        raise LtclipError(f"{names_path}: {len(classnames)} class names for {num_classes} classes; fix the class-name file")
    keys = {s: sp.keys for s, sp in splits.items()}
    return LTDataset(
        name=spec.name,
        num_classes=num_classes,
        classnames=classnames,
        templates=templates or spec.templates,
        splits=splits,
        open_image=partial(open_file_image, root, keys),
        data_root=str(root),
        info={"spec": spec.path, "classnames": str(names_path or "builtin")},
    )


def open_dataset(cfg) -> LTDataset:
    """:func:`load_dataset` from a :class:`ltclip.config.DataConfig`."""
    return load_dataset(
        cfg.dataset, cfg.data_root, manifest_dir=cfg.manifest_dir, split_files=cfg.split_files(),
        classnames_file=cfg.classnames, templates=cfg.templates, imbalance=cfg.imbalance, download=cfg.download,
        seed=cfg.seed,
    )
