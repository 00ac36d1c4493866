"""The registries whose names are the valid values of options (``--head``, ``--loss``, ...).

An option's field names its registry kind (``OptionSpec.choices``); :func:`registry` imports that
registry when a value must be checked or listed (so ``--help`` needs no torch).
"""

from __future__ import annotations

import difflib

from ..core.errors import LtclipError
from ..config import option_fields

KINDS = ("losses", "heads", "samplers", "two-stage", "schedules", "tuning")


def registry(kind: str):
    """The :class:`~ltclip.core.registry.Registry` of ``kind`` (one of :data:`KINDS`)."""
    if kind == "losses":
        from ..methods.losses import LOSSES as found
    elif kind == "heads":
        from ..models.heads import HEADS as found
    elif kind == "samplers":
        from ..data.samplers import SAMPLERS as found
    elif kind == "two-stage":
        from ..methods.second_stage import TWO_STAGE as found
    elif kind == "schedules":
        from ..engine.optim import SCHEDULES as found
    elif kind == "tuning":
        from ..models.tuning import TUNING as found
    else:
        raise LtclipError(f"ltclip list {kind!r}: choose one of {', '.join(KINDS)}, recipes")
    return found


def check_choice(option: str, kind: str, value: str | None) -> None:
    """``value`` must be a registered name of ``kind``: else a one-line error naming ``option``."""
    names = registry(kind).names()
    if value is not None and value not in names:
        close = difflib.get_close_matches(value, names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise LtclipError(f"{option} {value!r}: unknown{hint}; choose one of {', '.join(names)} (`ltclip list {kind}`)")


def check_choices(cls, values: dict) -> None:
    """Every value in ``values`` of an option of config class ``cls`` that names a registered entry is one."""
    for name, (field, spec) in option_fields(cls).items():
        if spec.choices and values.get(name) is not None:
            check_choice(spec.flag or "--" + name.replace("_", "-"), spec.choices, values[name])
