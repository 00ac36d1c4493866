"""What a command line gives, checked before any stage (and torch) loads, so a mistake answers at once.

Each given value is checked as its config field declares (:func:`~ltclip.config.option`): a number
against its range, a fixed value against its set, a registered name against the catalog (``ltclip list``), and a path against
what it names (``input=KIND``, :data:`~ltclip.config.fields.INPUT_KINDS`): one line naming the flag.
The configs are checked again, whole, when they are built, and the stages check their inputs more
deeply when they read them (a cache's splits, a run's files); this is the mistyped option, at once.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..artifacts.workspace import RUN_FILE
from ..config import DataConfig
from ..config.fields import check_number, check_one_of, check_select, numeric_fields, option_fields
from ..core.errors import LtclipError
from ..core.registry import parse_options
from ..recipes import load_recipe
from ..recipes.catalog import option_defaults
from ..recipes.choices import check_choices

# Suffixes that make a --pretrained value a checkpoint file rather than an open_clip tag.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")

# The recipe table ([STAGE]) whose method choices apply to a config class's method options.
RECIPE_STAGES = {"TrainHeadConfig": "train-head", "FinetuneConfig": "finetune"}


def check_given(values: dict, *classes) -> None:
    """Every value given in ``values`` (flat option values; None: not given) for an option of config
    classes ``classes``: its number range or set of values, its registered name, the input it names."""
    check_select(values.get("select"))  # the commands validate with the summary's metrics
    for cls in classes:
        for name, (kind, spec) in numeric_fields(cls).items():
            check_number(name, kind, spec, values.get(name))
        check_choices(cls, values)
        fields = option_fields(cls)
        for name, (_, spec) in fields.items():
            check_one_of(name, spec, values.get(name))
            if spec.input and values.get(name) is not None:
                check_input(spec.input, spec.flag_of(name), str(values[name]), values)
            entry = _method_named(cls, values, spec.choices_of) if spec.choices_of else None
            if entry is not None and isinstance(values.get(name), (list, tuple)):
                parse_options(spec.flag_of(name), *option_defaults(fields[spec.choices_of][1].choices, entry), values[name])


def check_input(kind: str, label: str, value: str, values: dict | None = None) -> None:
    """``value`` (shown as ``label value``) names an existing input of ``kind``; ``values`` are the
    other options given (a data file is looked up in ``--manifest-dir`` and ``--data-root``)."""
    values = values or {}
    path = Path(value)
    shown = f"{label} {value}" if label else value
    if kind == "data-root" and not path.is_dir() and not values.get("download"):
        raise LtclipError(f"{shown}: folder not found")
    if kind == "folder" and not path.is_dir():
        raise LtclipError(f"{shown}: folder not found")
    if kind == "file" and not path.is_file():
        raise LtclipError(f"{shown}: file not found")
    if kind == "data-file" and not any(p.is_file() for p in _data_file_places(path, values)):
        where = ", ".join(str(d) for d in _data_dirs(values))
        raise LtclipError(f"{shown}: file not found (looked in {where}); check the name, or --manifest-dir / --data-root")
    if kind == "cache" and not path.is_dir():
        raise LtclipError(f"{shown}: no such cache folder; make one with `ltclip extract`")
    if kind == "run":
        if not path.is_dir():
            raise LtclipError(f"{shown}: no such run folder; name a folder from `ltclip train-head` or `ltclip finetune`")
        if not (path / RUN_FILE).is_file():
            raise LtclipError(f"{shown}: not a finished run ({RUN_FILE} missing); finish it (--resume) or name a finished one")
    if kind == "weights" and _looks_like_a_file(value) and not path.is_file():
        raise LtclipError(f"{shown}: checkpoint file not found; give a file, an open_clip tag (e.g. openai) or none")


def _method_named(cls, values: dict, name: str) -> str | None:
    """The method whose ``key=value`` options are given: named on the command line, chosen by the
    ``--recipe`` for this stage, or the default of ``cls``; None where only a later layer knows it (a
    recipe that chooses it per dataset)."""
    if values.get(name) is not None:
        return values[name]
    if values.get("recipe") is not None:
        stage = RECIPE_STAGES.get(cls.__name__)
        recipe = load_recipe(values["recipe"])
        if stage not in recipe.stages or any(name in table for table in recipe.datasets[stage].values()):
            return None
        if name in recipe.stages[stage]:
            return recipe.stages[stage][name]
    return option_fields(cls)[name][0].default


def _data_dirs(values: dict) -> list[Path]:
    """Where a dataset's split and class-name files are looked for: the manifest folder, the data root."""
    manifest = values.get("manifest_dir")
    return [*([Path(manifest)] if manifest else []), Path(values.get("data_root") or DataConfig.data_root)]


def _data_file_places(path: Path, values: dict) -> list[Path]:
    return [path, *(d / path for d in _data_dirs(values))]


def _looks_like_a_file(value: str) -> bool:
    return os.sep in value or "/" in value or value.lower().endswith(CHECKPOINT_SUFFIXES)
