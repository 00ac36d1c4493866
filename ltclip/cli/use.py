"""``ltclip predict``: use a trained run (or a cache's zero-shot classifier) on image files.

The options are the fields of :class:`PredictConfig`.
"""

from __future__ import annotations

from typing import Optional

import typer

from ..config import PredictConfig, from_flat
from .common import given, guarded
from .generate import argument, command, config_options


def predict(values: dict) -> None:
    """Top-k classes of image files from a run (head, second stage, finetuned) or --zero-shot on a cache."""
    from ..stages.predict import print_table, run_predict

    values = given(values)
    items = list(values.pop("items", ()))
    if not values.get("zero_shot") and items:
        values["run"] = items.pop(0)
    predictions = run_predict(from_flat(PredictConfig, {**values, "paths": tuple(items)}, owner="predict"))
    if not values.get("out"):
        print_table(predictions)
    else:
        typer.echo(f"{len(predictions):,} predictions written to {values['out']}", err=True)


def register(app: typer.Typer) -> None:
    params = [argument("items", Optional[list[str]], "RUN then image files or folders (with --zero-shot: only images)."),
              *config_options(PredictConfig)]
    app.command("predict")(guarded(command("predict", predict.__doc__, params, predict)))
