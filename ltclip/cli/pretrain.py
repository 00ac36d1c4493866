"""``ltclip pretrain-toy``: a tiny open_clip CLIP trained contrastively on drawn image–caption pairs (cached).

Its options are the fields of :class:`~ltclip.stages.toy_clip.ToyClipSettings`.
"""

from __future__ import annotations

import typer

from ..stages.toy_clip import ToyClipSettings
from .common import given, guarded
from .generate import command, config_options, extra


def pretrain_toy(values: dict) -> None:
    """Pretrain a toy CLIP (both towers, open_clip's ClipLoss) on every synthetic concept, for the demo and tests.

    Prints how to use it: --model MODEL --pretrained OUT/toy_clip.pt in extract, finetune and eval.
    """
    out = values.pop("out")
    settings = ToyClipSettings(**given(values))
    from ..core.progress import RichProgress
    from ..stages.toy_clip import pretrain_toy_clip

    info = pretrain_toy_clip(out, settings, RichProgress())
    losses = info["loss_per_epoch"]
    how = "cached" if info["cached"] else f"trained in {info['seconds']:.0f} s"
    typer.echo(f"toy CLIP {how}: {info['steps']} steps on {info['pretraining_set']['images']:,} image–caption pairs, "
               f"contrastive loss {losses[0]:.3f} (first epoch) → {losses[-1]:.3f} (last)")
    typer.echo(f"use it with: {info['use']}")


def register(app: typer.Typer) -> None:
    out = extra("out", str, ("--out", "-o"), "Folder of the checkpoint and toy_clip.json (reused when it holds the same settings).",
                default="toy-clip")
    params = [out, *config_options(ToyClipSettings)]
    app.command("pretrain-toy")(guarded(command("pretrain-toy", pretrain_toy.__doc__, params, pretrain_toy)))
