"""``ltclip train-head``, stage 1: a head trained on a feature cache through the engine."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import TrainHeadConfig, to_dict
from ..recipes.resolve import lengthened, saved_config
from ..artifacts.feature_batches import FeatureInputs
from ..artifacts.outputs import check_out_folder, folder_input
from ..core.distributed import setup
from ..core.lock import folder_lock
from ..engine import RunEnv, check_optim, fit, steps_per_epoch
from ..engine.plan import check_warmup
from ..methods.task import Task
from ..models.heads import HeadInputs, create_head, head_needs
from ..models.text_prompts import load_text_encoder
from ..core.progress import Progress
from ..artifacts.runs import RunModel, features_input, method_record, model_payload, write_run
from .common import (CacheSource, block_order, check_pool_fits, open_split, posthoc_tau, ram_budget, read_ahead,
                     start_run, text_embeds, validate_on_cache)


def run_train_head(cfg: TrainHeadConfig, progress: Progress | None = None, resume: bool = False, say=None) -> dict:
    """Train (or resume) a head; on several processes (torchrun) each trains on its share of every batch.

    A ``cfg.min_steps`` lengthens the epochs for this cache's rows first (``say("--epochs", why)``
    hears it); the run's ``config.json`` holds the epochs trained.
    """
    progress = progress or Progress()
    if cfg.min_steps:
        with open_split(Path(cfg.features), "train") as cache:
            cfg, why = lengthened(cfg, cache.num_rows)
        if why and say is not None:
            say("--epochs", why)
    check_out_folder(cfg.out, "head", [folder_input(cfg.features, "the feature cache")])
    ctx, device = setup(cfg.device)
    check_optim(cfg.optim, ctx.world_size)
    with open_split(Path(cfg.features), "train") as cache:
        check_warmup(cfg.optim, steps_per_epoch(cfg.optim, cache.num_rows, ctx.world_size))
    with folder_lock(cfg.out, "train-head", ctx):
        return _train(cfg, ctx, device, progress, resume)


def _train(cfg: TrainHeadConfig, ctx, device, progress: Progress, resume: bool) -> dict:
    """:func:`run_train_head`'s work, ``cfg.out`` held by this command."""
    method, optim = cfg.method, cfg.optim
    out, features = Path(cfg.out), Path(cfg.features)
    blocks = block_order(cfg.read_blocks, cfg.shuffle_pool)
    train_cache = open_split(features, "train")
    val_cache = open_split(features, cfg.val_split, required=cfg.val_split != TrainHeadConfig.val_split)  # the default is optional
    counts = train_cache.class_counts()
    needs = head_needs(method.head, method.head_opts)
    text = None
    if needs.text_encoder:  # the text tower of the model the cache was extracted with
        text = load_text_encoder(train_cache.attrs, train_cache.classnames, f"--features {features / 'train.h5'}")
    torch.manual_seed(optim.seed)
    pooled = needs.input == "pooled"  # from extract --pooled: the feature, and text.h5's single-template start
    inputs = HeadInputs(train_cache.num_classes, train_cache.embed_dim, train_cache.token_shape,
                        text_embeds(features, train_cache.num_classes, needs.input) if needs.text_embeds else None, text,
                        pooled_dim=train_cache.pooled_dim, text_templates="single" if pooled else "ensemble")
    head = create_head(method.head, inputs, **method.head_opts).to(device)
    max_ram = ram_budget(cfg.max_ram, ctx)
    train = FeatureInputs(train_cache, head.input, max_ram, device)
    val = FeatureInputs(val_cache, head.input, max_ram, device) if val_cache is not None else None
    check_pool_fits(blocks, train)
    where = "in RAM" if train.in_ram else f"streamed from disk (larger than --max-ram {train.max_ram / 2**30:.1f} GiB)"
    progress.log(f"training inputs: {head.input} of {train_cache.num_rows:,} rows, {train.nbytes / 2**30:.2f} GiB, {where}")
    model = RunModel(head, class_counts=counts).to(device)
    start_run(out, resume, to_dict(cfg), ctx)
    eval_batch = optim.batch_size * 2
    source = CacheSource(train, optim.seed, read_ahead(blocks, optim.batch_size // optim.accum))
    result = fit(
        head, Task(method.loss, method.loss_opts, counts), source, optim, sampler=method.sampler, num_classes=train_cache.num_classes,
        validate=(lambda _: validate_on_cache(model, val, counts, eval_batch, device, ctx)) if val is not None else None,
        env=RunEnv(out=out, resume=resume, device=device, ctx=ctx, progress=progress, tensorboard=cfg.tensorboard,
                   block_order=blocks),
    )
    tau, extra = None, {}
    if cfg.posthoc_la:
        tau, extra["posthoc_tau_table"] = posthoc_tau(model, val, counts, eval_batch, device, cfg.val_split)
        progress.log(f"post-hoc logit adjustment: tau={tau:g} (chosen on {cfg.val_split})")
    info = None
    if ctx.is_main:
        info = write_run(
            out, "head", model_payload(head, tau=tau), features_input(features), counts,
            method=method_record(method, tau),
            best=result.best, dataset=train_cache.attrs.get("dataset"), epochs=result.epochs, steps=result.steps,
            inputs_in_ram=train.in_ram, processes=ctx.world_size, **extra,
        )
    ctx.barrier()
    return {"out": str(out), "best": result.best, "tau": tau, "info": info}


def load_train_config(path: str | Path) -> TrainHeadConfig:
    """A stage-1 run's saved ``config.json`` as a config (the same file reruns the same experiment)."""
    return saved_config(TrainHeadConfig, json.loads(Path(path).read_text()))
