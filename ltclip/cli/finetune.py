"""``ltclip finetune``: an image encoder (tuned as ``--tune`` says) and a head, trained on images."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from ..config import FinetuneConfig, TuningConfig
from ..core.errors import LtclipError
from ..artifacts.workspace import default_run_dir
from .common import (
    Classnames, ConfigFile, DataRoot, DatasetName, Download, Imbalance, ManifestDir, SubsetSeed, Templates, TestList,
    TrainList, ValList, check_choice, given, guarded, say_default,
)
from .options import (
    Accum, BatchSize, CheckpointEvery, Device, Epochs, EvalEvery, GradClip, Head, HeadOpts, Loss, LossOpts, Lr, Momentum,
    NoDecay1d, Nesterov, Opts, Optimizer, Precision, Recipe, Sampler, Schedule, Seed, Select, Steps, Tensorboard, Warmup,
    WarmupSteps, WeightDecay,
)

_F, _U = FinetuneConfig(out=""), TuningConfig()


def finetune(
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Run folder (default: runs/finetune-TUNE-HEAD-LOSS-SAMPLER; never a finished run).")] = None,
    config: ConfigFile = None,
    dataset: DatasetName = None,
    data_root: DataRoot = None,
    manifest_dir: ManifestDir = None,
    train_list: TrainList = None,
    val_list: ValList = None,
    test_list: TestList = None,
    classnames: Classnames = None,
    templates: Templates = None,
    imbalance: Imbalance = None,
    download: Download = None,
    subset_seed: SubsetSeed = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help=f"open_clip model name \\[default: {_F.model}].")] = None,
    pretrained: Annotated[Optional[str], typer.Option("--pretrained", "-p", help=f"open_clip tag, checkpoint file, or 'none' \\[default: {_F.pretrained}].")] = None,
    preprocess_from: Annotated[Optional[str], typer.Option("--preprocess-from", help="Tag whose preprocessing a checkpoint file needs.")] = None,
    recipe: Recipe = None,
    tune: Annotated[Optional[str], typer.Option("--tune", help=f"What of the encoder trains (`ltclip list tuning`) \\[default: {_U.tune}].")] = None,
    tune_opts: Annotated[Opts, typer.Option("--tune-opt", help="Tuning option key=value (repeatable), e.g. rank=8.")] = None,
    backbone_lr: Annotated[Optional[float], typer.Option("--backbone-lr", help="Peak lr of the encoder's trained parameters (default: --lr).")] = None,
    grad_checkpointing: Annotated[Optional[bool], typer.Option("--grad-checkpointing", help="Recompute encoder activations in the backward pass (less memory).")] = None,
    head: Head = None,
    head_opts: HeadOpts = None,
    loss: Loss = None,
    loss_opts: LossOpts = None,
    sampler: Sampler = None,
    epochs: Epochs = None,
    steps: Steps = None,
    batch_size: BatchSize = None,
    accum: Accum = None,
    optimizer: Optimizer = None,
    lr: Lr = None,
    weight_decay: WeightDecay = None,
    momentum: Momentum = None,
    nesterov: Nesterov = None,
    no_decay_1d: NoDecay1d = None,
    schedule: Schedule = None,
    warmup: Warmup = None,
    warmup_steps: WarmupSteps = None,
    grad_clip: GradClip = None,
    precision: Precision = None,
    seed: Seed = None,
    eval_every: EvalEvery = None,
    checkpoint_every: CheckpointEvery = None,
    select: Select = None,
    augment: Annotated[Optional[bool], typer.Option("--augment/--no-augment", help="RandomResizedCrop + flip at every step \\[default: on].")] = None,
    normalize: Annotated[Optional[str], typer.Option("--normalize", help="model (the model's mean/std) or imagenet (the seed code's) \\[default: model].")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="DataLoader decode workers (default: this process's share of the CPUs, at most 8).")] = None,
    val_split: Annotated[Optional[str], typer.Option("--val-split", help=f"Split for model selection \\[default: {_F.val_split}].")] = None,
    device: Device = None,
    tensorboard: Tensorboard = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out.")] = False,
):
    """Fine-tune the image encoder (full, last-k, bitfit, ln, LoRA, adapters, VPT) with a head, end to end on images."""
    values = given(locals(), drop=("config", "resume"))
    from ..core.progress import RichProgress
    from ..stages.finetune import run_finetune

    for option, kind in (("--head", "heads"), ("--loss", "losses"), ("--sampler", "samplers"), ("--tune", "tuning"),
                         ("--schedule", "schedules")):
        check_choice(option, kind, values.get(option[2:].replace("-", "_")))
    if out is None:
        if os.environ.get("WORLD_SIZE", "1") != "1":
            raise LtclipError("--out is required under torchrun (every process must write to the same folder)")
        cfg = finetune_config({**values, "out": ""})
        values["out"] = str(default_run_dir(f"finetune-{cfg.tuning.tune}-{cfg.method.head}-{cfg.method.loss}-{cfg.method.sampler}", resume))
        say_default("--out", values["out"])
    cfg = finetune_config(values, say=say_default)
    progress = RichProgress()
    result = run_finetune(cfg, progress, resume=resume)
    best = result["best"] or {}
    tail = f", val balanced accuracy {best['val_balanced_accuracy']:.2f}%" if best.get("val_balanced_accuracy") is not None else ""
    progress.log(f"run: {result['out']}{tail}")


def finetune_config(values: dict, *, say=None) -> FinetuneConfig:
    """The finetune config of the values given (options, ``--config``) over ``--recipe`` over the
    dataclass (``FINETUNE_OPTIM``); ``say(option, text)`` hears each value the recipe chose."""
    from ..config import from_flat
    from ..recipes import layer_options

    return from_flat(FinetuneConfig, layer_options("finetune", values, say=say), owner="finetune")


def register(app: typer.Typer) -> None:
    app.command("finetune")(guarded(finetune))
