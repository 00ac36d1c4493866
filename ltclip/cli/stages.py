"""``ltclip extract``, ``ltclip eval`` and ``ltclip list``.

The options of extract and eval are the fields of :class:`ExtractConfig` and :class:`EvalConfig`.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..artifacts.workspace import record_features
from ..config import EvalConfig, ExtractConfig
from ..recipes.catalog import KINDS
from ..core.errors import LtclipError
from .common import config_file_option, given, guarded, is_main_process, say_default
from .generate import argument, command, config_options
from .precheck import check_given


def extract(values: dict) -> None:
    """Run the frozen CLIP image encoder once; write embeddings (+ tokens) to a resumable HDF5 cache."""
    from ..recipes.resolve import extract_config

    check_given(values, ExtractConfig)
    cfg = extract_config(given(values, drop=("config",)), say=say_default)  # torch loads below
    from ..core.progress import RichProgress
    from ..stages.extract import run_extract

    progress = RichProgress()
    summary = run_extract(cfg, progress)
    for item in summary["splits"]:
        progress.log(f"{item['split']}: {item['status']} ({item['rows']:,} rows)")
    progress.log(f"cache: {summary['out']}")
    if is_main_process():
        progress.log(f"{record_features(Path(summary['out']))} now names this cache for `ltclip train-head` and `ltclip eval`")


def evaluate(values: dict) -> None:
    """Shot-group metrics (many/medium/few/all) for runs and zero-shot / kNN / NCM baselines."""
    from ..recipes.resolve import eval_config

    check_given(values, EvalConfig)
    cfg = eval_config(given(values, drop=("config",)), say=say_default)  # torch-free: a missing run is refused at once
    from ..evaluation.report import markdown_table
    from ..stages.evaluate import run_eval

    typer.echo(markdown_table(run_eval(cfg)))


def list_registered(
    kind: Annotated[str, typer.Argument(help=f"One of: {', '.join(KINDS)}, recipes.")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="With `tuning`: count each mode's trainable parameters on this open_clip model (at 1,000 classes, which set bottleneck=auto and rank=auto).")] = None,
):
    """Registered methods of one kind, as a table: name, what it is, options with their defaults."""
    if kind not in (*KINDS, "recipes"):
        raise LtclipError(f"ltclip list {kind!r}: choose one of {', '.join(KINDS)}, recipes")
    if model is not None and kind != "tuning":
        raise LtclipError("--model: only `ltclip list tuning` counts parameters on a model")
    if kind == "recipes":
        return _print_table(("name", "what it is", "options"), _recipe_rows())
    from ..recipes.catalog import catalog

    entries = catalog()[kind]
    counts = {}
    if model:
        from ..models.tuning import trainable_counts

        counts = trainable_counts(model, [entry["name"] for entry in entries])
    rows = [(entry["name"], *((f"{counts[entry['name']]:,}",) if counts else ()), entry["about"],
             "\n".join(f"{k}={v}" for k, v in entry["options"].items())) for entry in entries]
    _print_table(("name", *(("trainable",) if counts else ()), "what it is", "options"), rows)


def _recipe_rows() -> list[tuple[str, str, str]]:
    """Each recipe: its summary, and per stage the options it sets."""
    from ..recipes import list_recipes, load_recipe
    from ..recipes.catalog import plain_text

    rows = []
    for name in list_recipes():
        recipe = load_recipe(name)
        stages = []
        for stage, options in recipe.stages.items():
            opts = " ".join(f"{k}={','.join(v) if isinstance(v, tuple) else str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items())
            heads = "".join(f"; head {h}: {' '.join(o)}" for h, o in recipe.head_opts[stage].items())
            stages.append(f"{stage}: {opts}{heads}")
        if recipe.loss_opts:
            stages.append("loss options: " + "; ".join(f"{loss}: {' '.join(o)}" for loss, o in recipe.loss_opts.items()))
        rows.append((name, plain_text(recipe.summary), "\n".join(stages)))
    return rows


def _print_table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """``rows`` under a header row, fitted to the terminal's width (80 columns when the output is no
    terminal and COLUMNS is not set), plain text unless the output is a terminal."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    width = shutil.get_terminal_size().columns if sys.stdout.isatty() or os.environ.get("COLUMNS") else 80
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for header in headers:
        table.add_column(header, overflow="fold", no_wrap=header == "trainable", justify="right" if header == "trainable" else "left",
                         ratio={"what it is": 3, "options": 2}.get(header))
    for row in rows:
        table.add_row(*row)
    console = Console(width=max(width, 40), highlight=False)
    with console.capture() as captured:
        console.print(table)
    typer.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))


def register(app: typer.Typer) -> None:
    extract_params = [config_file_option(), *config_options(ExtractConfig)]
    app.command("extract")(guarded(command("extract", extract.__doc__, extract_params, extract)))
    eval_params = [argument("runs", Optional[list[str]], "Run folders from `ltclip train-head` or `ltclip finetune`."),
                   config_file_option(), *config_options(EvalConfig)]
    app.command("eval")(guarded(command("eval", evaluate.__doc__, eval_params, evaluate)))
    app.command("list")(guarded(list_registered))
