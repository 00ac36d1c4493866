"""``ltclip sweep``: a grid over train-head options, each point scored on val, the best kept as a run.

Every option besides the sweep's own is a train-head option (parsed by train-head's own command,
``--config`` included) and sets the base of every point; each
``--grid KEY=V1,V2`` value is parsed as that train-head option would be. A point's option values
are the base's with its own, made into a config as train-head would (stage 1, or a second stage when
they name ``--from RUN``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..core.errors import LtclipError
from ..artifacts.workspace import default_run_dir
from ..config import SecondStageConfig, TrainHeadConfig, option_fields
from ..recipes.choices import check_choice
from .common import given, guarded, say_default
from .generate import command
from .precheck import check_given
from .train import train_head, train_head_parameters

# Train-head options a sweep sets itself.
NOT_SWEPT = {"out": "--out is the sweep's own folder, not a grid key", "resume": "--resume continues the sweep, not a grid key",
             "config": "--config sets the base of every point, not a grid key"}
# Options whose values are registered names (`ltclip list KIND`), as the configs declare them.
CHOICES = {name: spec.choices for cls in (TrainHeadConfig, SecondStageConfig)
           for name, (_, spec) in option_fields(cls).items() if spec.choices}
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def sweep(
    ctx: typer.Context,
    grid: Annotated[Optional[list[str]], typer.Option("--grid", help="KEY=V1,V2,...: a train-head option and its values (repeatable: the grid is the product), e.g. lr=1e-3,1e-2.")] = None,
    metric: Annotated[str, typer.Option("--metric", help="Val metric that scores the points (nll and ece: lower is better).")] = "balanced_accuracy",
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Sweep folder: points/, sweep.json, sweep.md, best/ (default: runs/sweep).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted sweep in --out, skipping finished points.")] = False,
):
    """Train a grid of train-head points on a feature cache, score each on val and keep the best as a run.

    Every other option is a train-head option (`ltclip train-head --help`) and applies to every point.

    With --from RUN the points are second stages on that run.

    Linear and cosine heads that share the batch stream train together in one pass.
    """
    from ..recipes.resolve import workspace_features

    command = _train_head_command()
    base = _base_values(command, ctx.args)
    if not grid:
        raise LtclipError("--grid KEY=V1,V2 is required (e.g. --grid lr=1e-3,1e-2 --grid epochs=10,30)")
    axes = _parse_grid(command, grid, base)
    stage = SecondStageConfig if "from_run" in base or "from_run" in dict(axes) else TrainHeadConfig
    for values in (base, *({**base, name: value} for name, values in axes for value in values)):
        check_given(values, stage)
    if "features" not in dict(axes) and "from_run" not in dict(axes):  # a grid over them gives each point its own
        base = workspace_features(base, say=say_default)
    if out is None:
        out = str(default_run_dir("sweep", resume))
        say_default("--out", out)
    from ..core.progress import RichProgress
    from ..sweep import run_sweep  # torch loads here

    run_sweep(base, axes, metric, Path(out), RichProgress(), resume=resume)


def _train_head_command():
    app = typer.Typer(add_completion=False)
    app.command()(command("train-head", train_head.__doc__, train_head_parameters(), train_head))
    return typer.main.get_command(app)


def _parse(command, args: list[str], what: str) -> dict:
    """``args`` parsed by train-head's own command (types, choices of flags, --config)."""
    try:
        return command.make_context("train-head", list(args), resilient_parsing=False).params
    except Exception as err:  # click's usage errors of the bundled click
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        raise LtclipError(f"{what}: {message}") from None


def _base_values(command, args: list[str]) -> dict:
    parsed = _parse(command, args, "train-head option")
    values = given({k: v for k, v in parsed.items() if v != ()}, drop=("config", "resume"))  # () : a repeatable option not given
    for key in values:
        if key in NOT_SWEPT:
            raise LtclipError(NOT_SWEPT[key])
    for key, kind in CHOICES.items():
        check_choice(f"--{key}", kind, values.get(key))
    return values


def _parse_grid(command, specs: list[str], base: dict) -> list[tuple[str, list]]:
    params = {p.name: p for p in command.params if p.name not in NOT_SWEPT and p.name not in ("install_completion", "show_completion")}
    alias = {o.lstrip("-").replace("-", "_"): name for name, p in params.items() for o in [*p.opts, "--" + name]}
    axes: list[tuple[str, list]] = []
    for spec in specs:
        key, sep, text = spec.partition("=")
        norm = key.strip().lstrip("-").replace("-", "_")
        if norm in NOT_SWEPT:
            raise LtclipError(f"--grid {key}: {NOT_SWEPT[norm]}" if norm in ("out", "resume", "config") else NOT_SWEPT[norm])
        if not sep or not text or norm not in alias:
            raise LtclipError(f"--grid {spec!r}: expected KEY=V1,V2 with KEY a train-head option (`ltclip train-head --help`), "
                              "e.g. --grid lr=1e-3,1e-2")
        name = alias[norm]
        if name in dict(axes):
            raise LtclipError(f"--grid {key}: given twice; list all its values in one --grid {key}=V1,V2")
        values = [_grid_value(command, params[name], v.strip(), spec) for v in text.split(",")]
        if len(set(map(str, values))) != len(values):
            raise LtclipError(f"--grid {spec!r}: a value is listed twice")
        if name in CHOICES:
            for v in values:
                check_choice(f"--grid {key}", CHOICES[name], v)
        axes.append((name, values))
    return axes


def _grid_value(command, param, text: str, spec: str):
    """One grid value as train-head's option ``param`` parses it (a repeatable option: one key=value, or none)."""
    if getattr(param, "is_flag", False):
        if text.lower() not in TRUE + FALSE:
            raise LtclipError(f"--grid {spec!r}: {text!r} is not true or false")
        return text.lower() in TRUE
    if param.multiple and text == "":
        return ()
    value = _parse(command, [param.opts[0], text], f"--grid {spec!r}")[param.name]
    return tuple(value) if isinstance(value, list) else value


def register(app: typer.Typer) -> None:
    app.command("sweep", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(guarded(sweep))
