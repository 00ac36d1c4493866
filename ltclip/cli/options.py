"""Options that several commands share (train-head, finetune): the method's and the engine's.

Unset options (None) take the stage config's defaults; the help texts show them, read from the
config dataclasses (stage 1, second stage, finetune), never written here a second time.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..config import FINETUNE_OPTIM, SECOND_STAGE_OPTIM, MethodConfig, OptimConfig

_M, _O, _S, _F = MethodConfig(), OptimConfig(), SECOND_STAGE_OPTIM, FINETUNE_OPTIM


def _d(field: str) -> str:
    """The default of an optimization option in help texts, per stage where they differ."""
    a, b, c = getattr(_O, field), getattr(_S, field), getattr(_F, field)
    if a == b == c:
        return f" \\[default: {a}]"
    return f" \\[default: {a}; second stage {b}; finetune {c}]"


Opts = Optional[list[str]]
Head = Annotated[Optional[str], typer.Option("--head", help=f"Head (`ltclip list heads`) \\[default: {_M.head}].")]
HeadOpts = Annotated[Opts, typer.Option("--head-opt", help="Head option key=value (repeatable), e.g. depth=3.")]
Loss = Annotated[Optional[str], typer.Option("--loss", help=f"Loss (`ltclip list losses`) \\[default: {_M.loss}; second stage: the method's].")]
LossOpts = Annotated[Opts, typer.Option("--loss-opt", help="Loss option key=value (repeatable), e.g. tau=1.")]
Sampler = Annotated[Optional[str], typer.Option("--sampler", help=f"Sampler (`ltclip list samplers`) \\[default: {_M.sampler}; second stage: the method's].")]
Epochs = Annotated[Optional[int], typer.Option("--epochs", help="Epochs (one epoch draws as many rows as the train split has)." + _d("epochs") + " (train-head: the head's own)")]
Steps = Annotated[Optional[int], typer.Option("--steps", help="Total optimizer steps instead of --epochs.")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="Rows per optimizer step, over all processes." + _d("batch_size"))]
Accum = Annotated[Optional[int], typer.Option("--accum", help="Micro-batches per optimizer step (gradient accumulation)." + _d("accum"))]
Optimizer = Annotated[Optional[str], typer.Option("--optimizer", help="adamw or sgd (timm's factory)." + _d("optimizer"))]
Lr = Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate." + _d("lr") + " (train-head: the head's own, `ltclip list heads`)")]
WeightDecay = Annotated[Optional[float], typer.Option("--weight-decay", help="Weight decay." + _d("weight_decay"))]
Momentum = Annotated[Optional[float], typer.Option("--momentum", help="SGD momentum." + _d("momentum"))]
Nesterov = Annotated[Optional[bool], typer.Option("--nesterov/--no-nesterov", help="Nesterov momentum for sgd." + _d("nesterov"))]
NoDecay1d = Annotated[Optional[bool], typer.Option("--no-decay-1d/--decay-1d", help="No weight decay on biases, norms and other 1-D parameters." + _d("no_decay_1d"))]
Schedule = Annotated[Optional[str], typer.Option("--schedule", help="Learning-rate schedule per step (`ltclip list schedules`)." + _d("schedule"))]
Warmup = Annotated[Optional[float], typer.Option("--warmup", help="Linear warm-up, in epochs." + _d("warmup"))]
WarmupSteps = Annotated[Optional[int], typer.Option("--warmup-steps", help="Linear warm-up in optimizer steps, instead of --warmup epochs.")]
Recipe = Annotated[Optional[str], typer.Option("--recipe", help="Named recipe (`ltclip list recipes`): its options are the defaults, any option given wins.")]
GradClip = Annotated[Optional[float], typer.Option("--grad-clip", help="Clip the gradient norm (0: off)." + _d("grad_clip"))]
Precision = Annotated[Optional[str], typer.Option("--precision", help="fp32, bf16 or fp16 (autocast; fp16 on CUDA with a GradScaler)." + _d("precision"))]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Seed of the initialisation, sampler and views." + _d("seed"))]
EvalEvery = Annotated[Optional[int], typer.Option("--eval-every", help="Also validate every N steps (0: at epoch ends only)." + _d("eval_every"))]
CheckpointEvery = Annotated[Optional[int], typer.Option("--checkpoint-every", help="Also checkpoint every N steps (0: at epoch ends only)." + _d("checkpoint_every"))]
Select = Annotated[Optional[str], typer.Option("--select", help="Validation metric that picks the kept weights (highest; lowest for nll and ece)." + _d("select"))]
Device = Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda.")]
Tensorboard = Annotated[Optional[bool], typer.Option("--tensorboard", help="Also write TensorBoard scalars to RUN/tensorboard (needs tensorboard).")]
