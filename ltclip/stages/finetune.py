"""``ltclip finetune``: an open_clip image encoder (tuned as ``--tune`` says) and a head, trained end to
end on images through the engine; the run stores the head and the encoder's trained entries only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import FinetuneConfig, to_dict
from ..data.image_batches import NORMALIZATIONS, ImageSource, eval_transform, image_batches, train_transform
from ..data.registry import open_dataset
from ..data.views import CenterView
from ..core.distributed import default_workers, setup
from ..engine import ParamGroups, RunEnv, ValidationStats, check_optim, fit
from ..methods.task import Task
from ..core.errors import LtclipError
from ..evaluation.metrics import average_views
from ..models.backbone import load_backbone
from ..models.encoder_classifier import EncoderClassifier, image_logits
from ..models.heads import HeadInputs, create_head, head_needs
from ..models.text import text_classifier
from ..models.text_prompts import text_encoder
from ..models.tuning import apply_tuning, count_trainable, no_weight_decay_names
from ..core.progress import Progress
from ..artifacts.runs import finetune_payload, method_record, write_run
from ..artifacts.store import shard_range
from .common import start_run


def new_encoder_classifier(cfg: FinetuneConfig, dataset, device):
    """The base encoder with the tuning mode applied, and a new head (a text-initialised head gets the
    class text embeddings, computed once in batches; a prompt head the backbone's own frozen text
    tower), seeded by ``cfg.optim.seed``."""
    backbone = load_backbone(cfg.model, cfg.pretrained, device=device, preprocess_from=cfg.preprocess_from)
    torch.manual_seed(cfg.optim.seed)
    apply_tuning(backbone.model, cfg.tuning.tune, dict(cfg.tuning.tune_opts))
    backbone.model.to(device)
    if cfg.tuning.grad_checkpointing:
        backbone.model.set_grad_checkpointing(True)
    embed_dim, token_shape = backbone.encode_dims()
    method = cfg.method
    needs, text = head_needs(method.head, method.head_opts), None
    if needs.text_embeds:
        text = torch.from_numpy(text_classifier(backbone, dataset.classnames, dataset.prompt_templates(), device=device))
    tower = text_encoder(backbone, dataset.classnames) if needs.text_encoder else None
    head = create_head(method.head, HeadInputs(dataset.num_classes, embed_dim, token_shape, text, tower), **method.head_opts)
    return backbone, EncoderClassifier(backbone, head).to(device)


def check_options(cfg: FinetuneConfig) -> None:
    if cfg.normalize not in NORMALIZATIONS:
        raise LtclipError(f"--normalize {cfg.normalize!r}: choose one of {', '.join(NORMALIZATIONS)}")
    if cfg.tuning.backbone_lr is not None and not cfg.tuning.backbone_lr > 0:
        raise LtclipError(f"--backbone-lr {cfg.tuning.backbone_lr}: must be positive")
    if cfg.tuning.tune == "frozen" and cfg.tuning.backbone_lr is not None:
        raise LtclipError("--backbone-lr: --tune frozen trains nothing in the encoder; drop it")


def score_images(model, dataset, split: str, views, batch_size: int, workers: int, device, precision: str, ctx) -> ValidationStats:
    """Validation statistics of ``model`` on a split's images, each process scoring its contiguous share."""
    start, stop = shard_range(len(dataset.split(split)), ctx.rank, ctx.world_size)
    stats = ValidationStats(dataset.num_classes)
    for logits, labels in image_logits(model, image_batches(dataset, split, views, range(start, stop), batch_size, workers),
                                       device, precision):
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
    val_split = cfg.val_split if cfg.val_split in dataset.splits else None
    backbone, model = new_encoder_classifier(cfg, dataset, device)
    workers = default_workers(ctx) if cfg.workers is None else cfg.workers
    trainable = count_trainable(backbone.model)
    progress.log(f"{cfg.model}: --tune {cfg.tuning.tune} trains {trainable:,} encoder parameters; "
                 f"head {cfg.method.head} on {model.head.input}")
    out = Path(cfg.out)
    start_run(out, resume, to_dict(cfg), ctx)
    counts = dataset.train_counts()
    eval_tf = eval_transform(backbone.preprocess, backbone.preprocess_cfg, cfg.normalize)
    source = ImageSource(dataset, "train", train_transform(backbone.preprocess, backbone.preprocess_cfg, cfg.normalize, cfg.augment),
                         seed=cfg.optim.seed, workers=workers, pin_memory=device.type == "cuda")

    def validate(m):
        stats = score_images(m, dataset, val_split, CenterView(eval_tf), cfg.optim.batch_size, workers, device,
                             cfg.optim.precision, ctx)
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
        info = write_run(out, "finetune", finetune_payload(cfg, backbone, model), {"backbone": backbone.identity,
                         "data": to_dict(cfg.data)}, np.asarray(counts), method=method, best=result.best,
                         dataset=dataset.name, epochs=result.epochs, steps=result.steps, processes=ctx.world_size,
                         encoder_trainable=trainable)
    ctx.barrier()
    return {"out": str(out), "best": result.best, "info": info}
