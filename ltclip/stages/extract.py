"""``ltclip extract``: run the frozen backbone once over every split; write the feature cache."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..atomic import save_json
from ..config import ExtractConfig, provenance, to_dict
from ..data.images import ImageSplit, apply_bad_image_policy, check_bad_images, worker_init
from ..data.registry import open_dataset
from ..data.views import make_views
from ..distributed import autocast, available_cpus, default_workers, setup
from ..errors import LtclipError
from ..models.backbone import load_backbone
from ..models.text import text_classifier
from ..progress import Progress
from ..store import (
    FeatureCache, FeatureWriter, amend_attribute, join_shards, load_text_embeddings, save_text_embeddings, shard_path,
)

log = logging.getLogger(__name__)


def _views_for(cfg: ExtractConfig, split: str, backbone):
    if split == "train" and cfg.train_views > 0:
        return make_views("train", backbone.preprocess, backbone.preprocess_cfg, count=cfg.train_views, seed=cfg.seed)
    return make_views("center" if split == "train" else cfg.test_views, backbone.preprocess, backbone.preprocess_cfg)


def _fetch(loader, single_thread: bool):
    """Iterate ``loader``; decoding in this process (no workers) runs on one intra-op thread.

    Per-image preprocessing ops are small: split across threads they mostly wait on each other
    when the CPU is busy (measured 7–40× slower under load, equal when idle).
    """
    it = iter(loader)
    while True:
        threads = torch.get_num_threads()
        if single_thread:
            torch.set_num_threads(1)
        try:
            batch = next(it, None)
        finally:
            torch.set_num_threads(threads)
        if batch is None:
            return
        yield batch


def _workers(asked: int | None, ctx) -> int:
    """``--workers``, or this process's share of the CPUs; more than the CPUs is warned about once."""
    if asked is None:
        return default_workers(ctx)
    if asked > available_cpus():
        log.warning("--workers %d: more than the %d CPUs this process may use; decoding may be slower", asked, available_cpus())
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)  # said above
    return asked


def _backbone(cfg: ExtractConfig, device):
    """The frozen encoder: ``--model``/``--pretrained``, or a finetuned run's (``--from-run``)."""
    if cfg.from_run is None:
        return load_backbone(cfg.model, cfg.pretrained, device=device, preprocess_from=cfg.preprocess_from)
    defaults = ExtractConfig(out="")
    given = [f"--{k.replace('_', '-')}" for k in ("model", "pretrained", "preprocess_from") if getattr(cfg, k) != getattr(defaults, k)]
    if given:
        raise LtclipError(f"{', '.join(given)}: the encoder comes from --from-run {cfg.from_run}; drop them")
    from ..runs import finetuned_backbone

    backbone = finetuned_backbone(cfg.from_run, device)
    backbone.model.requires_grad_(False).eval()
    return backbone


def _out_dir(out: str) -> Path:
    """``--out``, created if missing; a folder that cannot be made is a one-line error."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LtclipError(f"--out {out}: cannot create the folder ({err.strerror}); choose a writable folder") from None
    return path


def _complete(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        with FeatureCache(path, allow_incomplete=True) as cache:
            return cache.complete
    except LtclipError:
        return False


def _extract_split(cfg, dataset, split, backbone, device, ctx, out: Path, progress: Progress) -> dict:
    """Write (or resume) one split's cache; with several ranks, each writes a shard and rank 0 joins."""
    final = out / f"{split}.h5"
    rows = dataset.split(split)
    views = _views_for(cfg, split, backbone)
    embed_dim, token_shape = backbone.encode_dims()
    attrs = {
        **{k: v for k, v in backbone.identity.items()},
        "dataset": dataset.name,
        "split": split,
        "manifest": rows.source,
        "manifest_sha256": rows.sha256,
        "views_description": views.description,
        "tokens_stored": bool(cfg.tokens),
        "bad_images": cfg.bad_images,
    }
    if _complete(final):
        with FeatureCache(final) as cache:  # read-only: a finished cache is never reopened for writing
            same = dict(attrs)
            if cfg.bad_images == "skip" and cache.attrs.get("bad_images") == "fail":
                del same["bad_images"]  # no image was unreadable: what skip would have written
            cache.expect(**same, num_rows=len(rows), views=views.count)
            if cfg.tokens != cache.has_tokens:
                raise LtclipError(f"{final} was made with{'out' if cfg.tokens else ''} tokens; pass another --out or delete it")
        return {"split": split, "rows": len(rows), "written": 0, "status": "up to date"}
    if cfg.bad_images == "skip":  # resuming a file a bad image stopped under --bad-images fail (as its error advises)
        amend_attribute(shard_path(final, ctx.rank) if ctx.enabled else final, "bad_images", "fail", "skip")
    writer = FeatureWriter.open(
        final, num_rows=len(rows), embed_dim=embed_dim, block_size=cfg.block_size, attrs=attrs,
        labels=rows.labels, classnames=dataset.classnames, paths=rows.keys,
        token_shape=token_shape if cfg.tokens else None, views=views.count,
        shard=(ctx.rank, ctx.world_size) if ctx.enabled else None,
    )
    skipped = []
    with writer:
        pending = writer.pending_blocks()
        local_rows = [r for b in pending for r in range(*writer.block_range(b))]
        todo = ImageSplit(dataset, split, views, [writer.row_start + r for r in local_rows])
        loader = DataLoader(
            todo, batch_size=cfg.batch_size, num_workers=cfg.workers, pin_memory=device.type == "cuda",
            persistent_workers=False, shuffle=False, worker_init_fn=worker_init,
        )
        block_iter = iter(pending)
        block = next(block_iter, None)
        buf_e = buf_t = None
        filled = 0
        with progress.task(f"{split} ({len(todo):,} images)", len(todo), "img") as advance, torch.inference_mode(), autocast(device, cfg.precision):
            for images, _, row_ids, problems in _fetch(loader, single_thread=cfg.workers == 0):
                ok = torch.tensor(apply_bad_image_policy(cfg.bad_images, problems))
                b, v = images.shape[:2]
                x = images.flatten(0, 1).to(device, non_blocking=True)
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                emb, tok = backbone.encode(x, tokens=cfg.tokens)
                emb = emb.to(torch.float16).view(b, v, -1).cpu().numpy()
                tok = None if tok is None else tok.to(torch.float16).view(b, v, *tok.shape[1:]).cpu().numpy()
                if not ok.all():  # skipped images: zero features, rows listed in the summary
                    emb[~ok.numpy()] = 0
                    if tok is not None:
                        tok[~ok.numpy()] = 0
                    skipped.extend(int(r) for r, good in zip(row_ids, ok) if not good)
                start = 0
                while start < b:  # rows arrive in order; cut them into the writer's blocks
                    lo, hi = writer.block_range(block)
                    if buf_e is None:
                        buf_e = np.empty((hi - lo, v, emb.shape[-1]), np.float16)
                        buf_t = None if tok is None else np.empty((hi - lo, v, *tok.shape[2:]), np.float16)
                    take = min(hi - lo - filled, b - start)
                    buf_e[filled : filled + take] = emb[start : start + take]
                    if buf_t is not None:
                        buf_t[filled : filled + take] = tok[start : start + take]
                    filled += take
                    start += take
                    if filled == hi - lo:
                        squeeze = (lambda a: a[:, 0]) if v == 1 else (lambda a: a)
                        writer.write_block(block, squeeze(buf_e), None if buf_t is None else squeeze(buf_t))
                        block, buf_e, buf_t, filled = next(block_iter, None), None, None, 0
                advance(b)
        writer.finalise()
    if skipped:
        log.warning("%s: %d unreadable images were skipped (zero features): rows %s", split, len(skipped), skipped[:20])
    ctx.barrier()
    if ctx.enabled and ctx.is_main:
        join_shards([shard_path(final, r) for r in range(ctx.world_size)], final)
    ctx.barrier()
    return {"split": split, "rows": len(rows), "written": len(todo), "skipped": skipped, "status": "written"}


def _text_file(cfg, dataset, backbone, device, out: Path, progress: Progress) -> dict:
    path = out / "text.h5"
    templates = dataset.prompt_templates()
    attrs = {**backbone.identity, "dataset": dataset.name}
    if path.exists():
        old = load_text_embeddings(path)
        if old.classnames == dataset.classnames and old.templates == templates and all(
            str(old.attrs.get(k)) == str(v) for k, v in attrs.items()
        ):
            return {"split": "text", "rows": len(templates) * dataset.num_classes, "status": "up to date"}
    with progress.task(f"text ({dataset.num_classes:,} classes × {len(templates)} templates)", dataset.num_classes, "cls") as advance:
        weights = text_classifier(backbone, dataset.classnames, templates, device=device, progress=advance)
    save_text_embeddings(path, weights, dataset.classnames, templates, attrs)
    return {"split": "text", "rows": dataset.num_classes, "status": "written"}


def run_extract(cfg: ExtractConfig, progress: Progress | None = None) -> dict:
    """Extract every requested split (resumable), then the class text embeddings. Returns a summary."""
    progress = progress or Progress()
    dataset = open_dataset(cfg.data)
    splits = cfg.splits or tuple(dataset.splits)
    for split in splits:
        dataset.split(split)  # refuse unknown splits before any work
    if cfg.batch_size < 1 or cfg.block_size < 1 or (cfg.workers is not None and cfg.workers < 0):
        raise LtclipError("--batch-size and --block-size must be >= 1 and --workers >= 0")
    check_bad_images(cfg.bad_images)
    out = _out_dir(cfg.out)  # before the model loads: an unwritable --out is refused at once
    ctx, device = setup(cfg.device)
    saved_cfg, cfg = cfg, dataclasses.replace(cfg, workers=_workers(cfg.workers, ctx))
    autocast(device, cfg.precision)  # refuse a precision the device lacks before any work
    backbone = _backbone(cfg, device)
    if cfg.tokens and not backbone.has_tokens:
        raise LtclipError(f"--tokens: {cfg.model} is not an open_clip ViT, so it has no token sequence; pass --no-tokens")
    if device.type == "cuda":
        backbone.model.to(memory_format=torch.channels_last)
    results = [_extract_split(cfg, dataset, s, backbone, device, ctx, out, progress) for s in splits]
    if ctx.is_main:
        results.append(_text_file(cfg, dataset, backbone, device, out, progress))
        save_json(out / "extract.json", {"config": to_dict(saved_cfg), "provenance": provenance(), "identity": backbone.identity})
    return {"out": str(out), "splits": results, "identity": backbone.identity}
