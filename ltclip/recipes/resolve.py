"""The values a stage runs with, chosen in one place.

Layers, each over the next: the options given (on the command line, or by ``--config``) > the
``--recipe`` > the head's defaults for its loss (stage 1: ``ltclip list heads``) or the second-stage
method's (``ltclip list two-stage``) > the config dataclass. Folders not given come from the
workspace (``./ltclip.toml``, ``runs/``). ``say(option, text)`` hears every value a lower layer
chose, with its reason; the config built is fully resolved (it is what the run saves).

Nothing here opens a cache: a head's minimum number of steps is recorded as ``min_steps`` and the
stage, which reads the cache anyway, lengthens the epochs (:func:`lengthened`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

from ..artifacts.workspace import RUNS_DIR, WORKSPACE_FILE, default_features_dir, default_run_dir, finished_runs, recorded_features, sweep_best
from ..config import DataConfig, EvalConfig, ExtractConfig, FinetuneConfig, MethodConfig, Options, SecondStageConfig, TrainHeadConfig, option_fields
from ..config.files import as_arguments, flag, flatten, from_flat
from ..config.sections import MAX_LENGTHENING
from ..core.errors import LtclipError
from . import load_recipe, merge_opts
from .choices import check_choices

Say = Callable[[str, str], None]
# Two ways to say one thing: a user who gives one of a pair overrides a lower layer's other one.
ALTERNATIVES = (("epochs", "steps"), ("warmup", "warmup_steps"))


def train_head_config(values: dict, *, say: Say | None = None, resume: bool = False):
    """``ltclip train-head``'s config: a second stage with ``--from RUN``, else stage 1 (with the
    workspace's cache and a new run folder where not given)."""
    values = workspace_features(values, say=say)
    if values.get("out") is None:
        values["out"] = str(default_run_dir(_run_name(values), resume))
        _tell(say, "--out", values["out"])
    return run_config(values, say=say)


def run_config(values: dict, *, say: Say | None = None):
    """A second stage's config when the values name ``--from RUN``, else stage 1's (also a sweep point's)."""
    return second_stage_config(values) if values.get("from_run") else stage_one_config(values, say=say)


def stage_one_config(values: dict, *, say: Say | None = None) -> TrainHeadConfig:
    """Stage 1's config: the values given over ``--recipe`` over the head's defaults (for its loss;
    with ``min_steps`` where no layer above chose the run's length) over the dataclass."""
    check_choices(TrainHeadConfig, values)
    others = layer_options("train-head", values)  # the head and loss its defaults depend on
    head = others.get("head", MethodConfig.head)
    own = head_defaults(head, others)
    resolved = layer_options("train-head", values, head_defaults=lambda _: own, say=say)
    check_choices(TrainHeadConfig, resolved)
    return checked(from_flat(TrainHeadConfig, parse_method_options(TrainHeadConfig, resolved),
                             owner="stage 1 (second-stage options need --from RUN)"), values)


def second_stage_config(values: dict) -> SecondStageConfig:
    """A second stage's config: the values given over the method's own defaults (``ltclip list
    two-stage``; not printed, like the dataclass's: the run's ``config.json`` holds them)."""
    from ..methods.second_stage import TWO_STAGE

    check_choices(SecondStageConfig, values)
    name = values.get("two_stage")
    resolved = parse_method_options(SecondStageConfig, {**(TWO_STAGE.get(name).defaults if name else {}), **values})
    return checked(from_flat(SecondStageConfig, resolved, owner="a second stage (--from RUN; head and features come from the run)"),
                   values)


def finetune_config(values: dict, *, say: Say | None = None, resume: bool = False) -> FinetuneConfig:
    """``ltclip finetune``'s config: the values given over ``--recipe`` over the dataclass; a new run
    folder where not given."""
    values = dict(values)
    check_choices(FinetuneConfig, values)
    if values.get("out") is None:
        _single_process_out()
        chosen, default = layer_options("finetune", values), FinetuneConfig(out="")
        parts = [chosen.get("tune", default.tuning.tune), *(chosen.get(k, getattr(default.method, k)) for k in ("head", "loss", "sampler"))]
        values["out"] = str(default_run_dir("-".join(["finetune", *parts]), resume))
        _tell(say, "--out", values["out"])
    resolved = layer_options("finetune", values, say=say)
    check_choices(FinetuneConfig, resolved)
    return checked(from_flat(FinetuneConfig, parse_method_options(FinetuneConfig, resolved), owner="finetune"), values)


def extract_config(values: dict, *, say: Say | None = None) -> ExtractConfig:
    """``ltclip extract``'s config: the values given over ``--recipe`` (its ``[extract]`` table) over the
    dataclass; the cache folder ``features/DATASET-MODEL-PRETRAINED`` where not given."""
    values = layer_options("extract", values, say=say) if values.get("recipe") is not None else dict(values)
    values["splits"] = tuple(s.strip() for item in values.get("splits") or () for s in item.split(",") if s.strip())
    if values.get("out") is None:
        defaults = ExtractConfig(out="")
        run = values.get("from_run")
        weights = (Path(run).name, "finetuned") if run else (values.get("model", defaults.model), values.get("pretrained", defaults.pretrained))
        values["out"] = str(default_features_dir(values.get("dataset", defaults.data.dataset), *weights))
        _tell(say, "--out", values["out"])
    return from_flat(ExtractConfig, values, owner="extract")


def eval_config(values: dict, *, say: Say | None = None) -> EvalConfig:
    """``ltclip eval``'s config: with no run given and no baseline asked for, the finished runs (and
    sweeps' ``best/`` runs) under ``runs/``; a sweep folder given is evaluated through its ``best/`` run;
    the workspace's cache for the baselines where ``--features`` is not given."""
    values = dict(values)
    baselines = values.get("zero_shot") or values.get("knn") or values.get("ncm")
    if not values.get("runs") and not baselines:
        values["runs"] = tuple(str(r) for r in finished_runs())
        if not values["runs"]:
            raise LtclipError(f"nothing to evaluate: no run folders given and no finished run under {RUNS_DIR}/")
        _tell(say, "runs", f"the {len(values['runs'])} finished runs under {RUNS_DIR}/")
    if values.get("runs"):
        missing = [run for run in values["runs"] if not Path(run).is_dir()]
        if missing:
            raise LtclipError(f"{missing[0]}: no such folder; name run folders from `ltclip train-head` or `ltclip finetune`"
                              f" (`ls {RUNS_DIR}/`)")
        values["runs"] = tuple(_sweep_as_run(run, say) for run in values["runs"])
    if values.get("features") is None and baselines and recorded_features() is not None:
        values["features"] = str(_recorded_features())
        _tell(say, "--features", f"{values['features']}, named by ./{WORKSPACE_FILE}")
    return from_flat(EvalConfig, values, owner="eval")


def _sweep_as_run(run: str, say: Say | None) -> str:
    """``run``, or the ``best/`` run of the sweep folder ``run`` names."""
    best = sweep_best(Path(run))
    if best is None:
        return run
    _tell(say, run, f"a sweep folder, evaluated through its best point's run {best}")
    return str(best)


def checked(cfg, values: dict):
    """Training config ``cfg`` once its optimizer settings can run (:func:`~ltclip.engine.check_optim`,
    ``--select`` among the validation metrics) and a warm-up given in ``values`` is no longer than
    the run where both are in one unit; before any model or data is loaded. (A warm-up in steps
    against a length in epochs waits for the rows: :func:`~ltclip.engine.plan.check_warmup`.)"""
    from ..engine import check_optim

    check_optim(cfg.optim, int(os.environ.get("WORLD_SIZE", "1")))
    optim = cfg.optim
    if values.get("warmup_steps") is not None and optim.steps is not None and optim.warmup_steps > optim.steps:
        raise LtclipError(f"--warmup-steps {optim.warmup_steps}: longer than the run's --steps {optim.steps}; "
                          f"give at most {optim.steps}")
    if values.get("warmup") is not None and optim.steps is None and optim.warmup > optim.epochs:
        raise LtclipError(f"--warmup {optim.warmup:g}: longer than the run's --epochs {optim.epochs}; give at most {optim.epochs}")
    return cfg


def workspace_features(values: dict, *, say: Say | None = None) -> dict:
    """``values`` with ``--features`` from ``./ltclip.toml`` where neither it nor ``--from RUN`` is given."""
    if values.get("from_run") or values.get("features") is not None:
        return values
    found = _recorded_features()
    _tell(say, "--features", f"{found}, named by ./{WORKSPACE_FILE}")
    return {**values, "features": str(found)}


def saved_config(cls, data: dict):
    """A config of class ``cls`` saved in a run (``config.json``) or a cache (``extract.json``); method
    options saved as ``key=value`` strings by earlier versions are parsed as the option would be."""
    values = flatten(data)
    return from_flat(cls, parse_method_options(cls, values), owner=f"{cls.__name__} (a saved config)")


def parse_method_options(cls, values: dict) -> dict:
    """``values`` with each method's ``key=value`` options (``--loss-opt gamma=0.5``) parsed, once,
    against the method they belong to into :class:`Options` typed like its defaults (``{"gamma":
    0.5}``); a loss's option values are also tried on the loss, so that values it refuses are
    reported before anything trains."""
    from ..methods.losses import parse_loss
    from .catalog import registry

    fields = option_fields(cls)
    out = dict(values)
    for name, (_, spec) in fields.items():
        raw = out.get(name)
        if not spec.choices_of or raw is None or isinstance(raw, Options):
            continue
        pairs = as_arguments(raw) if isinstance(raw, Mapping) else list(raw)
        entry = _entry(cls, out, spec.choices_of)
        if entry is None:
            if pairs:
                raise LtclipError(f"{flag(name, cls)} needs {flag(spec.choices_of, cls)} METHOD")
            out[name] = Options()
            continue
        kind = fields[spec.choices_of][1].choices
        out[name] = Options(parse_loss(entry, pairs) if kind == "losses" else registry(kind).parse(entry, pairs))
    return out


def _entry(cls, values: dict, name: str) -> str | None:
    """The method option ``name`` names: given, a second stage's own loss, or the config's default."""
    if values.get(name) is not None:
        return values[name]
    if cls is SecondStageConfig and name == "loss" and values.get("two_stage"):
        from ..methods.second_stage import TWO_STAGE

        return TWO_STAGE.get(values["two_stage"]).loss
    for f in dataclasses.fields(cls):
        section = f.default if dataclasses.is_dataclass(f.default) else None
        if section is not None and hasattr(section, name):
            return getattr(section, name)
        if f.name == name:
            return None if f.default is dataclasses.MISSING else f.default
    return None


def layer_options(stage: str, values: dict, *, head_defaults: Callable[[str], dict] | None = None,
                  say: Say | None = None) -> dict:
    """The option values ``stage`` trains with: ``values`` (given; may name a ``recipe``) over the
    recipe's options over ``head_defaults(head)``; ``recipe`` keeps the recipe's name (a record)."""
    given = {k: v for k, v in values.items() if k != "recipe" and v is not None}
    name = values.get("recipe")
    layers = []  # (options, origin), highest first below the given ones
    recipe = None
    if name is not None:
        recipe = load_recipe(name)
        if stage not in recipe.stages:
            raise LtclipError(f"--recipe {name}: a recipe for {', '.join(recipe.stages)}; {stage} cannot use it "
                              f"(`ltclip list recipes`)")
        dataset = values.get("dataset", DataConfig.dataset)
        layers.append((recipe.options(stage, dataset), f"from --recipe {name}"))
    head = given.get("head", (layers[0][0] if layers else {}).get("head", MethodConfig.head))
    if head_defaults is not None:
        layers.append((head_defaults(head), f"for --head {head}"))
    resolved = {**given, "recipe": name} if name is not None else dict(given)
    for options, origin in layers:
        for key, value in options.items():
            if key in resolved or any(key in pair and other in given for pair in ALTERNATIVES for other in pair if other != key):
                continue
            resolved[key] = value
            _tell(say, flag(key), f"{_shown(value)} {origin}")
    if recipe is not None and stage != "extract":  # extract trains nothing: no head or loss options
        loss = resolved.get("loss", MethodConfig.loss)
        for key, lower in (("head_opts", recipe.head_opts[stage].get(head, ())), ("loss_opts", recipe.loss_opts.get(loss, ()))):
            if lower:
                resolved[key] = merge_opts(lower, given.get(key, ()))
                _tell(say, flag(key), f"{' '.join(resolved[key])} from --recipe {name}")
    return resolved


def head_defaults(head: str, resolved: dict) -> dict:
    """Head ``head``'s train-head defaults for a run that the other layers' options ``resolved``
    describe: its own, those for the loss trained with, and its ``min_steps`` unless another layer
    chose the run's length."""
    from ..models.heads import training_defaults

    entry = training_defaults(head)
    out = {**entry.options, **entry.loss_options.get(resolved.get("loss", MethodConfig.loss), {})}
    if entry.min_steps and "epochs" in out and not {"epochs", "steps", "min_steps"} & resolved.keys():
        out["min_steps"] = entry.min_steps
    return out


def lengthened(cfg, rows: int):
    """``cfg`` (a stage-1 config) with its epochs grown towards ``cfg.min_steps`` optimizer steps on
    ``rows`` training rows (by at most ``MAX_LENGTHENING`` times) and ``min_steps`` spent, and why
    (None when nothing changed). A run lengthened k-fold (k whole) validates and checkpoints every
    k-th epoch (``eval_every_epochs`` × k): as often as its own epochs would, so its time is its steps'."""
    from ..engine import steps_per_epoch

    optim = cfg.optim
    if not cfg.min_steps or optim.steps is not None:
        return cfg, None
    per_epoch, base = steps_per_epoch(optim, rows), optim.epochs
    epochs = min(MAX_LENGTHENING * base, max(base, math.ceil(cfg.min_steps / per_epoch)))
    every = optim.eval_every_epochs * (epochs // base)
    spent = dataclasses.replace(cfg, min_steps=0, optim=dataclasses.replace(optim, epochs=epochs, eval_every_epochs=every))
    if epochs == base:
        return spent, None
    cadence = f", validated and checkpointed every {every} epochs (--eval-every-epochs {every})" if every > optim.eval_every_epochs else ""
    return spent, (f"{epochs} (its {base} epochs are {base * per_epoch} steps on {rows:,} rows; lengthened towards "
                   f"--min-steps {cfg.min_steps}, at most {MAX_LENGTHENING}×){cadence}")


def _run_name(values: dict) -> str:
    """``<head>-<loss>-<sampler>`` for stage 1, ``<stage-1 run>-<method>`` for a second stage."""
    _single_process_out()
    if values.get("from_run"):
        method = values.get("two_stage")
        return f"{Path(values['from_run']).name}-{method or 'la'}" + ("-la" if method and values.get("posthoc_la") else "")
    chosen = layer_options("train-head", values)
    return "-".join(chosen.get(k, getattr(MethodConfig, k)) for k in ("head", "loss", "sampler"))


def _single_process_out() -> None:
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise LtclipError("--out is required under torchrun (every process must write to the same folder)")


def _recorded_features() -> Path:
    """The cache ``./ltclip.toml`` names, which must exist."""
    found = recorded_features()
    if found is None:
        raise LtclipError(f"--features DIR is required (no ./{WORKSPACE_FILE} from `ltclip extract` here), or --from RUN for a second stage")
    if not found.is_dir():
        raise LtclipError(f"./{WORKSPACE_FILE} names the feature cache {found}, which does not exist; pass --features DIR, "
                          f"or rerun `ltclip extract` (it names its cache there)")
    return found


def _tell(say: Say | None, option: str, text: str) -> None:
    if say is not None:
        say(option, text)


def _shown(value) -> str:
    return " ".join(value) if isinstance(value, tuple) else str(value).lower() if isinstance(value, bool) else str(value)


__all__ = ["checked", "eval_config", "extract_config", "finetune_config", "head_defaults", "layer_options", "lengthened",
           "parse_method_options", "run_config", "saved_config", "second_stage_config", "stage_one_config", "train_head_config", "workspace_features"]
