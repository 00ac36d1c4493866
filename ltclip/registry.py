"""Name → callable registries (losses, heads, samplers, two-stage methods), timm-style."""

from __future__ import annotations

import difflib
import inspect
import fnmatch
from typing import Callable, Generic, TypeVar

from .errors import LtclipError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of factories; the CLI reads its choices from here."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise LtclipError(
                f"unknown {self.kind} {name!r}{hint}; choose one of: {', '.join(sorted(self._entries))}"
            ) from None

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._entries


def keyword_defaults(fn, exclude: tuple[str, ...] = ()) -> dict:
    """``fn``'s keyword-only parameters and their defaults: a method's options, read from its signature."""
    params = inspect.signature(fn).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in exclude}


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _convert(text: str, default):
    """``text`` as the type of ``default`` (bool accepts true/false, yes/no, on/off, 1/0; a tuple
    takes comma-separated numbers)."""
    if isinstance(default, tuple):
        return tuple(float(v) for v in text.split(","))
    if isinstance(default, bool):
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(text)
    return type(default)(text)


def parse_options(flag: str, owner: str, defaults: dict, opts) -> dict:
    """Parse ``["key=value", ...]`` (the values of option ``flag``) against ``owner``'s ``defaults``.

    Each value is converted to its default's type (bool, int, float or str); a malformed pair, an
    unknown key or an unconvertible value raises a one-line LtclipError naming the valid keys.
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
