"""``ltclip finetune``: an image encoder (tuned as ``--tune`` says) and a head, trained on images.

Its options are the fields of :class:`FinetuneConfig`; the values a run trains with are chosen by
:func:`ltclip.recipes.resolve.finetune_config`.
"""

from __future__ import annotations

import typer

from ..config import FinetuneConfig
from .common import config_file_option, given, guarded, say_default
from .precheck import check_given
from .generate import command, config_options
from .train import resume_option


def finetune(values: dict) -> None:
    """Fine-tune the image encoder (full, last-k, bitfit, ln, LoRA, adapters, VPT) with a head, end to end on images."""
    from ..recipes.resolve import finetune_config

    resume = values.pop("resume")
    check_given(values, FinetuneConfig)
    cfg = finetune_config(given(values, drop=("config",)), say=say_default, resume=resume)  # torch loads below
    from ..core.progress import RichProgress
    from ..stages.finetune import run_finetune

    progress = RichProgress()
    result = run_finetune(cfg, progress, resume=resume)
    best = result["best"] or {}
    tail = f", val balanced accuracy {best['val_balanced_accuracy']:.2f}%" if best.get("val_balanced_accuracy") is not None else ""
    progress.log(f"run: {result['out']}{tail}")


def register(app: typer.Typer) -> None:
    params = [config_file_option(), *config_options(FinetuneConfig), resume_option()]
    app.command("finetune")(guarded(command("finetune", finetune.__doc__, params, finetune)))
