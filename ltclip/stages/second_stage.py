"""``ltclip train-head --from RUN``: a second stage (and/or post-hoc logit adjustment) on a finished
stage-1 run, trained through the engine on the run's penultimate features of the cache."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from ..config import SECOND_STAGE_OPTIM, SecondStageConfig, flag, to_dict
from ..recipes.resolve import saved_config
from ..artifacts.feature_batches import FeatureInputs
from ..artifacts.outputs import check_out_folder, run_folder_inputs
from ..core.distributed import setup
from ..core.lock import folder_lock
from ..engine import RunEnv, check_optim
from ..core.errors import LtclipError
from ..core.progress import Progress
from ..artifacts.runs import RunModel, features_input, load_run, model_payload, read_run_info, write_run
from ..methods.second_stage import TWO_STAGE, fit_two_stage
from .common import open_split, posthoc_tau, ram_budget, start_run, validate_on_cache


def _features_of(model: RunModel, inputs: FeatureInputs, batch_size: int, device) -> tuple[torch.Tensor, np.ndarray]:
    """Penultimate features of every row and view, flattened: ``[N·V, F]`` and labels repeated."""
    zs = []
    with torch.inference_mode():
        for x, _, _ in inputs.batches(np.arange(inputs.cache.num_rows), batch_size):
            zs.append(model.head.features(x.flatten(0, 1).to(device)).float().cpu())
    return torch.cat(zs), np.repeat(inputs.labels, inputs.views)


def check_options(cfg: SecondStageConfig) -> None:
    """Every option is used: a method that does not train takes no training option."""
    if not cfg.two_stage and not cfg.posthoc_la:
        raise LtclipError("--from RUN needs --two-stage METHOD and/or --posthoc-la")
    if cfg.two_stage and TWO_STAGE.get(cfg.two_stage).trains:
        return
    what = f"{cfg.two_stage} does not train" if cfg.two_stage else "--posthoc-la alone trains nothing"
    unused = [f.name for f in dataclasses.fields(cfg.optim) if getattr(cfg.optim, f.name) != getattr(SECOND_STAGE_OPTIM, f.name)]
    unused += [name for name in ("sampler", "loss") if getattr(cfg, name) is not None] + (["loss_opts"] if cfg.loss_opts else [])
    if unused:
        raise LtclipError(f"{what}: {', '.join(flag(n) for n in unused)} would have no effect; drop them")


def run_second_stage(cfg: SecondStageConfig, progress: Progress | None = None, resume: bool = False) -> dict:
    """cRT / LWS / tau-norm / DisAlign / MARC / NCM and post-hoc logit adjustment on a finished run."""
    progress = progress or Progress()
    check_options(cfg)
    check_out_folder(cfg.out, "second_stage", run_folder_inputs(cfg.from_run, read_run_info(cfg.from_run)))
    ctx, device = setup(cfg.device)
    check_optim(cfg.optim, ctx.world_size)
    with folder_lock(cfg.out, "train-head --from", ctx):
        return _train(cfg, ctx, device, progress, resume)


def _train(cfg: SecondStageConfig, ctx, device, progress: Progress, resume: bool) -> dict:
    """:func:`run_second_stage`'s work, ``cfg.out`` held by this command."""
    stage1 = load_run(cfg.from_run, device=device)
    features = Path(cfg.features) if cfg.features else stage1.features
    if features.resolve() != stage1.features.resolve():
        raise LtclipError(f"--features {features} differs from the first stage's {stage1.features}; omit --features")
    out = Path(cfg.out)
    start_run(out, resume, to_dict(cfg), ctx)
    counts = np.asarray(stage1.info["class_counts"])
    model, head = stage1.model, stage1.model.head
    max_ram = ram_budget(cfg.max_ram, ctx)
    val_cache = open_split(features, cfg.val_split, required=cfg.val_split != SecondStageConfig.val_split)  # the default is optional
    val = FeatureInputs(val_cache, head.input, max_ram, device) if val_cache is not None else None
    eval_batch = cfg.optim.batch_size * 2
    calibrated = None
    if cfg.two_stage:
        train = FeatureInputs(open_split(features, "train"), head.input, max_ram, device)
        z_train, y_train = _features_of(model, train, eval_batch, device)
        z_val, y_val = _features_of(model, val, eval_batch, device) if val is not None else (None, None)
        env = RunEnv(out=out, resume=resume, ctx=ctx, progress=progress, tensorboard=cfg.tensorboard)
        progress.log(f"{cfg.two_stage} on {len(y_train):,} cached features")
        calibrated = fit_two_stage(
            cfg.two_stage, classifier=head.classifier, z_train=z_train, y_train=y_train, class_counts=counts,
            z_val=z_val, y_val=y_val, optim=cfg.optim, sampler=cfg.sampler, loss=cfg.loss,
            loss_opts=dict(cfg.loss_opts) or None, device=device, env=env, **cfg.two_stage_opts,
        )
        model = RunModel(head, calibrated, None, counts).to(device)
    tau, extra = None, {}
    if cfg.posthoc_la:
        tau, extra["posthoc_tau_table"] = posthoc_tau(model, val, counts, eval_batch, device, cfg.val_split)
        model.tau = tau
        progress.log(f"post-hoc logit adjustment: tau={tau:g} (chosen on {cfg.val_split})")
    best = None
    if val is not None:
        best = {"epoch": None, **{f"val_{k}": v for k, v in validate_on_cache(model, val, counts, eval_batch, device, ctx).items()}}
    info = None
    if ctx.is_main:
        summary = calibrated.summary if calibrated is not None else {}
        method = {**stage1.info["method"], "two_stage": cfg.two_stage, "two_stage_opts": dict(cfg.two_stage_opts),
                  "two_stage_sampler": summary.get("sampler"), "two_stage_loss": summary.get("loss"), "posthoc_la": tau}
        info = write_run(out, "second_stage", model_payload(head, calibrated, tau), features_input(features), counts,
                         method=method, best=best, dataset=stage1.info.get("dataset"),
                         stage1=str(Path(cfg.from_run).resolve()), processes=ctx.world_size, **extra)
    ctx.barrier()
    return {"out": str(out), "best": best, "tau": tau, "info": info}


def load_second_stage_config(path: str | Path) -> SecondStageConfig:
    """A second-stage run's saved ``config.json`` as a config."""
    return saved_config(SecondStageConfig, json.loads(Path(path).read_text()))
