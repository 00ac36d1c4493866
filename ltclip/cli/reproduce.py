"""``ltclip reproduce``: the paper's table on one dataset (``make reproduce`` runs it)."""

from __future__ import annotations

import shlex
import subprocess
import dataclasses

import typer

from ..config import ReproduceConfig
from ..config.fields import check_values
from .common import data_options, given, guarded, say_default
from .generate import command, config_options

def reproduce(values: dict, app: typer.Typer) -> None:
    """Extract, train every row of the paper's table, evaluate and write one report; finished steps are skipped."""
    from ..core.errors import LtclipError
    from ..stages.reproduce import default_out, run_plan

    values = given(values)
    if not values.get("dataset") or not values.get("data_root"):
        raise LtclipError("--dataset and --data-root are required (e.g. --dataset places_lt --data-root /data/places365)")
    settings = ReproduceConfig(**values)
    check_values(settings)
    if settings.out is None:
        settings = dataclasses.replace(settings, out=str(default_out(settings.dataset, settings.model, settings.pretrained)))
        say_default("--out", settings.out)
    report = run_plan(settings, _invoker(settings.launcher, app), lambda line: typer.echo(line, err=True))
    typer.echo(report.read_text(encoding="utf-8"))


def _invoker(launcher: str | None, app: typer.Typer):
    """Run one ``ltclip`` command line with ``app``: in this process, or under ``launcher`` for the distributed steps."""

    def invoke(args: list[str], distributed: bool) -> int:
        if launcher and distributed:
            return subprocess.run([*shlex.split(launcher), "-m", "ltclip", *args]).returncode
        import gc

        import torch

        try:
            code = app(args, standalone_mode=False, prog_name="ltclip")
        except typer.Exit as done:  # raised by a command's error guard
            code = done.exit_code
        except typer.exceptions.TyperException as err:  # a usage error (unknown option, bad value)
            typer.echo(f"error: {err.format_message()}", err=True)
            code = err.exit_code
        finally:
            gc.collect()  # the step's model and optimizer state go before the next step starts
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return int(code or 0)

    return invoke


def register(app: typer.Typer) -> None:
    params = [*data_options(skip=("train_list", "val_list", "test_list", "classnames", "templates", "subset_seed")),
              *config_options(ReproduceConfig)]
    app.command("reproduce")(guarded(command("reproduce", reproduce.__doc__, params, lambda values: reproduce(values, app))))
