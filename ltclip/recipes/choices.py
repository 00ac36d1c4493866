"""Options whose values are registered names (``--head``, ``--loss``, ...), checked.

An option's field names its registry kind (``OptionSpec.choices``); a value is checked against the
catalog of registered names (:mod:`.catalog`), which needs no torch.
"""

from __future__ import annotations

import difflib

from ..core.errors import LtclipError
from ..config import option_fields
from .catalog import names as registered


def check_choice(option: str, kind: str, value: str | None) -> None:
    """``value`` must be a registered name of ``kind``: else a one-line error naming ``option``."""
    names = registered(kind)
    if value is not None and value not in names:
        close = difflib.get_close_matches(value, names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise LtclipError(f"{option} {value!r}: unknown{hint}; choose one of {', '.join(names)} (`ltclip list {kind}`)")


def check_choices(cls, values: dict) -> None:
    """Every value in ``values`` of an option of config class ``cls`` that names a registered entry is one."""
    for name, (field, spec) in option_fields(cls).items():
        if spec.choices and values.get(name) is not None:
            check_choice(spec.flag or "--" + name.replace("_", "-"), spec.choices, values[name])
