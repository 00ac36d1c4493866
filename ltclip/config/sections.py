"""Stage configs: frozen dataclasses that the CLI builds, a stage consumes and a run saves.

Each stage's config is composed of shared sections (``DataConfig``, ``OptimConfig``,
``MethodConfig``); every default is written once, here. The CLI's options carry the same names
as the fields, so a saved config (``config.json``, ``extract.json``) reruns its stage with
``--config``: :func:`flatten` turns a nested config into option values and :func:`from_flat` builds
a config from them, refusing any option the stage does not use.
"""

from __future__ import annotations

import dataclasses
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .core.errors import LtclipError


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
    subset_seed: int = 0  # which images CIFAR-100-LT keeps

    def split_files(self) -> dict[str, str]:
        lists = {"train": self.train_list, "val": self.val_list, "test": self.test_list}
        return {k: v for k, v in lists.items() if v}


@dataclass(frozen=True)
class OptimConfig:
    """How a model is optimised (the engine's settings); ``batch_size`` rows make one optimizer step."""

    epochs: int = 10
    steps: int | None = None  # total optimizer steps instead of epochs
    batch_size: int = 256
    accum: int = 1  # micro-batches per optimizer step
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = False
    no_decay_1d: bool = False  # no weight decay on biases, norms and other 1-D parameters
    schedule: str = "cosine"
    warmup: float = 0.0  # epochs of linear warm-up
    warmup_steps: int | None = None  # optimizer steps of linear warm-up instead of ``warmup`` epochs
    grad_clip: float = 0.0
    precision: str = "fp32"
    seed: int = 0
    eval_every: int = 0  # steps between validations besides each epoch's end (0: epoch ends only)
    checkpoint_every: int = 0  # steps between checkpoints besides each epoch's end
    select: str = "balanced_accuracy"  # validation metric that picks the kept weights


# A second stage retrains a small layer on fixed features: SGD with a large step, as in Kang et al.
SECOND_STAGE_OPTIM = OptimConfig(optimizer="sgd", lr=0.1, weight_decay=5e-4, batch_size=512)


# Fine-tuning an encoder: AdamW with warm-up, no decay on biases, norms and prompt tokens.
FINETUNE_OPTIM = OptimConfig(batch_size=128, warmup=1.0, no_decay_1d=True)


@dataclass(frozen=True)
class TuningConfig:
    """What of the image encoder trains (``ltclip list tuning``) and how."""

    tune: str = "frozen"
    tune_opts: tuple[str, ...] = ()
    backbone_lr: float | None = None  # the encoder's peak lr; None: --lr
    grad_checkpointing: bool = False


@dataclass(frozen=True)
class MethodConfig:
    """What is trained: the head, the loss, the sampler and their options (``key=value`` strings)."""

    head: str = "decoder"
    head_opts: tuple[str, ...] = ()
    loss: str = "ce"
    loss_opts: tuple[str, ...] = ()
    sampler: str = "instance"


@dataclass(frozen=True)
class ExtractConfig:
    out: str
    data: DataConfig = DataConfig()
    splits: tuple[str, ...] = ()  # empty: every split the dataset has
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    preprocess_from: str | None = None
    tokens: bool = True
    batch_size: int = 256
    workers: int | None = None  # DataLoader decode workers; None: this process's share of the CPUs, at most 8
    device: str = "auto"
    precision: str = "fp32"
    test_views: str = "center"
    train_views: int = 0
    bad_images: str = "fail"
    block_size: int = 1024
    seed: int = 0  # of the train views
    from_run: str | None = None  # a finetuned run whose encoder extracts (instead of model/pretrained alone)
    token_pool: int = 1  # k x k average pooling of the patch tokens (CLS kept); 1: none
    token_dtype: str = "float16"  # float16, int8 or fp8 (e4m3)
    token_scale: str | None = None  # int8/fp8: "token" (default) or "channel"
    token_pca: int = 0  # stored token width after PCA (0: the model's width)
    token_pca_sample: int = 1024  # train images whose tokens fit the PCA basis


@dataclass(frozen=True)
class TrainHeadConfig:
    """Stage 1: a head trained on a feature cache."""

    features: str
    out: str
    method: MethodConfig = MethodConfig()
    optim: OptimConfig = OptimConfig()
    val_split: str = "val"
    max_ram: str | None = None
    read_blocks: int = 0  # rows per contiguous block of a block-shuffled read order (0: the sampler's order)
    shuffle_pool: int | None = None  # blocks shuffled together in that order (None: 16)
    posthoc_la: bool = False
    device: str = "auto"
    tensorboard: bool = False


@dataclass(frozen=True)
class SecondStageConfig:
    """A second stage on a finished stage-1 run; ``sampler``/``loss`` None mean the method's own."""

    from_run: str
    out: str
    two_stage: str | None = None
    two_stage_opts: tuple[str, ...] = ()
    sampler: str | None = None
    loss: str | None = None
    loss_opts: tuple[str, ...] = ()
    optim: OptimConfig = SECOND_STAGE_OPTIM
    features: str | None = None  # the first stage's cache unless given (must be the same)
    val_split: str = "val"
    max_ram: str | None = None
    posthoc_la: bool = False
    device: str = "auto"
    tensorboard: bool = False


@dataclass(frozen=True)
class FinetuneConfig:
    """End-to-end training on images: an open_clip encoder (tuned as ``tuning`` says) and a head."""

    out: str
    data: DataConfig = DataConfig()
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    preprocess_from: str | None = None
    tuning: TuningConfig = TuningConfig()
    method: MethodConfig = MethodConfig()
    optim: OptimConfig = FINETUNE_OPTIM
    augment: bool = True  # RandomResizedCrop + horizontal flip at every step
    normalize: str = "model"  # the model's own mean/std, or "imagenet" (the seed code's)
    workers: int | None = None
    val_split: str = "val"
    device: str = "auto"
    tensorboard: bool = False


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
    data_root: str | None = None  # images of a finetuned run (default: the run's own data root)
    test_views: str = "center"  # views of each image for a finetuned run: center, flip, fivecrop, tencrop
    workers: int | None = None
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


def _sections(cls) -> dict[str, type]:
    """The fields of ``cls`` that are themselves config sections."""
    return {f.name: type(f.default) for f in dataclasses.fields(cls) if dataclasses.is_dataclass(f.default)}


def option_names(cls) -> set[str]:
    """Every option a config of ``cls`` takes, sections flattened (the CLI's parameter names)."""
    names = set()
    for f in dataclasses.fields(cls):
        names |= {g.name for g in dataclasses.fields(f.default)} if dataclasses.is_dataclass(f.default) else {f.name}
    return names


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def from_flat(cls, values: dict, *, owner: str):
    """Build ``cls`` from flat option values (None: not given, the default applies).

    An option ``cls`` does not take is refused with a one-line error naming it and ``owner``.
    """
    given = {k: v for k, v in values.items() if v is not None}
    unknown = sorted(set(given) - option_names(cls))
    if unknown:
        raise LtclipError(f"{', '.join(flag(k) for k in unknown)}: not an option of {owner}; drop it")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in _sections(cls):
            sub = {g.name: given[g.name] for g in dataclasses.fields(f.default) if g.name in given}
            kwargs[f.name] = dataclasses.replace(f.default, **_typed(type(f.default), sub))
        elif f.name in given:
            kwargs[f.name] = _typed(cls, {f.name: given[f.name]})[f.name]
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise LtclipError(f"{owner}: {err}") from None


def _typed(cls, values: dict) -> dict:
    """Lists (from JSON/TOML) as the tuples the frozen configs hold."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def flatten(data: dict) -> dict:
    """A saved config (nested sections; ``extract.json`` wraps it in ``config``) as flat option values."""
    if "config" in data and isinstance(data["config"], dict):
        data = data["config"]
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict):
    """Rebuild a config saved with :func:`to_dict`, refusing unknown keys."""
    return from_flat(cls, flatten(data), owner=cls.__name__)


def load_config_file(path: str | Path) -> dict:
    """Read a TOML, YAML or JSON config file into flat option values (for ``--config``)."""
    path = Path(path)
    if not path.is_file():
        raise LtclipError(f"--config {path}: file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data = _toml().loads(text)
        else:
            import yaml  # YAML is a superset of JSON

            data = yaml.safe_load(text) or {}
    except Exception as err:  # parse errors of either format
        raise LtclipError(f"--config {path}: cannot parse ({err})".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise LtclipError(f"--config {path}: expected a table of option = value")
    return {k.replace("-", "_"): v for k, v in flatten(data).items()}


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


__all__ = [
    "DataConfig", "EvalConfig", "ExtractConfig", "FINETUNE_OPTIM", "FinetuneConfig", "MethodConfig", "OptimConfig",
    "SECOND_STAGE_OPTIM", "SecondStageConfig", "TrainHeadConfig", "TuningConfig", "flatten", "from_dict", "from_flat", "load_config_file", "option_names", "provenance", "to_dict",
]
