"""``ltclip reproduce``: the paper's table on one dataset (``make reproduce`` runs it)."""

from __future__ import annotations

import shlex
import subprocess
from typing import Annotated, Optional

import typer

from .common import DataRoot, DatasetName, Download, Imbalance, ManifestDir, guarded, say_default

_RECIPES = "imbalance-vlm (the paper's rows) or lift (LIFT's AdaptFormer row)"


def reproduce(
    dataset: DatasetName = None,
    data_root: DataRoot = None,
    manifest_dir: ManifestDir = None,
    imbalance: Imbalance = None,
    download: Download = None,
    model: Annotated[str, typer.Option("--model", "-m", help="open_clip model name.")] = "ViT-L-14",
    pretrained: Annotated[str, typer.Option("--pretrained", "-p", help="open_clip tag, checkpoint file, or 'none'.")] = "openai",
    recipe: Annotated[str, typer.Option("--recipe", help=f"Which table: {_RECIPES}.")] = "imbalance-vlm",
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Experiment folder: features/, runs/, the report (default: experiments/DATASET-MODEL-PRETRAINED).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Epochs of every training step (default: the recipe's).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps of every training step instead of epochs (smoke tests, budgets).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Batch of every training step (default: the recipe's).")] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="fp32, fp16 or bf16 for extraction and training.")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda.")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Image decode workers of extract, finetune and their eval.")] = None,
    launcher: Annotated[Optional[str], typer.Option("--launcher", help="Run extract and training steps under this, e.g. 'torchrun --nproc_per_node=8'.")] = None,
):
    """Extract, train every row of the paper's table, evaluate and write one report; finished steps are skipped."""
    from ..core.errors import LtclipError
    from ..stages.reproduce import Settings, default_out, run_plan

    if not dataset or not data_root:
        raise LtclipError("--dataset and --data-root are required (e.g. --dataset places_lt --data-root /data/places365)")
    if out is None:
        out = str(default_out(dataset, model, pretrained))
        say_default("--out", out)
    settings = Settings(dataset=dataset, data_root=data_root, out=out, model=model, pretrained=pretrained, recipe=recipe,
                        manifest_dir=manifest_dir, imbalance=imbalance, download=bool(download), epochs=epochs, steps=steps,
                        batch_size=batch_size, precision=precision, device=device, workers=workers)
    report = run_plan(settings, _invoker(launcher), lambda line: typer.echo(line, err=True))
    typer.echo(report.read_text(encoding="utf-8"))


def _invoker(launcher: str | None):
    """Run one ``ltclip`` command line: in this process, or under ``launcher`` for the distributed steps."""

    def invoke(args: list[str], distributed: bool) -> int:
        if launcher and distributed:
            return subprocess.run([*shlex.split(launcher), "-m", "ltclip", *args]).returncode
        import gc

        import torch

        from . import app

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
    app.command("reproduce")(guarded(reproduce))
