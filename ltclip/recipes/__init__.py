"""Recipes and how a stage's values are chosen: named recipes as data, TOML files in this folder
(``ltclip list recipes``, ``--recipe NAME``), layered with the options given and the methods' own
defaults by :mod:`.resolve` (the registries whose names options take: :mod:`.choices`).

A recipe file has a ``summary``, a ``source``, one table per stage it is for (``[extract]``,
``[train-head]``, ``[finetune]``) of option values named as the stage's options, optional per-head options
(``[STAGE.head_opts]``, keyed by head name), per-dataset values (``[STAGE.dataset.NAME]``, e.g.
iNaturalist's longer training) and per-loss options (``[loss_opts]``, keyed by loss name, for every
stage). Head, dataset and loss entries apply when that head, dataset or loss is the one trained.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from ..config import flag
from ..core.errors import LtclipError

RECIPE_DIR = Path(__file__).resolve().parent
STAGES = ("extract", "train-head", "finetune")


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    source: str
    stages: dict  # stage -> {option: value}
    head_opts: dict  # stage -> {head: ("key=value", ...)}
    loss_opts: dict  # loss -> ("key=value", ...)
    datasets: dict  # stage -> {dataset: {option: value}}: a dataset's own values (iNaturalist's epochs)

    def options(self, stage: str, dataset: str) -> dict:
        """The recipe's option values for ``stage`` on ``dataset``: the stage's, under the dataset's own."""
        return {**self.stages[stage], **self.datasets[stage].get(dataset, {})}


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def load_recipe(name: str) -> Recipe:
    """Recipe ``name``, every option checked against the stage it is for; one-line errors otherwise."""
    names = list_recipes()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise LtclipError(f"--recipe {name!r}: unknown{hint}; choose one of {', '.join(names)} (`ltclip list recipes`)")
    from ..config.files import _toml  # the TOML reader configs use (tomllib, or tomli before 3.11)

    path = RECIPE_DIR / f"{name}.toml"
    data = _toml().loads(path.read_text(encoding="utf-8"))
    unknown = sorted(set(data) - {"summary", "source", "loss_opts", *STAGES})
    if unknown or not any(s in data for s in STAGES):
        raise LtclipError(f"recipe {path}: keys are summary, source, loss_opts and stage tables ({', '.join(STAGES)}); got {', '.join(unknown) or 'no stage'}")
    stages, head_opts, datasets = {}, {}, {}
    for stage in STAGES:
        if stage in data:
            options = dict(data[stage])
            head_opts[stage] = {head: tuple(opts) for head, opts in options.pop("head_opts", {}).items()}
            datasets[stage] = {name: _values(values) for name, values in options.pop("dataset", {}).items()}
            stages[stage] = _values(options)
    recipe = Recipe(name, data.get("summary", ""), data.get("source", ""), stages, head_opts,
                    {loss: tuple(opts) for loss, opts in data.get("loss_opts", {}).items()}, datasets)
    _check(recipe)
    return recipe


def _values(options: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def _check(recipe: Recipe) -> None:
    """Every option of the recipe is an option of its stage, every head/loss option parses (against the
    catalog's copy of the registries, so a recipe loads without torch)."""
    for stage, options in recipe.stages.items():
        for dataset in recipe.datasets[stage].values():
            options = {**options, **dataset}
        unknown = sorted(set(options) - stage_options(stage) | ({"head_opts", "loss_opts"} & set(options)))
        if unknown:
            raise LtclipError(f"recipe {recipe.name}: {', '.join(flag(k) for k in unknown)}: not an option of {stage} "
                              "(head_opts / loss_opts go in their tables)")
        for head, opts in recipe.head_opts[stage].items():
            _parse(recipe, "heads", "head_opts", head, opts)
    for loss, opts in recipe.loss_opts.items():
        _parse(recipe, "losses", "loss_opts", loss, opts)


def _parse(recipe: Recipe, kind: str, field: str, name: str, opts) -> None:
    """Parse the recipe's ``field`` options of method ``name`` (of ``kind``) as the command line's are."""
    from ..core.registry import parse_options
    from .catalog import names, option_defaults

    if name not in names(kind):
        raise LtclipError(f"recipe {recipe.name}: {field} for {name!r}, which is not one of the {kind} (`ltclip list {kind}`)")
    parse_options(flag(field), *option_defaults(kind, name), opts)


def stage_options(stage: str) -> set[str]:
    from ..config import ExtractConfig, FinetuneConfig, TrainHeadConfig, option_names

    return option_names({"extract": ExtractConfig, "train-head": TrainHeadConfig, "finetune": FinetuneConfig}[stage])


def merge_opts(lower, upper) -> tuple[str, ...]:
    """``key=value`` options of two layers, key by key: ``upper``'s win, order kept."""
    merged = {opt.partition("=")[0].strip(): opt for opt in lower}
    merged.update({opt.partition("=")[0].strip(): opt for opt in upper})
    return tuple(merged.values())


__all__ = ["RECIPE_DIR", "Recipe", "list_recipes", "load_recipe", "merge_opts", "stage_options"]
