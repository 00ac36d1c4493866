"""``ltclip finetune``: an open_clip image encoder (tuned as ``--tune`` says) and a head, trained end to
end on images through the engine; the run stores the head and the encoder's trained entries only."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from ..config import FinetuneConfig, to_dict
from ..config.fields import check_values
from ..data.image_batches import ImageSource, eval_transform, image_batches, normalized_preprocess, train_transform
from ..data.device_decode import on_tensors
from ..data.registry import open_dataset
from ..data.views import CenterView, lift_resize, make_views
from ..artifacts.outputs import check_out_folder, dataset_inputs
from ..core.distributed import default_workers, setup
from ..core.lock import folder_lock
from ..engine import ParamGroups, RunEnv, ValidationStats, check_optim, fit, run_length, steps_per_epoch
from ..engine.plan import check_warmup
from ..methods.task import Task
from ..core.errors import LtclipError
from ..evaluation.metrics import average_views
from ..models.backbone import load_backbone
from ..models.encoder_classifier import EncoderClassifier, image_logits
from ..models.heads import HeadInputs, create_head, head_needs
from ..models.text import SINGLE_TEMPLATE, class_text_start
from ..models.text_prompts import text_encoder
from ..models.tuning import apply_tuning, count_trainable, no_weight_decay_names
from ..core.progress import Progress
from ..artifacts.runs import finetune_payload, method_record, write_run
from ..artifacts.store import shard_range
from .common import start_run


def new_encoder_classifier(cfg: FinetuneConfig, dataset, device, workers: int = 0):
    """The base encoder with the tuning mode applied, and a new head (a text-initialised head gets the
    class text embeddings, computed once in batches; a prompt head the backbone's own frozen text
    tower; a head starting from class means or a linear probe the training features of the frozen
    base encoder, one pass before tuning), seeded by ``cfg.optim.seed``."""
    backbone = load_backbone(cfg.model, cfg.pretrained, device=device, preprocess_from=cfg.preprocess_from)
    method = cfg.method
    needs = head_needs(method.head, method.head_opts)
    if needs.input == "pooled" and backbone.pooled_dim is None:
        raise LtclipError(f"--head-opt input=pooled: model {cfg.model} is not an open_clip ViT; use input=embeds")
    starts = training_features(backbone, dataset, needs.input, cfg, device, workers) if needs.train_features else None
    torch.manual_seed(cfg.optim.seed)
    apply_tuning(backbone.model, cfg.tuning.tune, dict(cfg.tuning.tune_opts), num_classes=dataset.num_classes)
    backbone.model.to(device)
    if cfg.tuning.grad_checkpointing:
        backbone.model.set_grad_checkpointing(True)
    embed_dim, token_shape = backbone.encode_dims()
    tower = text_encoder(backbone, dataset.classnames) if needs.text_encoder else None
    inputs = HeadInputs(dataset.num_classes, embed_dim, token_shape, head_text(backbone, dataset, needs, device), tower,
                        pooled_dim=backbone.pooled_dim, text_templates=needs.templates, train_features=starts)
    head = create_head(method.head, inputs, **method.head_opts)
    return backbone, EncoderClassifier(backbone, head).to(device)


def head_text(backbone, dataset, needs, device) -> torch.Tensor | None:
    """The class text embeddings a head starts from (None if it needs none): from the dataset's templates
    or LIFT's single one, mapped back through the projection for a head reading the pooled feature."""
    if not needs.text_embeds:
        return None
    templates = [SINGLE_TEMPLATE] if needs.templates == "single" else dataset.prompt_templates()
    return class_text_start(backbone, dataset.classnames, templates, needs.input == "pooled", device)


@torch.no_grad()
def training_features(backbone, dataset, input: str, cfg: FinetuneConfig, device, workers: int):
    """``(features [N, D], labels [N])`` of every training image: the frozen base encoder in eval mode, the
    evaluation transform (one centre view, no augmentation), float32: what LIFT fits its class-mean and
    linear-probe starts on (trainer.py: ``train_init_loader``, the model without its tuner)."""
    tf = eval_transform(backbone.preprocess, backbone.preprocess_cfg, cfg.normalize)
    rows = range(len(dataset.split("train")))
    features, labels = [], []
    for x, y in image_batches(dataset, "train", CenterView(tf), rows, cfg.optim.batch_size, workers, cfg.decode, device):
        x = x.flatten(0, 1).to(device)
        features.append(backbone.encode_pooled(x) if input == "pooled" else backbone.encode(x)[0])
        labels.append(y.to(device))
    return torch.cat(features).float(), torch.cat(labels).long()


def check_options(cfg: FinetuneConfig) -> None:
    """Every range and set of values the config's fields declare, then the options that depend on each other."""
    check_values(cfg)
    if cfg.tuning.tune == "frozen" and cfg.tuning.backbone_lr is not None:
        raise LtclipError("--backbone-lr: --tune frozen trains nothing in the encoder; drop it")


def score_images(model, dataset, split: str, views, batch_size: int, workers: int, device, precision: str, ctx,
                 decode: str = "cpu") -> ValidationStats:
    """Validation statistics of ``model`` on a split's images, each process scoring its contiguous share."""
    start, stop = shard_range(len(dataset.split(split)), ctx.rank, ctx.world_size)
    stats = ValidationStats(dataset.num_classes)
    batches = image_batches(dataset, split, views, range(start, stop), batch_size, workers, decode, device)
    for logits, labels in image_logits(model, batches, device, precision):
        stats.add(average_views(logits), labels)
    stats.all_reduce(ctx)
    return stats


def run_finetune(cfg: FinetuneConfig, progress: Progress | None = None, resume: bool = False) -> dict:
    """Train (or resume) an encoder + head on images; on several processes each takes its share of every batch."""
    progress = progress or Progress()
    check_options(cfg)
    ctx, device = setup(cfg.device)
    check_optim(cfg.optim, ctx.world_size)
    dataset = open_dataset(cfg.data)
    if cfg.val_split not in dataset.splits and cfg.val_split != FinetuneConfig.val_split:  # the default "val" is optional
        raise LtclipError(f"--val-split {cfg.val_split}: {dataset.name} has no such split; choose one of {', '.join(dataset.splits)}")
    check_warmup(cfg.optim, steps_per_epoch(cfg.optim, len(dataset.split("train")), ctx.world_size))
    check_out_folder(cfg.out, "finetune", dataset_inputs(dataset, cfg.data))
    with folder_lock(cfg.out, "finetune", ctx):
        return _train(cfg, dataset, ctx, device, progress, resume)


def _train(cfg: FinetuneConfig, dataset, ctx, device, progress: Progress, resume: bool) -> dict:
    """:func:`run_finetune`'s work, ``cfg.out`` held by this command."""
    val_split = cfg.val_split if cfg.val_split in dataset.splits else None
    workers = default_workers(ctx) if cfg.workers is None else cfg.workers
    backbone, model = new_encoder_classifier(cfg, dataset, device, workers)
    trainable = count_trainable(backbone.model)
    progress.log(f"{cfg.model}: --tune {cfg.tuning.tune} trains {trainable:,} encoder parameters; "
                 f"head {cfg.method.head} on {model.head.input}")
    if cfg.eval_resize is None:  # recorded as a number, so `ltclip eval RUN` views the test images the same way
        cfg = dataclasses.replace(cfg, eval_resize=lift_resize(backbone.preprocess_cfg))
    val_views = make_views("center", *normalized_preprocess(backbone.preprocess, backbone.preprocess_cfg, cfg.normalize),
                           resize=cfg.eval_resize, interpolation=cfg.interpolation)
    out = Path(cfg.out)
    read = [dataset.split(s) for s in dict.fromkeys(("train", val_split or "train"))]
    start_run(out, resume, to_dict(cfg), ctx, inputs={split.source: split.sha256 for split in read})
    counts = dataset.train_counts()
    epochs = run_length(cfg.optim, steps_per_epoch(cfg.optim, len(dataset.split("train").labels), ctx.world_size))[1]
    source = ImageSource(dataset, "train", train_transform(backbone.preprocess, backbone.preprocess_cfg, cfg.normalize, cfg.augment,
                                                           cfg.interpolation, cfg.train_crop, epochs),
                         seed=cfg.optim.seed, workers=workers, pin_memory=device.type == "cuda", decode=cfg.decode, device=device)
    for views in (source.images.views, val_views) if cfg.decode == "device" else ():  # refused before training
        on_tensors(views)  # if a step cannot run on tensors

    def validate(m):
        stats = score_images(m, dataset, val_split, val_views, cfg.optim.batch_size, workers, device,
                             cfg.optim.precision, ctx, cfg.decode)
        return stats.summary(counts)

    lrs = {"head": cfg.optim.lr}
    if trainable:
        lrs["backbone"] = cfg.tuning.backbone_lr or cfg.optim.lr
    result = fit(
        model, Task(cfg.method.loss, cfg.method.loss_opts, counts), source, cfg.optim,
        sampler=cfg.method.sampler, num_classes=dataset.num_classes, validate=validate if val_split else None,
        groups=ParamGroups(lrs=lrs, no_decay=tuple(f"backbone.{n}" for n in no_weight_decay_names(backbone.model))),
        env=RunEnv(out=out, resume=resume, device=device, ctx=ctx, progress=progress, tensorboard=cfg.tensorboard),
    )
    info = None
    if ctx.is_main:
        method = {**method_record(cfg.method), "tune": cfg.tuning.tune, "tune_opts": dict(cfg.tuning.tune_opts)}
        info = write_run(out, "finetune", finetune_payload(cfg, backbone, model, dataset.num_classes), {"backbone": backbone.identity,
                         "data": to_dict(cfg.data)}, np.asarray(counts), method=method, best=result.best,
                         dataset=dataset.name, epochs=result.epochs, steps=result.steps, processes=ctx.world_size,
                         encoder_trainable=trainable)
    ctx.barrier()
    return {"out": str(out), "best": result.best, "info": info}
