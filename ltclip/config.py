"""Stage configs: frozen dataclasses that the CLI builds, a stage consumes and a run saves."""

from __future__ import annotations

import dataclasses
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import LtclipError


@dataclass(frozen=True)
class DataConfig:
    """Which dataset and where its files are."""

    dataset: str = "synthetic"
    data_root: str = "."
    manifest_dir: str | None = None
    train_list: str | None = None
    val_list: str | None = None
    test_list: str | None = None
    classnames: str | None = None
    templates: str | None = None
    imbalance: float = 100.0
    download: bool = False
    seed: int = 0

    def split_files(self) -> dict[str, str]:
        lists = {"train": self.train_list, "val": self.val_list, "test": self.test_list}
        return {k: v for k, v in lists.items() if v}


@dataclass(frozen=True)
class ExtractConfig:
    data: DataConfig
    out: str
    splits: tuple[str, ...] = ()  # empty: every split the dataset has
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    preprocess_from: str | None = None
    tokens: bool = True
    batch_size: int = 256
    workers: int = 4
    device: str = "auto"
    precision: str = "fp32"
    test_views: str = "center"
    train_views: int = 0
    bad_images: str = "fail"
    block_size: int = 1024
    seed: int = 0


@dataclass(frozen=True)
class TrainHeadConfig:
    features: str
    out: str
    head: str = "decoder"
    head_opts: tuple[str, ...] = ()
    loss: str = "ce"
    loss_opts: tuple[str, ...] = ()
    sampler: str = "instance"
    epochs: int = 10
    steps: int | None = None
    batch_size: int = 256
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup: float = 0.0
    grad_clip: float = 0.0
    seed: int = 0
    device: str = "auto"
    max_ram: str | None = None
    val_split: str = "val"
    from_run: str | None = None
    two_stage: str | None = None
    two_stage_opts: tuple[str, ...] = ()
    posthoc_la: bool = False


@dataclass(frozen=True)
class EvalConfig:
    runs: tuple[str, ...] = ()
    features: str | None = None  # for baselines without a run
    split: str = "test"
    zero_shot: bool = False
    knn: int = 0
    ncm: bool = False
    retrieval_mix: float = 0.0
    retrieval_k: int = 10
    temperature: float = 0.07
    views: str = "mean"
    many: int = 100
    few: int = 20
    backend: str = "auto"
    batch_size: int = 1024
    device: str = "auto"
    allow_mixed: bool = False
    report: str | None = None
    json: str | None = None
    csv: str | None = None
    plot: str | None = None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict):
    """Rebuild a (nested) config dataclass, refusing unknown keys."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise LtclipError(f"config: unknown key(s) {', '.join(sorted(unknown))} for {cls.__name__}")
    kwargs = {}
    for key, value in data.items():
        ftype = names[key].type
        sub = {"DataConfig": DataConfig}.get(ftype if isinstance(ftype, str) else getattr(ftype, "__name__", ""))
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def load_config_file(path: str | Path) -> dict:
    """Read a TOML or YAML config file into a dict (for ``--config``)."""
    path = Path(path)
    if not path.is_file():
        raise LtclipError(f"--config {path}: file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data = _toml().loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as err:  # parse errors of either format
        raise LtclipError(f"--config {path}: cannot parse ({err})".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise LtclipError(f"--config {path}: expected a table of option = value")
    return data


def _toml():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib


def provenance() -> dict:
    """Versions recorded in every artifact."""
    import numpy
    import torch

    try:
        import open_clip

        oc = open_clip.__version__
    except Exception:  # pragma: no cover - open_clip missing
        oc = "absent"
    return {
        "ltclip": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": oc,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }


__all__ = ["DataConfig", "EvalConfig", "ExtractConfig", "TrainHeadConfig", "load_config_file", "provenance", "to_dict", "from_dict"]
