"""``ltclip pretrain-toy``: a tiny open_clip CLIP trained contrastively on drawn image–caption pairs (cached)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..stages.toy_clip import ToyClipSettings
from .common import given, guarded

_T = ToyClipSettings()


def pretrain_toy(
    out: Annotated[str, typer.Option("--out", "-o", help="Folder of the checkpoint and toy_clip.json (reused when it holds the same settings).")] = "toy-clip",
    model: Annotated[Optional[str], typer.Option("--model", "-m", help=f"open_clip architecture trained from scratch \\[default: {_T.model}].")] = None,
    classes: Annotated[Optional[int], typer.Option("--classes", help=f"Synthetic concepts pretrained on (the first N; all: 192) \\[default: {_T.classes}].")] = None,
    images_per_class: Annotated[Optional[int], typer.Option("--images-per-class", help=f"Images drawn per concept \\[default: {_T.images_per_class}].")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help=f"Optimizer steps \\[default: {_T.steps}].")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help=f"Image–caption pairs per step \\[default: {_T.batch_size}].")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help=f"Peak AdamW learning rate \\[default: {_T.lr}].")] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", help=f"AdamW weight decay \\[default: {_T.weight_decay}].")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help=f"Seed of the weights, images, captions and order \\[default: {_T.seed}].")] = None,
):
    """Pretrain a toy CLIP (both towers, open_clip's ClipLoss) on every synthetic concept, for the demo and tests.

    Prints how to use it: --model MODEL --pretrained OUT/toy_clip.pt in extract, finetune and eval.
    """
    settings = ToyClipSettings(**given(locals(), drop=("out",)))
    from ..core.progress import RichProgress
    from ..stages.toy_clip import pretrain_toy_clip

    info = pretrain_toy_clip(out, settings, RichProgress())
    losses = info["loss_per_epoch"]
    how = "cached" if info["cached"] else f"trained in {info['seconds']:.0f} s"
    typer.echo(f"toy CLIP {how}: {info['steps']} steps on {info['pretraining_set']['images']:,} image–caption pairs, "
               f"contrastive loss {losses[0]:.3f} (first epoch) → {losses[-1]:.3f} (last)")
    typer.echo(f"use it with: {info['use']}")


def register(app: typer.Typer) -> None:
    app.command("pretrain-toy")(guarded(pretrain_toy))
