"""Typer commands generated from config dataclasses: each option is declared once, on its field.

:func:`config_options` turns the fields of one or more configs (sections flattened) into Typer
parameters: the flag, short alias and help of the field's :class:`~ltclip.config.OptionSpec`, a
type read from the field's annotation, a positive ``--x/--no-x`` pair for booleans, a repeatable
option for ``key=value`` lists, and the default shown as the config's (every parameter itself
defaults to None: "not given", so the layers below an explicit option can choose).
:func:`command` makes a function with those parameters that Typer registers like a written one.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Mapping
from typing import Annotated, Callable, Optional

import typer

from ..config import option_spec
from ..core.errors import LtclipError

Param = inspect.Parameter


def config_options(*classes, skip: tuple[str, ...] = (), default_text: dict[str, str] | None = None,
                   second: tuple[str, object] | None = None) -> list[Param]:
    """Typer parameters of every option of ``classes`` (the first class's field wins a shared name).

    ``default_text[name]`` replaces the default shown for ``name``; ``second=(condition, cls)``
    appends the default of config class ``cls`` where it differs, as "with CONDITION: VALUE"
    (train-head's second stage: ``("--from", SecondStageConfig)``).
    """
    params: dict[str, Param] = {}
    other = _defaults(second[1]) if second else {}
    for cls in classes:
        for name, (field, owner, default) in _fields(cls).items():
            if name in params or name in skip:
                continue
            shown = (default_text or {}).get(name) or _shown(field, default)
            if second and name in other and other[name][1] != default:
                shown = "; ".join(filter(None, [shown, f"with {second[0]}: {_shown(other[name][0], other[name][1]) or 'none'}"]))
            params[name] = _parameter(name, field, typing.get_type_hints(owner)[field.name], shown)
    return list(params.values())


def extra(name: str, annotation, flags: tuple[str, ...], help: str, default=None, **info) -> Param:
    """A parameter that is not a config field (``--config``, ``--recipe``, ``--resume``, an argument)."""
    return Param(name, Param.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, typer.Option(*flags, help=help, **info)])


def argument(name: str, annotation, help: str, default=None) -> Param:
    return Param(name, Param.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, typer.Argument(help=help)])


def command(name: str, doc: str, params: list[Param], body: Callable[[dict], None]) -> Callable:
    """A function taking ``params`` (keywords) that calls ``body(values)``; Typer reads its signature."""

    def run(ctx: typer.Context, **values):
        _refuse_two_ways(ctx)
        return body(values)

    run.__name__ = run.__qualname__ = name.replace("-", "_")
    run.__doc__ = doc
    params = [Param("ctx", Param.KEYWORD_ONLY, annotation=typer.Context), *params]  # Typer passes its context
    run.__signature__ = inspect.Signature(params)
    run.__annotations__ = {p.name: p.annotation for p in params}
    return run


def _refuse_two_ways(ctx: typer.Context) -> None:
    """Refuse two options given on the command line that say one thing (``--epochs`` and ``--steps``,
    ``--warmup`` and ``--warmup-steps``). A ``--config`` file may hold both, as a saved config does
    (the steps win)."""
    from ..recipes.resolve import ALTERNATIVES

    opts = {p.name: p.opts[0] for p in ctx.command.params if p.opts}
    for pair in ALTERNATIVES:
        if all(k in opts and getattr(ctx.get_parameter_source(k), "name", None) == "COMMANDLINE" for k in pair):
            a, b = (f"{opts[k]} {ctx.params[k]:g}" if isinstance(ctx.params[k], float) else f"{opts[k]} {ctx.params[k]}" for k in pair)
            raise LtclipError(f"{a} and {b}: two ways to say one thing; give one of them")


def _fields(cls) -> dict[str, tuple[dataclasses.Field, type, object]]:
    """Option name → (field, the class declaring it, its default in ``cls``), sections flattened."""
    out = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default):
            section = f.default
            for g in dataclasses.fields(section):
                if option_spec(g) is not None:
                    out[g.name] = (g, type(section), getattr(section, g.name))
        elif option_spec(f) is not None:
            out[f.name] = (f, cls, f.default)
    return out


def _defaults(cls) -> dict[str, tuple[dataclasses.Field, object]]:
    return {name: (field, default) for name, (field, _, default) in _fields(cls).items()}


def _shown(field: dataclasses.Field, default) -> str:
    spec = option_spec(field)
    if default is dataclasses.MISSING or default is None or (not default and isinstance(default, (tuple, Mapping))):
        return spec.default_text or ""
    if spec.default_text:
        return spec.default_text
    if isinstance(default, bool):
        return "on" if default else "off"
    return str(default)


def _parameter(name: str, field: dataclasses.Field, annotation, shown: str) -> Param:
    spec = option_spec(field)
    flag = spec.flag or "--" + name.replace("_", "-")
    base = _base_type(annotation)
    if spec.choices_of:  # key=value options of a method, parsed when the config is built
        decls, kind = (flag,), Optional[list[str]]
    elif base is bool:
        decls, kind = (f"{flag}/--no-{flag[2:]}",), Optional[bool]
    elif base is tuple:
        decls, kind = (flag,), Optional[list[str]]
    else:
        decls, kind = (flag,), Optional[base]
    text = spec.help.rstrip(".") + (f" (`ltclip list {spec.choices}`)." if spec.choices else ".") + (f" \\[default: {shown}]" if shown else "")
    option = typer.Option(*decls, *((spec.short,) if spec.short else ()), help=text, show_default=False)
    return Param(name, Param.KEYWORD_ONLY, default=None, annotation=Annotated[kind, option])


def _base_type(annotation):
    """``int | None`` → int, ``tuple[str, ...]`` → tuple, ``str`` → str."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return tuple
    if args and origin is not None and origin is not tuple:
        return _base_type(args[0])
    return annotation
