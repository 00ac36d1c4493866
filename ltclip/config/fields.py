"""How a config field declares its command-line option: once, beside its default.

A field made with :func:`option` carries the option's help text, its flag (``--name`` from the
field's name unless given), a short alias, and where its choices are registered; the commands of
``ltclip.cli`` are generated from these fields, so an option is declared in exactly one place::

    @dataclass(frozen=True)
    class OptimConfig:
        lr: float = option(1e-3, "Peak learning rate.")
        schedule: str = option("cosine", "Learning-rate schedule per step.", choices="schedules")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class OptionSpec:
    """What the command line shows of a config field; see :func:`option`."""

    help: str
    flag: str | None = None  # e.g. "--from" for the field from_run; default: "--" + name with dashes
    short: str | None = None  # e.g. "-o"
    choices: str | None = None  # registry kind whose names are the valid values (`ltclip list KIND`)
    choices_of: str | None = None  # for a ``key=value`` options field: the field naming the entry they belong to
    default_text: str | None = None  # what --help says the default is, where the value is not it (None: the value)


REQUIRED = dataclasses.MISSING  # the default of an option every config of its class must be given


def option(default, help: str, **spec):
    """A dataclass field with a default and its command-line :class:`OptionSpec` (``help``, ``flag``, ...)."""
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
    return {name: spec.flag or "--" + name.replace("_", "-") for name, (_, spec) in option_fields(cls).items()}


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
