"""``ltclip train-head``: stage 1 on a feature cache, or (``--from RUN``) a second stage on a run.

Option names are the config fields' names; unset options (None) take the config's defaults, which
differ between stage 1 (:class:`OptimConfig`) and second stages (``SECOND_STAGE_OPTIM``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import MethodConfig, TrainHeadConfig
from ..core.errors import LtclipError
from ..artifacts.workspace import WORKSPACE_FILE, default_run_dir, recorded_features
from .common import ConfigFile, check_choice, given, guarded, say_default
from .options import Device, Tensorboard, Accum, BatchSize, CheckpointEvery, Epochs, EvalEvery, GradClip, Head, HeadOpts, Loss, LossOpts, Lr, Momentum, Nesterov, NoDecay1d, Optimizer, Opts, Precision, Sampler, Schedule, Seed, Recipe, Select, Steps, Warmup, WarmupSteps, WeightDecay

_M, _T = MethodConfig(), TrainHeadConfig(features="", out="")


def train_head(
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Run folder (default: runs/HEAD-LOSS-SAMPLER, or runs/STAGE1-METHOD for a second stage; never a finished run).")] = None,
    config: ConfigFile = None,
    features: Annotated[Optional[str], typer.Option("--features", "-f", help="Feature cache folder from `ltclip extract` (default: the one ./ltclip.toml names).")] = None,
    recipe: Recipe = None,
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
    val_split: Annotated[Optional[str], typer.Option("--val-split", help=f"Split for model selection \\[default: {_T.val_split}].")] = None,
    max_ram: Annotated[Optional[str], typer.Option("--max-ram", help="Stream token caches larger than this, e.g. 8G (default: half of the available memory, shared by the processes).")] = None,
    read_blocks: Annotated[Optional[int], typer.Option("--read-blocks", help="Block-shuffled read order for caches streamed from slow disks: contiguous blocks of this many rows, e.g. 1024 (default: 0, the sampler's own order).")] = None,
    shuffle_pool: Annotated[Optional[int], typer.Option("--shuffle-pool", help="Blocks shuffled together in the --read-blocks order (default: 16).")] = None,
    posthoc_la: Annotated[Optional[bool], typer.Option("--posthoc-la", help="Post-hoc logit adjustment, tau chosen on val.")] = None,
    device: Device = None,
    tensorboard: Tensorboard = None,
    from_run: Annotated[Optional[str], typer.Option("--from", help="Finished first-stage run: train a second stage on it.")] = None,
    two_stage: Annotated[Optional[str], typer.Option("--two-stage", help="Second-stage method (`ltclip list two-stage`), with --from.")] = None,
    two_stage_opts: Annotated[Opts, typer.Option("--two-stage-opt", help="Second-stage option key=value (repeatable).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out.")] = False,
):
    """Train a head with an imbalance-aware loss on a feature cache, or a second stage on a finished run."""
    values = given(locals(), drop=("config", "resume"))
    from ..core.progress import RichProgress

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

        result = run_second_stage(second_stage_config(values), progress, resume=resume)
    else:
        from ..stages.train_head import run_train_head

        result = run_train_head(stage_one_config(values, say=say_default), progress, resume=resume)
    best = result["best"] or {}
    if best.get("val_balanced_accuracy") is not None:
        when = f" (epoch {best['epoch'] + 1})" if best.get("epoch") is not None else ""
        progress.log(f"run: {result['out']}, val balanced accuracy {best['val_balanced_accuracy']:.2f}%{when}")
    else:
        progress.log(f"run: {result['out']}")


def stage_one_config(values: dict, *, say=None) -> TrainHeadConfig:
    """The stage-1 config that option values given on the command line (or by a sweep point) make.

    Layers, each over the next: the values given (explicit options and ``--config``) > ``--recipe``
    > the head's defaults for its loss and cache size (``ltclip.recipes.head_defaults``, shown by
    ``ltclip list heads``) > the dataclass. The config is fully resolved (it is what the run saves);
    ``say(option, text)`` hears each value a lower layer chose.
    """
    from ..config import from_flat
    from ..models.heads import HEADS
    from ..recipes import head_defaults, layer_options

    check_choice("--head", "heads", values.get("head"))
    others = layer_options("train-head", values)  # the loss, cache and batch the head's defaults depend on
    head = others.get("head", _M.head)
    own, lengthened = head_defaults(HEADS.get(head), others)

    def tell(option, text):  # a lengthened default says why
        say(option, f"{text} {lengthened}" if lengthened and option == "--epochs" and text.endswith(f"for --head {head}") else text)

    resolved = layer_options("train-head", values, head_defaults=lambda _: own, say=tell if say else None)
    return from_flat(TrainHeadConfig, resolved, owner="stage 1 (second-stage options need --from RUN)")


def second_stage_config(values: dict):
    """The second-stage config (``--from RUN``) that option values make: the given options over the
    method's own defaults (``ltclip list two-stage``; like ``SECOND_STAGE_OPTIM``'s, not printed: the
    run's ``config.json`` holds them)."""
    from ..config import SecondStageConfig, from_flat
    from ..methods.second_stage import TWO_STAGE

    name = values.get("two_stage")  # checked by the commands
    return from_flat(SecondStageConfig, {**(TWO_STAGE.get(name).defaults if name else {}), **values},
                     owner="a second stage (--from RUN; head and features come from the run)")


def run_config(values: dict):
    """A second stage's config when the values name ``--from RUN``, else stage 1's (a sweep point's)."""
    return second_stage_config(values) if values.get("from_run") else stage_one_config(values)


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
        from ..recipes import layer_options

        chosen = layer_options("train-head", values)
        name = "-".join(chosen.get(k, getattr(_M, k)) for k in ("head", "loss", "sampler"))
    return default_run_dir(name, resume)


def register(app: typer.Typer) -> None:
    app.command("train-head")(guarded(train_head))
