"""The ``ltclip`` command line: parses options, builds a config, calls one stage. No logic here."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from .. import __version__
from . import finetune, pretrain, reproduce, stages, sweep, train, use
from .datasets import cache_app, datasets_app

app = typer.Typer(
    name="ltclip",
    help="CLIP-style vision-language models for long-tailed image classification.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    add_completion=False,
)
app.add_typer(datasets_app, name="datasets")
app.add_typer(cache_app, name="cache")


def _version(value: bool):
    if value:
        typer.echo(f"ltclip {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


stages.register(app)  # extract, eval, list
train.register(app)  # train-head
finetune.register(app)  # finetune
reproduce.register(app)  # reproduce (the paper's table: make reproduce)
sweep.register(app)  # sweep (a grid of train-head points)
pretrain.register(app)  # pretrain-toy (the demo's toy CLIP)
use.register(app)  # predict (a run on image files)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
