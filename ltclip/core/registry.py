"""Name → entry registries (losses, heads, samplers, two-stage methods), timm-style.

One :class:`Registry` per kind of method. An entry is a function or class registered under a name;
its **options** are the keyword-only parameters (with defaults) of ``signature(entry)`` — the entry
itself unless the registry says otherwise — minus the registry's ``exclude`` names. The registry
lists entries, reads and parses their options (``--loss-opt key=value``), refuses unknown ones with
one-line errors naming the CLI flag, and builds entries by name. Keyword arguments of ``register``
are the entry's metadata, kept by the registry for its users (``meta``)::

    LOSSES = Registry("loss", flag="--loss-opt", exclude=("epoch", "total_epochs"))

    @LOSSES.register("focal")
    def focal(logits, targets, class_counts, *, epoch=0, total_epochs=1, gamma=2.0):
        '''Focal loss ...'''

    LOSSES.options("focal")                # {"gamma": 2.0}
    LOSSES.parse("focal", ["gamma=0.5"])   # {"gamma": 0.5}
    LOSSES.create("focal", z, y, counts, gamma=0.5)
    LOSSES.meta("focal", "softmax_offset")  # None: registered without it
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from typing import Callable, Generic, Sequence, TypeVar

from .errors import LtclipError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of functions or classes; the CLI reads its choices and options from here.

    ``kind`` names the collection in messages ("loss", "head", ...); ``flag`` is the CLI option that
    carries the entries' ``key=value`` options (``"--loss-opt"``), named in every option error
    (``"<kind> option"`` when there is no such flag); ``signature(entry)`` is the callable whose
    keyword-only parameters are the entry's options (default: the entry itself, i.e. a class's
    ``__init__``); ``exclude`` lists keyword-only names that are not options (a loss's ``epoch``, a
    sampler's ``seed``): :meth:`options` and :meth:`parse` leave them out, :meth:`check` lets them
    through since they are valid keywords of every entry.
    """

    def __init__(
        self,
        kind: str,
        *,
        flag: str | None = None,
        signature: Callable[[T], Callable] | None = None,
        exclude: tuple[str, ...] = (),
    ):
        self.kind = kind
        self.flag = flag
        self.exclude = tuple(exclude)
        self._signature = signature
        self._entries: dict[str, T] = {}
        self._meta: dict[str, dict] = {}

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"

    @property
    def _label(self) -> str:
        return self.flag or f"{self.kind} option"

    # ------------------------------------------------------------ entries

    def register(self, name: str, **meta) -> Callable[[T], T]:
        """Decorator registering a function or class as ``name`` (and setting its ``name`` attribute);
        keyword arguments are the entry's metadata (:meth:`meta`), kept by the registry rather than set
        on the entry, so a subclass never inherits its base class's."""

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            if inspect.isclass(obj) or inspect.isfunction(obj):
                obj.name = name
            self._entries[name] = obj
            self._meta[name] = meta
            return obj

        return decorator

    def meta(self, name: str, key: str, default=None):
        """Metadata ``key`` that entry ``name`` was registered with (``default`` when it was not)."""
        self.get(name)
        return self._meta[name].get(key, default)

    def get(self, name: str) -> T:
        """The entry registered as ``name``; LtclipError with close matches otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), self._entries, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise LtclipError(
                f"unknown {self.kind} {name!r}{hint}; choose one of: {', '.join(sorted(self._entries))}"
            ) from None

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching a glob ``pattern``."""
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def summary(self, name: str) -> str:
        """The first line of the entry's own docstring ("" when it has none)."""
        doc = self.get(name).__doc__  # a class's own docstring, never its base class's
        lines = inspect.cleandoc(doc).strip().splitlines() if doc else []
        return lines[0].strip() if lines else ""

    # ------------------------------------------------------------ options

    def options(self, name: str) -> dict:
        """Entry ``name``'s options and their defaults (option → default), in signature order."""
        entry = self.get(name)
        fn = self._signature(entry) if self._signature is not None else entry
        return keyword_defaults(fn, exclude=self.exclude)

    def parse(self, name: str, opts: Sequence[str]) -> dict:
        """Parse ``["key=value", ...]`` into options of ``name``, typed like their defaults."""
        return parse_options(self._label, f"{self.kind} {name!r}", self.options(name), opts)

    def check(self, name: str, params: dict) -> None:
        """Refuse keys of ``params`` that are neither options of ``name`` nor excluded keywords."""
        defaults = self.options(name)
        unknown = [k for k in params if k not in defaults and k not in self.exclude]
        if unknown:
            what = "not an option" if len(unknown) == 1 else "not options"
            raise LtclipError(
                f"{self._label} {', '.join(unknown)}: {what} of {self.kind} {name!r}; "
                f"valid keys: {', '.join(defaults) or 'none'}"
            )

    def create(self, name: str, *args, **params):
        """``get(name)(*args, **params)`` after :meth:`check` has vetted ``params``."""
        entry = self.get(name)
        self.check(name, params)
        return entry(*args, **params)


def keyword_defaults(fn, exclude: tuple[str, ...] = ()) -> dict:
    """``fn``'s keyword-only parameters and their defaults: a method's options, read from its signature."""
    params = inspect.signature(fn).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in exclude}


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _convert(text: str, default):
    """``text`` as the type of ``default`` (bool accepts true/false, yes/no, on/off, 1/0; a tuple
    takes comma-separated numbers; a word default such as ``auto`` or ``all`` also takes an integer)."""
    if isinstance(default, str) and text.lstrip("-").isdigit():
        return int(text)
    if isinstance(default, tuple):
        return tuple(float(v) for v in text.split(","))
    if isinstance(default, bool):
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(text)
    return type(default)(text)


def parse_options(flag: str, owner: str, defaults: dict, opts) -> dict:
    """Parse ``["key=value", ...]`` (the values of option ``flag``) against ``owner``'s ``defaults``.

    Each value is converted to its default's type (bool, int, float, str, or a tuple of floats);
    a malformed pair, an unknown key or an unconvertible value raises a one-line LtclipError
    naming the valid keys. :meth:`Registry.parse` is the public way in.
    """
    valid = ", ".join(defaults) or "none"
    parsed = {}
    for opt in opts:
        key, sep, text = opt.partition("=")
        key, text = key.strip(), text.strip()
        if not sep:
            raise LtclipError(f"{flag} {opt!r} must look like key=value; keys for {owner}: {valid}")
        if key not in defaults:
            raise LtclipError(f"{flag} {key!r} is not an option of {owner}; valid keys: {valid}")
        try:
            parsed[key] = _convert(text, defaults[key])
        except ValueError:
            raise LtclipError(
                f"{flag} {key}={text!r}: expected {type(defaults[key]).__name__} (default {defaults[key]!r})"
            ) from None
    return parsed
