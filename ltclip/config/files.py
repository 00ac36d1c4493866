"""Configs to and from option values and files: build a stage config from flat option values
(refusing any the stage does not take), flatten a saved config, read ``--config`` files."""

from __future__ import annotations

import dataclasses
import platform
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from .. import __version__
from ..core.errors import LtclipError
from .fields import Options, check_values, flags_of, option_fields
from .sections import EvalConfig, ExtractConfig, FinetuneConfig, SecondStageConfig, TrainHeadConfig

def flag(name: str, cls=None) -> str:
    """The command-line flag of option ``name`` of config class ``cls`` (``lr`` → ``--lr``; ``from_run``
    → ``--from``); without ``cls``, the flag of the training commands (train-head, finetune)."""
    flags = flags_of(cls) if cls is not None else _TRAINING_FLAGS
    return flags.get(name) or "--" + name.replace("_", "-")


_CONFIGS = (ExtractConfig, TrainHeadConfig, SecondStageConfig, FinetuneConfig, EvalConfig)
_TRAINING_FLAGS = {**flags_of(FinetuneConfig), **flags_of(SecondStageConfig), **flags_of(TrainHeadConfig)}
# The names of config sections (``optim``, ``method``, ...) and of the method-options fields.
_SECTIONS = {f.name for cls in _CONFIGS for f in dataclasses.fields(cls) if dataclasses.is_dataclass(f.default)}
_OPTIONS_FIELDS = {name for cls in _CONFIGS for name, (_, spec) in option_fields(cls).items() if spec.choices_of}


def _sections(cls) -> dict[str, type]:
    """The fields of ``cls`` that are themselves config sections."""
    return {f.name: type(f.default) for f in dataclasses.fields(cls) if dataclasses.is_dataclass(f.default)}


def option_names(cls) -> set[str]:
    """Every option a config of ``cls`` takes, sections flattened (the CLI's parameter names)."""
    names = set()
    for f in dataclasses.fields(cls):
        names |= {g.name for g in dataclasses.fields(f.default)} if dataclasses.is_dataclass(f.default) else {f.name}
    return names


def from_flat(cls, values: dict, *, owner: str):
    """Build ``cls`` from flat option values (None: not given, the default applies).

    An option ``cls`` does not take is refused with a one-line error naming it and ``owner``, a value
    outside its field's range with one naming its flag (:func:`~.fields.check_values`).
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
        cfg = cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise LtclipError(f"{owner}: {err}") from None
    check_values(cfg)
    return cfg


def _typed(cls, values: dict) -> dict:
    """Lists (from JSON/TOML) as the tuples the frozen configs hold; a method's parsed options
    (a mapping) as :class:`Options`. Unparsed ``key=value`` options are refused: they are parsed
    against their method when a config is resolved (:mod:`ltclip.recipes.resolve`)."""
    out = {}
    for k, v in values.items():
        if isinstance(v, Mapping):
            v = Options({key: tuple(x) if isinstance(x, list) else x for key, x in v.items()})
        elif k in _OPTIONS_FIELDS and isinstance(v, (list, tuple)):
            if v:
                raise LtclipError(f"{flag(k)} {' '.join(map(str, v))}: not parsed against its method; build the config "
                                  "with ltclip.recipes.resolve")
            v = Options()
        elif isinstance(v, list):
            v = tuple(v)
        out[k] = v
    return out


def flatten(data: dict) -> dict:
    """A saved config (nested sections; ``extract.json`` wraps it in ``config``) as flat option values."""
    if "config" in data and isinstance(data["config"], dict):
        data = data["config"]
    flat = {}
    for key, value in data.items():
        if key in _SECTIONS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    if "no_decay_1d" in flat:  # its name before boolean options were named positively
        flat["decay_1d"] = not flat.pop("no_decay_1d")
    return flat


def to_dict(cfg) -> dict:
    """``cfg`` as plain JSON-ready data: sections as nested dicts, method options as dicts."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value):
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def from_dict(cls, data: dict):
    """Rebuild a config saved with :func:`to_dict`, refusing unknown keys."""
    return from_flat(cls, flatten(data), owner=cls.__name__)


def load_config_file(path: str | Path) -> dict:
    """Read a TOML, YAML or JSON config file into flat option values (for ``--config``)."""
    path = Path(path)
    if not path.is_file():
        raise LtclipError(f"--config {path}: file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise LtclipError(f"--config {path}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    try:
        if path.suffix == ".toml":
            data = _toml().loads(text)
        else:
            import yaml  # YAML is a superset of JSON

            data = yaml.safe_load(text) or {}
    except Exception as err:  # parse errors of either format
        raise LtclipError(f"--config {_parse_error(path, err)}") from None
    if not isinstance(data, dict):
        raise LtclipError(f"--config {path}: expected a table of option = value")
    return {k.replace("-", "_"): as_arguments(v) if isinstance(v, Mapping) else v for k, v in flatten(data).items()}


def _parse_error(path: Path, err: Exception) -> str:
    """``FILE:LINE:COLUMN: cannot parse (the problem)`` on one line, where the parser tells the position."""
    mark = getattr(err, "problem_mark", None)  # YAML's (0-based)
    at = re.search(r" \(at line (\d+), column (\d+)\)$", str(err))  # TOML's
    where = (f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else f"{path}:{at[1]}:{at[2]}" if at
             else str(path))
    problem = getattr(err, "problem", None) or (str(err)[:at.start()] if at else str(err))
    return " ".join(f"{where}: cannot parse ({problem})".split())


def as_arguments(options: Mapping) -> list[str]:
    """A method's options as the command line gives them: ``{"gamma": 0.5}`` → ``["gamma=0.5"]``
    (a tuple as comma-separated numbers)."""
    return [f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in options.items()]


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


__all__ = ["flatten", "from_dict", "from_flat", "load_config_file", "option_names", "provenance", "to_dict"]
