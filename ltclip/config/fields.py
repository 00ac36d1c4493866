"""How a config field declares its command-line option: once, beside its default.

A field made with :func:`option` carries the option's help text, its flag (``--name`` from the
field's name unless given), a short alias, and where its choices are registered; the commands of
``ltclip.cli`` are generated from these fields, so an option is declared in exactly one place::

    @dataclass(frozen=True)
    class OptimConfig:
        lr: float = option(1e-3, "Peak learning rate.")
        schedule: str = option("cosine", "Learning-rate schedule per step.", choices="schedules")
        momentum: float = option(0.9, "SGD momentum.", minimum=0, below=1)

A numeric field states its valid range there too (``minimum``/``maximum`` inclusive, ``above``/``below``
exclusive), a field of fixed values the set (``one_of=TEST_VIEWS``); :func:`check_values` refuses a
built config with a value outside them, or a non-finite number in any numeric field, naming the flag:
``--momentum 5: must be in [0, 1)``, ``--test-views 'five': choose one of center, flip, fivecrop, tencrop``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass

from ..core.errors import LtclipError
from .values import SELECT_LAST, SUMMARY_KEYS


@dataclass(frozen=True)
class OptionSpec:
    """What the command line shows of a config field; see :func:`option`."""

    help: str
    flag: str | None = None  # e.g. "--from" for the field from_run; default: "--" + name with dashes
    short: str | None = None  # e.g. "-o"
    choices: str | None = None  # registry kind whose names are the valid values (`ltclip list KIND`)
    choices_of: str | None = None  # for a ``key=value`` options field: the field naming the entry they belong to
    default_text: str | None = None  # what --help says the default is, where the value is not it (None: the value)
    minimum: float | None = None  # the smallest valid value (inclusive)
    maximum: float | None = None  # the largest valid value (inclusive)
    above: float | None = None  # every valid value is larger (exclusive minimum)
    below: float | None = None  # every valid value is smaller (exclusive maximum)
    input: str | None = None  # what the value names, which must exist: one of INPUT_KINDS
    one_of: tuple[str, ...] | None = None  # the values it takes (a set of ltclip.config.values)

    def flag_of(self, name: str) -> str:
        return self.flag or "--" + name.replace("_", "-")

    def range_text(self) -> str | None:
        """The valid range as the error says it: ``>= 1``, ``> 0``, ``in [0, 1)``; None: any finite number."""
        low = (f"[{_number(self.minimum)}" if self.minimum is not None else f"({_number(self.above)}"
               if self.above is not None else None)
        high = (f"{_number(self.maximum)}]" if self.maximum is not None else f"{_number(self.below)})"
                if self.below is not None else None)
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"{'>=' if low[0] == '[' else '>'} {low[1:]}"
        if high:
            return f"{'<=' if high[-1] == ']' else '<'} {high[:-1]}"
        return None

    def holds(self, value: float) -> bool:
        return ((self.minimum is None or value >= self.minimum) and (self.maximum is None or value <= self.maximum)
                and (self.above is None or value > self.above) and (self.below is None or value < self.below))


# What an input option names (checked before a stage loads: ltclip.cli.precheck): a folder, the data
# root (a folder unless --download fills it), a file, a file found as given or in the manifest folder
# or the data root, a feature cache, a finished run, or open_clip weights (a tag, or a checkpoint file
# when the value looks like a path).
INPUT_KINDS = ("folder", "data-root", "file", "data-file", "cache", "run", "weights")

REQUIRED = dataclasses.MISSING  # the default of an option every config of its class must be given


def option(default, help: str, **spec):
    """A dataclass field with a default and its command-line :class:`OptionSpec` (``help``, ``flag``, ...)."""
    if spec.get("input") not in (None, *INPUT_KINDS):
        raise ValueError(f"input={spec['input']!r}: not one of {', '.join(INPUT_KINDS)}")
    return dataclasses.field(default=default, metadata={"option": OptionSpec(help, **spec)})


def option_spec(field: dataclasses.Field) -> OptionSpec | None:
    return field.metadata.get("option")


def option_fields(cls) -> dict:
    """Every option of config class ``cls``, sections flattened: name → (field, its :class:`OptionSpec`)."""
    out = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default):
            out.update(option_fields(type(f.default)))
        elif option_spec(f) is not None:
            out[f.name] = (f, option_spec(f))
    return out


def flags_of(cls) -> dict[str, str]:
    """Every option of config class ``cls`` (sections flattened) → its flag."""
    return {name: spec.flag_of(name) for name, (_, spec) in option_fields(cls).items()}


def numeric_fields(cls) -> dict[str, tuple[type, OptionSpec]]:
    """Every int or float option of config class ``cls`` (sections flattened) → (int or float, its spec)."""
    out = {}
    for name, (f, spec) in option_fields(cls).items():
        owner = next(c for c in _classes(cls) if f in dataclasses.fields(c))
        kind = _number_type(typing.get_type_hints(owner)[f.name])
        if kind is not None:
            out[name] = (kind, spec)
    return out


def check_values(cfg) -> None:
    """Refuse config ``cfg`` (sections included) where a numeric option is not a finite number of its
    type inside the range its field declares: one line naming the flag and the valid range."""
    values = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        values.update({g.name: getattr(value, g.name) for g in dataclasses.fields(value)}
                      if dataclasses.is_dataclass(value) else {f.name: value})
    for name, (kind, spec) in numeric_fields(type(cfg)).items():
        check_number(name, kind, spec, values[name])
    for name, (_, spec) in option_fields(type(cfg)).items():
        check_one_of(name, spec, values[name])


def takes(one_of: tuple[str, ...], value: str) -> bool:
    """``value`` is one of the set ``one_of``, where an entry ``name:N`` stands for name:0, name:1, ..."""
    head, colon, index = str(value).partition(":")
    if colon:
        return index.isdigit() and f"{head}:N" in one_of
    return value in one_of


def check_one_of(name: str, spec: OptionSpec, value) -> None:
    """``value`` of option ``name`` (None: not set) is one of the values its field declares."""
    if spec.one_of is not None and value is not None and not takes(spec.one_of, value):
        raise LtclipError(f"{spec.flag_of(name)} {value!r}: choose one of {', '.join(spec.one_of)}")


def check_select(select: str | None, metrics=SUMMARY_KEYS) -> None:
    """``--select`` names one of the validation ``metrics`` (the summary's, on the command line) or
    ``last``; None (validation only logged) passes. The field declares no set: the engine, called from
    Python, selects on a caller's own metrics too."""
    if select is not None and select != SELECT_LAST and select not in metrics:
        raise LtclipError(f"--select {select!r}: choose one of {', '.join((*metrics, SELECT_LAST))}")


def check_number(name: str, kind: type, spec: OptionSpec, value) -> None:
    """``value`` of numeric option ``name`` (None: not set) is a finite ``kind`` (int or float) in the
    range ``spec`` declares; else a one-line error naming the flag and the range."""
    if value is None:
        return
    shown = f"{spec.flag_of(name)} {_number(value) if isinstance(value, float) else value}"
    wanted = "an integer" if kind is int else "a finite number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            kind is int and value != int(value)):
        raise LtclipError(f"{shown}: must be {wanted}" + (f" {spec.range_text()}" if spec.range_text() else ""))
    if not spec.holds(value):
        raise LtclipError(f"{shown}: must be {'an integer ' if kind is int else ''}{spec.range_text()}")


def _classes(cls) -> list[type]:
    """``cls`` and its sections' classes."""
    return [cls, *(type(f.default) for f in dataclasses.fields(cls) if dataclasses.is_dataclass(f.default))]


def _number_type(annotation) -> type | None:
    """int or float for ``int``, ``float | None`` and the like; None for every other type."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return args[0] if len(args) == 1 and args[0] in (int, float) else None


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


class Options(Mapping):
    """A method's parsed options (``--loss-opt gamma=0.5`` → ``{"gamma": 0.5}``): an immutable,
    hashable mapping, typed like the method's defaults when its config was built."""

    def __init__(self, items=()):
        self._items = dict(items)

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._items.items())))

    def __repr__(self) -> str:
        return f"Options({self._items!r})"
