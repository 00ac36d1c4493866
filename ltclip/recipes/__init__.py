"""Named recipes as data: TOML files in this folder (``ltclip list recipes``, ``--recipe NAME``).

A recipe file has a ``summary``, a ``source``, one table per stage it is for (``[train-head]``,
``[finetune]``) of option values named as the stage's options, optional per-head options
(``[STAGE.head_opts]``, keyed by head name) and per-loss options (``[loss_opts]``, keyed by loss
name, for every stage). Head and loss options apply when that head or loss is the one trained.

:func:`layer_options` resolves what a stage trains with, each layer above the next:
the options given (on the command line or by ``--config``) > the recipe > the head's own
defaults (:func:`head_defaults`: the head's, for its loss and cache size; stage 1 only) > the
config dataclass.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import MethodConfig, flag
from ..core.errors import LtclipError

RECIPE_DIR = Path(__file__).resolve().parent
STAGES = ("train-head", "finetune")
# Two ways to say one thing: a user who gives one of a pair overrides a lower layer's other one.
ALTERNATIVES = (("epochs", "steps"), ("warmup", "warmup_steps"))


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    source: str
    stages: dict  # stage -> {option: value}
    head_opts: dict  # stage -> {head: ("key=value", ...)}
    loss_opts: dict  # loss -> ("key=value", ...)


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def load_recipe(name: str) -> Recipe:
    """Recipe ``name``, every option checked against the stage it is for; one-line errors otherwise."""
    names = list_recipes()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise LtclipError(f"--recipe {name!r}: unknown{hint}; choose one of {', '.join(names)} (`ltclip list recipes`)")
    from ..config import _toml  # the TOML reader configs use (tomllib, or tomli before 3.11)

    path = RECIPE_DIR / f"{name}.toml"
    data = _toml().loads(path.read_text(encoding="utf-8"))
    unknown = sorted(set(data) - {"summary", "source", "loss_opts", *STAGES})
    if unknown or not any(s in data for s in STAGES):
        raise LtclipError(f"recipe {path}: keys are summary, source, loss_opts and stage tables ({', '.join(STAGES)}); got {', '.join(unknown) or 'no stage'}")
    stages, head_opts = {}, {}
    for stage in STAGES:
        if stage in data:
            options = dict(data[stage])
            head_opts[stage] = {head: tuple(opts) for head, opts in options.pop("head_opts", {}).items()}
            stages[stage] = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    recipe = Recipe(name, data.get("summary", ""), data.get("source", ""), stages, head_opts,
                    {loss: tuple(opts) for loss, opts in data.get("loss_opts", {}).items()})
    _check(recipe)
    return recipe


def _check(recipe: Recipe) -> None:
    """Every option of the recipe is an option of its stage, every head/loss option parses."""
    from ..methods.losses import LOSSES
    from ..models.heads import HEADS

    for stage, options in recipe.stages.items():
        unknown = sorted(set(options) - stage_options(stage) | ({"head_opts", "loss_opts"} & set(options)))
        if unknown:
            raise LtclipError(f"recipe {recipe.name}: {', '.join(flag(k) for k in unknown)}: not an option of {stage} "
                              "(head_opts / loss_opts go in their tables)")
        for head, opts in recipe.head_opts[stage].items():
            HEADS.parse(head, opts)
    for loss, opts in recipe.loss_opts.items():
        LOSSES.parse(loss, opts)


def stage_options(stage: str) -> set[str]:
    from ..config import FinetuneConfig, TrainHeadConfig, option_names

    return option_names({"train-head": TrainHeadConfig, "finetune": FinetuneConfig}[stage])


def merge_opts(lower, upper) -> tuple[str, ...]:
    """``key=value`` options of two layers, key by key: ``upper``'s win, order kept."""
    merged = {opt.partition("=")[0].strip(): opt for opt in lower}
    merged.update({opt.partition("=")[0].strip(): opt for opt in upper})
    return tuple(merged.values())


def layer_options(stage: str, values: dict, *, head_defaults: Callable[[str], dict] | None = None,
                  say: Callable[[str, object], None] | None = None) -> dict:
    """The option values ``stage`` trains with: ``values`` (given; may name a ``recipe``) over the
    recipe's options over ``head_defaults(head)``; ``say(option, text)`` hears every value a lower
    layer chose. The result holds no ``recipe`` key: it is what a config is built from and saved."""
    given = {k: v for k, v in values.items() if k != "recipe" and v is not None}
    name = values.get("recipe")
    layers = []  # (options, origin), highest first below the given ones
    recipe = None
    if name is not None:
        recipe = load_recipe(name)
        if stage not in recipe.stages:
            raise LtclipError(f"--recipe {name}: a recipe for {', '.join(recipe.stages)}; {stage} cannot use it "
                              f"(`ltclip list recipes`)")
        layers.append((recipe.stages[stage], f"from --recipe {name}"))
    head = given.get("head", (layers[0][0] if layers else {}).get("head", MethodConfig.head))
    if head_defaults is not None:
        layers.append((head_defaults(head), f"for --head {head}"))
    resolved = dict(given)
    for options, origin in layers:
        for key, value in options.items():
            if key in resolved or any(key in pair and other in given for pair in ALTERNATIVES for other in pair if other != key):
                continue
            resolved[key] = value
            if say is not None:
                say(flag(key), f"{_shown(value)} {origin}")
    if recipe is not None:
        loss = resolved.get("loss", MethodConfig.loss)
        for key, lower in (("head_opts", recipe.head_opts[stage].get(head, ())), ("loss_opts", recipe.loss_opts.get(loss, ()))):
            if lower:
                resolved[key] = merge_opts(lower, given.get(key, ()))
                if say is not None:
                    say(flag(key[:-1]).replace("_", "-"), f"{' '.join(resolved[key])} from --recipe {name}")
    return resolved


# A toy cache of a few hundred rows (one step an epoch) would otherwise train hundreds of epochs,
# each validated and checkpointed: the default epochs grow by this factor at most.
MAX_LENGTHENING = 5


def head_defaults(entry, resolved: dict) -> tuple[dict, str | None]:
    """Head ``entry``'s train-head defaults for the run ``resolved`` (options from every other layer)
    describes, and why its epochs were lengthened (None if not).

    ``entry.loss_defaults[loss]`` replaces defaults for the loss trained with; when the cache's
    train split is readable, the default epochs grow to reach ``entry.min_steps`` optimizer steps
    (by at most ``MAX_LENGTHENING`` times).
    """
    out = {**entry.defaults, **entry.loss_defaults.get(resolved.get("loss", MethodConfig.loss), {})}
    chosen_length = {"epochs", "steps"} & resolved.keys()  # another layer's length wins: no need to read the cache
    rows = _train_rows(resolved.get("features")) if entry.min_steps and "epochs" in out and not chosen_length else None
    if not rows:
        return out, None
    from ..config import OptimConfig
    from ..engine import steps_per_epoch

    optim = OptimConfig(**{k: resolved[k] for k in ("batch_size", "accum") if k in resolved})
    per_epoch, base = steps_per_epoch(optim, rows), out["epochs"]
    epochs = min(MAX_LENGTHENING * base, max(base, math.ceil(entry.min_steps / per_epoch)))
    if epochs == base:
        return out, None
    out["epochs"] = epochs
    return out, (f"(its {base} epochs are {base * per_epoch} steps on {rows:,} rows; lengthened towards "
                 f"{entry.min_steps} steps, at most {MAX_LENGTHENING}×)")


def _train_rows(features) -> int | None:
    """Rows of ``features/train.h5``, or None where it cannot be read (the stage then says why)."""
    from ..artifacts.store import FeatureCache

    try:
        with FeatureCache(Path(features) / "train.h5") as cache:
            return cache.num_rows
    except (LtclipError, OSError, TypeError):
        return None


def _shown(value) -> str:
    return " ".join(value) if isinstance(value, tuple) else str(value).lower() if isinstance(value, bool) else str(value)


__all__ = ["RECIPE_DIR", "Recipe", "head_defaults", "layer_options", "list_recipes", "load_recipe", "merge_opts"]
