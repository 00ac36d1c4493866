"""``ltclip predict``: use a trained run (or a cache's zero-shot classifier) on image files;
``ltclip export``: write it as one file for another program.

The options are the fields of :class:`PredictConfig` and :class:`ExportConfig`.
"""

from __future__ import annotations

from typing import Optional

import typer

from ..config import ExportConfig, PredictConfig, from_flat
from .common import given, guarded
from ..data.image_paths import image_paths
from .generate import argument, command, config_options
from .precheck import check_given, check_input


def predict(values: dict) -> None:
    """Top-k classes of image files from a run (head, second stage, finetuned) or --zero-shot on a cache."""
    values = given(values)
    items = list(values.pop("items", ()))
    if not values.get("zero_shot") and items:
        values["run"] = items.pop(0)
    _check_named(values, PredictConfig)
    found = image_paths(tuple(items), values.get("list_file"))  # images that are not there: one line before torch loads
    from ..stages.predict import print_table, run_predict

    predictions = run_predict(from_flat(PredictConfig, {**values, "paths": tuple(items)}, owner="predict"), found)
    if not values.get("out"):
        print_table(predictions)
    else:
        typer.echo(f"{len(predictions):,} predictions written to {values['out']}", err=True)


def export(values: dict) -> None:
    """Write a run (or --zero-shot on a cache) as one TorchScript or torch.export file, class names and preprocessing inside."""
    _check_named(values, ExportConfig)
    from ..stages.export import run_export

    info = run_export(from_flat(ExportConfig, given(values), owner="export"))
    size = ", ".join(map(str, info["preprocess"]["size"]))
    merged = f", {info['lora_weights_merged']} LoRA weights merged" if info["lora_weights_merged"] else ""
    typer.echo(f"exported to {values['out']} ({info['format']}: [B, 3, {size}] -> [B, {info['num_classes']}] logits{merged})", err=True)


def _check_named(values: dict, cls) -> None:
    """The run and the input options named exist (before torch loads)."""
    if values.get("run") is not None:
        check_input("run", "", values["run"])
    check_given(values, cls)


def register(app: typer.Typer) -> None:
    params = [argument("items", Optional[list[str]], "RUN then image files or folders (with --zero-shot: only images)."),
              *config_options(PredictConfig)]
    app.command("predict")(guarded(command("predict", predict.__doc__, params, predict)))
    params = [argument("run", Optional[str], "The run folder (none with --zero-shot)."), *config_options(ExportConfig)]
    app.command("export")(guarded(command("export", export.__doc__, params, export)))
