"""``ltclip train-head``: stage 1 on a feature cache, or (``--from RUN``) a second stage on a run.

Option names are the config fields' names; unset options (None) take the config's defaults, which
differ between stage 1 (:class:`OptimConfig`) and second stages (``SECOND_STAGE_OPTIM``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import SECOND_STAGE_OPTIM, MethodConfig, OptimConfig, TrainHeadConfig
from ..errors import LtclipError
from ..workspace import WORKSPACE_FILE, default_run_dir, recorded_features
from .common import ConfigFile, check_choice, given, guarded, say_default

_M, _O, _S, _T = MethodConfig(), OptimConfig(), SECOND_STAGE_OPTIM, TrainHeadConfig(features="", out="")


def _d(field: str) -> str:
    """The default of an optimization option in help texts, for stage 1 and second stages."""
    a, b = getattr(_O, field), getattr(_S, field)
    return f" \\[default: {a}" + (f"; second stage {b}]" if a != b else "]")


Opts = Optional[list[str]]


def train_head(
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Run folder (default: runs/HEAD-LOSS-SAMPLER, or runs/STAGE1-METHOD for a second stage; never a finished run).")] = None,
    config: ConfigFile = None,
    features: Annotated[Optional[str], typer.Option("--features", "-f", help="Feature cache folder from `ltclip extract` (default: the one ./ltclip.toml names).")] = None,
    head: Annotated[Optional[str], typer.Option("--head", help=f"Head (`ltclip list heads`) \\[default: {_M.head}].")] = None,
    head_opts: Annotated[Opts, typer.Option("--head-opt", help="Head option key=value (repeatable), e.g. depth=3.")] = None,
    loss: Annotated[Optional[str], typer.Option("--loss", help=f"Loss (`ltclip list losses`) \\[default: {_M.loss}; second stage: the method's].")] = None,
    loss_opts: Annotated[Opts, typer.Option("--loss-opt", help="Loss option key=value (repeatable), e.g. tau=1.")] = None,
    sampler: Annotated[Optional[str], typer.Option("--sampler", help=f"Sampler (`ltclip list samplers`) \\[default: {_M.sampler}; second stage: the method's].")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Epochs (one epoch draws as many rows as the train split has)." + _d("epochs"))] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Total optimizer steps instead of --epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Rows per optimizer step, over all processes." + _d("batch_size"))] = None,
    accum: Annotated[Optional[int], typer.Option("--accum", help="Micro-batches per optimizer step (gradient accumulation)." + _d("accum"))] = None,
    optimizer: Annotated[Optional[str], typer.Option("--optimizer", help="adamw or sgd (timm's factory)." + _d("optimizer"))] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate." + _d("lr"))] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", help="Weight decay." + _d("weight_decay"))] = None,
    momentum: Annotated[Optional[float], typer.Option("--momentum", help="SGD momentum." + _d("momentum"))] = None,
    nesterov: Annotated[Optional[bool], typer.Option("--nesterov/--no-nesterov", help="Nesterov momentum for sgd." + _d("nesterov"))] = None,
    no_decay_1d: Annotated[Optional[bool], typer.Option("--no-decay-1d/--decay-1d", help="No weight decay on biases, norms and other 1-D parameters." + _d("no_decay_1d"))] = None,
    schedule: Annotated[Optional[str], typer.Option("--schedule", help="Learning-rate schedule per step (`ltclip list schedules`)." + _d("schedule"))] = None,
    warmup: Annotated[Optional[float], typer.Option("--warmup", help="Linear warm-up, in epochs." + _d("warmup"))] = None,
    grad_clip: Annotated[Optional[float], typer.Option("--grad-clip", help="Clip the gradient norm (0: off)." + _d("grad_clip"))] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="fp32, bf16 or fp16 (autocast; fp16 on CUDA with a GradScaler)." + _d("precision"))] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the initialisation, sampler and views." + _d("seed"))] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", help="Also validate every N steps (0: at epoch ends only)." + _d("eval_every"))] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every", help="Also checkpoint every N steps (0: at epoch ends only)." + _d("checkpoint_every"))] = None,
    select: Annotated[Optional[str], typer.Option("--select", help="Validation metric that picks the kept weights." + _d("select"))] = None,
    val_split: Annotated[Optional[str], typer.Option("--val-split", help=f"Split for model selection \\[default: {_T.val_split}].")] = None,
    max_ram: Annotated[Optional[str], typer.Option("--max-ram", help="Stream token caches larger than this, e.g. 8G (default: half of the available memory, shared by the processes).")] = None,
    posthoc_la: Annotated[Optional[bool], typer.Option("--posthoc-la", help="Post-hoc logit adjustment, tau chosen on val.")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda.")] = None,
    tensorboard: Annotated[Optional[bool], typer.Option("--tensorboard", help="Also write TensorBoard scalars to RUN/tensorboard (needs tensorboard).")] = None,
    from_run: Annotated[Optional[str], typer.Option("--from", help="Finished first-stage run: train a second stage on it.")] = None,
    two_stage: Annotated[Optional[str], typer.Option("--two-stage", help="Second-stage method (`ltclip list two-stage`), with --from.")] = None,
    two_stage_opts: Annotated[Opts, typer.Option("--two-stage-opt", help="Second-stage option key=value (repeatable).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out.")] = False,
):
    """Train a head with an imbalance-aware loss on a feature cache, or a second stage on a finished run."""
    values = given(locals(), drop=("config", "resume"))
    from ..config import SecondStageConfig, from_flat
    from ..progress import RichProgress

    for option, kind in (("--head", "heads"), ("--loss", "losses"), ("--sampler", "samplers"), ("--two-stage", "two-stage"),
                         ("--schedule", "schedules")):
        check_choice(option, kind, values.get(option[2:].replace("-", "_")))
    if not from_run and features is None:
        values["features"] = str(_recorded_features())
        say_default("--features", f"{values['features']}, named by ./{WORKSPACE_FILE}")
    if out is None:
        values["out"] = str(_default_out(values, resume))
        say_default("--out", values["out"])
    progress = RichProgress()
    if from_run:
        from ..stages.second_stage import run_second_stage

        cfg = from_flat(SecondStageConfig, values, owner="a second stage (--from RUN; head and features come from the run)")
        result = run_second_stage(cfg, progress, resume=resume)
    else:
        from ..stages.train_head import run_train_head

        cfg = from_flat(TrainHeadConfig, values, owner="stage 1 (second-stage options need --from RUN)")
        result = run_train_head(cfg, progress, resume=resume)
    best = result["best"] or {}
    if best.get("val_balanced_accuracy") is not None:
        when = f" (epoch {best['epoch'] + 1})" if best.get("epoch") is not None else ""
        progress.log(f"run: {result['out']}, val balanced accuracy {best['val_balanced_accuracy']:.2f}%{when}")
    else:
        progress.log(f"run: {result['out']}")


def _recorded_features():
    found = recorded_features()
    if found is None:
        raise LtclipError(f"--features DIR is required (no ./{WORKSPACE_FILE} from `ltclip extract` here), or --from RUN for a second stage")
    return found


def _default_out(values: dict, resume: bool):
    """``runs/<head>-<loss>-<sampler>`` for stage 1, ``runs/<stage-1 run>-<method>`` for a second stage."""
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise LtclipError("--out is required under torchrun (every process must write to the same folder)")
    if values.get("from_run"):
        name = f"{Path(values['from_run']).name}-{values.get('two_stage') or 'la'}" + ("-la" if values.get("two_stage") and values.get("posthoc_la") else "")
    else:
        name = "-".join(values.get(k, getattr(_M, k)) for k in ("head", "loss", "sampler"))
    return default_run_dir(name, resume)


def register(app: typer.Typer) -> None:
    app.command("train-head")(guarded(train_head))
