"""``ltclip train-head``: stage 1 on a feature cache, or (``--from RUN``) a second stage on a run.

Its options are the fields of :class:`TrainHeadConfig` and :class:`SecondStageConfig`; the values a
run trains with are chosen by :func:`ltclip.recipes.resolve.train_head_config`.
"""

from __future__ import annotations

import typer

from ..config import SecondStageConfig, TrainHeadConfig
from .common import config_file_option, given, guarded, say_default
from .generate import command, config_options, extra
from .precheck import check_given

# The options each head sets for itself (`ltclip list heads`; tests/test_cli.py checks the list).
HEAD_DEFAULTED = ("epochs", "optimizer", "lr")


def resume_option():
    return extra("resume", bool, ("--resume",), "Continue an interrupted run in --out.", default=False)


def train_head_parameters():
    """train-head's parameters: stage 1's options, then those only a second stage takes."""
    heads = "the head's (`ltclip list heads`)"
    return [
        config_file_option(),
        *config_options(TrainHeadConfig, SecondStageConfig, second=("--from", SecondStageConfig),
                        default_text={name: heads for name in HEAD_DEFAULTED}),
        resume_option(),
    ]


def train_head(values: dict) -> None:
    """Train a head with an imbalance-aware loss on a feature cache, or a second stage on a finished run."""
    from ..recipes.resolve import train_head_config
    from ..core.progress import RichProgress

    resume = values.pop("resume")
    check_given(values, SecondStageConfig if values.get("from_run") else TrainHeadConfig)
    cfg = train_head_config(given(values, drop=("config",)), say=say_default, resume=resume)
    progress = RichProgress()
    if isinstance(cfg, SecondStageConfig):
        from ..stages.second_stage import run_second_stage

        result = run_second_stage(cfg, progress, resume=resume)
    else:
        from ..stages.train_head import run_train_head

        result = run_train_head(cfg, progress, resume=resume, say=say_default)
    best = result["best"] or {}
    if best.get("val_balanced_accuracy") is not None:
        when = f" (epoch {best['epoch'] + 1})" if best.get("epoch") is not None else ""
        progress.log(f"run: {result['out']}, val balanced accuracy {best['val_balanced_accuracy']:.2f}%{when}")
    else:
        progress.log(f"run: {result['out']}")


def register(app: typer.Typer) -> None:
    app.command("train-head")(guarded(command("train-head", train_head.__doc__, train_head_parameters(), train_head)))
