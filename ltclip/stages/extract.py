"""``ltclip extract``: run the frozen backbone once over every split; write the feature cache."""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..artifacts.outputs import CACHE_RECORD, check_out_folder, dataset_inputs, run_folder_inputs
from ..core.atomic import save_json
from ..core.lock import folder_lock, missing_folders, remove_empty
from ..config import ExtractConfig, provenance, to_dict
from ..config.fields import check_values
from ..data.image_batches import normalized_preprocess
from ..data.device_decode import image_loader, on_tensors
from ..data.images import apply_bad_image_policy
from ..data.registry import open_dataset
from ..data.views import make_views
from ..core.distributed import autocast, available_cpus, default_workers, setup
from ..core.errors import LtclipError
from ..models.backbone import load_backbone
from ..models.text import SINGLE_TEMPLATE, class_text_start, text_classifier
from ..core.progress import Progress
from ..artifacts.store import (
    BlockWriter, EncodedTokens, FeatureCache, FeatureWriter, PcaFit, TokenFormat, amend_attribute, join_shards,
    load_text_embeddings, save_text_embeddings, shard_path,
)
from ..artifacts.store.tokens import pool_tokens

log = logging.getLogger(__name__)


def _views_for(cfg: ExtractConfig, split: str, backbone):
    if split == "train" and cfg.train_views > 0:
        return make_views("train", backbone.preprocess, backbone.preprocess_cfg, count=cfg.train_views, seed=cfg.seed,
                          interpolation=cfg.interpolation)
    if split == "train":
        return make_views("center", backbone.preprocess, backbone.preprocess_cfg)
    return make_views(cfg.test_views, backbone.preprocess, backbone.preprocess_cfg, resize=cfg.eval_resize,
                      interpolation=cfg.interpolation)


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
    """The frozen encoder: ``--model``/``--pretrained``, or a finetuned run's (``--from-run``), its
    preprocessing normalised as ``--normalize`` says (a finetuned run's: as it was trained)."""
    if cfg.from_run is None:
        backbone = load_backbone(cfg.model, cfg.pretrained, device=device, preprocess_from=cfg.preprocess_from)
        return _normalized(backbone, cfg.normalize)
    defaults = ExtractConfig(out="")
    given = [f"--{k.replace('_', '-')}" for k in ("model", "pretrained", "preprocess_from") if getattr(cfg, k) != getattr(defaults, k)]
    if given:
        raise LtclipError(f"{', '.join(given)}: the encoder comes from --from-run {cfg.from_run}; drop them")
    from ..artifacts.runs import finetuned_backbone

    backbone = finetuned_backbone(cfg.from_run, device)
    backbone.model.requires_grad_(False).eval()
    trained = backbone.identity.get("normalize", "model")
    if cfg.normalize != defaults.normalize and cfg.normalize != trained:
        raise LtclipError(f"--normalize {cfg.normalize}: the run {cfg.from_run} was trained with --normalize {trained}; drop it")
    return _normalized(backbone, trained)


def _normalized(backbone, normalize: str):
    """``backbone`` whose preprocessing (and the mean/std the crop views use) is ``normalize``'s:
    the finetune stage's own evaluation transform (:func:`eval_transform`)."""
    backbone.preprocess, backbone.preprocess_cfg = normalized_preprocess(backbone.preprocess, backbone.preprocess_cfg, normalize)
    backbone.normalize = normalize
    return backbone


@contextmanager
def _out_dir(out: str) -> Iterator[Path]:
    """``--out``, created if missing (a folder that cannot be made is a one-line error); the folders
    this made are removed again if nothing was written there (a model that could not load)."""
    path = Path(out)
    made = missing_folders(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LtclipError(f"--out {out}: cannot create the folder ({err.strerror}); choose a writable folder") from None
    try:
        yield path
    finally:
        remove_empty(made)


def _check_out(cfg: ExtractConfig, dataset) -> None:
    """``--out`` may sit beside the images (even inside the data root: features kept with a dataset), but
    not be the data root itself, a folder of its images, a split or class-name file, or a run."""
    inputs = dataset_inputs(dataset, cfg.data)
    if cfg.from_run is not None:
        from ..artifacts.runs import read_run_info

        inputs += run_folder_inputs(cfg.from_run, read_run_info(cfg.from_run))
    check_out_folder(cfg.out, "cache", inputs)


RECORDED = ("block_size", "precision")  # shape the stored files; no file attribute records them all


def _check_recorded(cfg: ExtractConfig, out: Path) -> None:
    """A rerun into a cache keeps the options its ``extract.json`` recorded (else the record would lie)."""
    path = out / CACHE_RECORD
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text()).get("config", {})
    except ValueError:
        raise LtclipError(f"{path}: not valid JSON; delete it (the .h5 files are checked on their own) and rerun") from None
    for name in RECORDED:
        if name in saved and saved[name] != getattr(cfg, name):
            flag = f"--{name.replace('_', '-')}"
            raise LtclipError(f"{flag} {getattr(cfg, name)}: the cache {out} was written with {flag} {saved[name]} "
                              f"({CACHE_RECORD}); pass {flag} {saved[name]} or another --out")


def _complete(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        with FeatureCache(path, allow_incomplete=True) as cache:
            return cache.complete
    except LtclipError:
        return False


def _token_format(cfg: ExtractConfig) -> TokenFormat:
    """The token format the ``--token-*`` options ask for; refused without stored tokens."""
    fmt = TokenFormat.from_options(cfg.token_pool, cfg.token_dtype, cfg.token_scale, cfg.token_pca)
    if not cfg.tokens and fmt != TokenFormat():
        raise LtclipError("--token-pool/--token-dtype/--token-scale/--token-pca shape the stored tokens; drop them or drop --no-tokens")
    if cfg.token_pca_sample < 1:
        raise LtclipError(f"--token-pca-sample {cfg.token_pca_sample}: must be >= 1")
    if not fmt.pca and cfg.token_pca_sample != ExtractConfig(out="").token_pca_sample:
        raise LtclipError("--token-pca-sample sizes the PCA fit: pass --token-pca W too, or drop it")
    return fmt


def _stored_basis(out: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The PCA basis of a cache file (finished, unfinished or a shard) already in ``out``, if any."""
    for path in sorted(out.glob("*.h5")):
        try:
            with FeatureCache(path, allow_incomplete=True) as cache:
                if cache.codec is not None and cache.codec.basis is not None:
                    return cache.codec.basis
        except LtclipError:
            continue
    return None


def _token_basis(cfg, fmt: TokenFormat, dataset, backbone, device, ctx, out: Path, progress: Progress):
    """The folder's PCA basis: the one its files already hold, else fitted (by rank 0, shared with
    the others) on the pooled tokens of ``--token-pca-sample`` seeded train images, model preprocessing."""
    if not fmt.pca:
        return None
    basis = _stored_basis(out)
    if basis is None and ctx.is_main:
        if "train" not in dataset.splits:
            raise LtclipError(f"--token-pca fits its basis on train images, but {dataset.name} has no train split")
        count = len(dataset.split("train"))
        sample = np.sort(np.random.default_rng(cfg.seed).permutation(count)[: cfg.token_pca_sample]).tolist()
        loader = image_loader(dataset, "train", make_views("center", backbone.preprocess, backbone.preprocess_cfg), sample,
                              batch_size=cfg.batch_size, workers=cfg.workers, decode=cfg.decode, device=device)
        fit = PcaFit(backbone.encode_dims()[1][1])
        with progress.task(f"PCA basis ({len(sample):,} train images)", len(sample), "img") as advance, \
                torch.inference_mode(), autocast(device, cfg.precision):
            for x, _, _, problems in _fetch(loader, single_thread=cfg.workers == 0):
                _, tok = backbone.encode(x.flatten(0, 1).to(device), tokens=True)
                good = torch.tensor([not p for p in problems], device=tok.device)
                fit.add(pool_tokens(tok.float()[good], fmt.pool))
                advance(len(x))
        basis = fit.basis(fmt.pca)
    if ctx.enabled:
        shared = [basis]
        torch.distributed.broadcast_object_list(shared, src=0)
        basis = shared[0]
    return basis


def _split_attrs(cfg, dataset, split: str, rows, views, backbone) -> dict:
    """What identifies one split's features: the model, the images and how they were read. Every
    split of the folder records its normalisation and the val/test view (``eval_view``), which
    the files of one folder must share (:data:`SHARED_IDENTITY`)."""
    return {
        **backbone.identity,
        "dataset": dataset.name,
        "split": split,
        "manifest": rows.source,
        "manifest_sha256": rows.sha256,
        "views_description": views.description,
        "normalize": backbone.normalize,
        "eval_view": _views_for(cfg, "test", backbone).geometry,
        "tokens_stored": bool(cfg.tokens),
        "bad_images": cfg.bad_images,
    }


def _check_finished(cfg, final: Path, attrs: dict, num_rows: int, views, fmt: TokenFormat) -> None:
    """Refuse a finished cache made for other features than this run's."""
    with FeatureCache(final) as cache:  # read-only: a finished cache is never reopened for writing
        first = ("normalize", "eval_view")  # named before the views_description they are part of
        same = {**{k: attrs[k] for k in first}, **attrs}
        if cfg.bad_images == "skip" and cache.attrs.get("bad_images") == "fail":
            del same["bad_images"]  # no image was unreadable: what skip would have written
        if "normalize" not in cache.attrs:  # a cache from before it was recorded: the model's normalisation
            if same["normalize"] != "model":
                raise LtclipError(f"{final} was made with normalize='model' but this run uses normalize={same['normalize']!r}; "
                                  "pass another --out or delete it")
            del same["normalize"]
        if "eval_view" not in cache.attrs:  # likewise: its views_description names its views
            del same["eval_view"]
        cache.expect(**same, num_rows=num_rows, views=views.count)
        if cfg.tokens != cache.has_tokens:
            raise LtclipError(f"{final} was made with{'out' if cfg.tokens else ''} tokens; pass another --out or delete it")
        if cfg.pooled and not cache.has_pooled:
            raise LtclipError(f"{final} was made without --pooled; pass another --out or delete it")
        if cfg.tokens and cache.token_format != fmt:
            raise LtclipError(f"{final} stores tokens as {cache.token_format.describe()}, this run asks for "
                              f"{fmt.describe()}; pass another --out or delete it")


def _encode(backbone, images, ok, device, tokens: bool, codec,
            pooled: bool = False) -> tuple[np.ndarray, EncodedTokens | None, np.ndarray | None]:
    """A batch's rows as stored: float16 embeds (b, V, D), encoded tokens and (``--pooled``) float16
    pre-projection features (b, V, W); unread images are zeros."""
    b, v = images.shape[:2]
    x = images.flatten(0, 1).to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    if pooled:
        emb, pool, tok = backbone.encode_with_pooled(x, tokens=tokens)
    else:
        (emb, tok), pool = backbone.encode(x, tokens=tokens), None
    bad = ~ok.to(emb.device)  # skipped images: zero features (before encoding), rows listed in the summary
    embeds = emb.view(b, v, -1).masked_fill(bad.view(b, 1, 1), 0).to(torch.float16).cpu().numpy()
    if pool is not None:
        pool = pool.view(b, v, -1).masked_fill(bad.view(b, 1, 1), 0).to(torch.float16).cpu().numpy()
    if tok is None:
        return embeds, None, pool
    tok = tok.view(b, v, *tok.shape[1:]).masked_fill(bad.view(b, 1, 1, 1), 0)
    return embeds, codec.encode(tok), pool  # encoded on the model's device: only the stored bytes cross to the CPU


def _write_rows(cfg, dataset, split: str, views, backbone, device, writer: FeatureWriter,
                progress: Progress) -> tuple[int, list[int]]:
    """Compute the rows of the blocks ``writer`` still lacks and feed them to the store; returns how
    many images were read and the rows of those that could not be (zero features)."""
    blocks = BlockWriter(writer)
    todo = blocks.pending_rows()
    loader = image_loader(dataset, split, views, todo, batch_size=cfg.batch_size, workers=cfg.workers, decode=cfg.decode,
                          device=device, pin_memory=device.type == "cuda")
    skipped = []
    with progress.task(f"{split} ({len(todo):,} images)", len(todo), "img") as advance, torch.inference_mode(), autocast(device, cfg.precision):
        for images, _, row_ids, problems in _fetch(loader, single_thread=cfg.workers == 0):
            ok = torch.tensor(apply_bad_image_policy(cfg.bad_images, problems))
            embeds, tokens, pooled = _encode(backbone, images, ok, device, cfg.tokens, writer.codec, cfg.pooled)
            if not ok.all():
                skipped.extend(int(r) for r, good in zip(row_ids, ok) if not good)
            blocks.add(row_ids, embeds, tokens, pooled)
            advance(len(images))
    return len(todo), skipped


def _extract_split(cfg, dataset, split, backbone, device, ctx, out: Path, progress: Progress, fmt: TokenFormat,
                   basis) -> dict:
    """Write (or resume) one split's cache; with several ranks, each writes a shard and rank 0 joins."""
    final = out / f"{split}.h5"
    rows = dataset.split(split)
    views = _views_for(cfg, split, backbone)
    embed_dim, token_shape = backbone.encode_dims()
    attrs = _split_attrs(cfg, dataset, split, rows, views, backbone)
    if _complete(final):
        _check_finished(cfg, final, attrs, len(rows), views, fmt)
        return {"split": split, "rows": len(rows), "written": 0, "status": "up to date"}
    if cfg.bad_images == "skip":  # resuming a file a bad image stopped under --bad-images fail (as its error advises)
        amend_attribute(shard_path(final, ctx.rank) if ctx.enabled else final, "bad_images", "fail", "skip")
    writer = FeatureWriter.open(
        final, num_rows=len(rows), embed_dim=embed_dim, block_size=cfg.block_size, attrs=attrs,
        labels=rows.labels, classnames=dataset.classnames, paths=rows.keys,
        token_shape=token_shape if cfg.tokens else None, token_format=fmt, token_basis=basis, views=views.count,
        pooled_dim=backbone.pooled_dim if cfg.pooled else None,
        shard=(ctx.rank, ctx.world_size) if ctx.enabled else None,
    )
    with writer:
        written, skipped = _write_rows(cfg, dataset, split, views, backbone, device, writer, progress)
        writer.finalise()
    if skipped:
        log.warning("%s: %d unreadable images were skipped (zero features): rows %s", split, len(skipped), skipped[:20])
    ctx.barrier()
    if ctx.enabled and ctx.is_main:
        join_shards([shard_path(final, r) for r in range(ctx.world_size)], final)
    ctx.barrier()
    return {"split": split, "rows": len(rows), "written": written, "skipped": skipped, "status": "written"}


def _text_file(cfg, dataset, backbone, device, out: Path, progress: Progress) -> dict:
    """``text.h5``: the dataset's templates' class embeddings and, with ``--pooled``, LIFT's text start for a
    head reading the pre-projection feature (its single template mapped back through ``proj.T``)."""
    path = out / "text.h5"
    templates = dataset.prompt_templates()
    attrs = {**backbone.identity, "dataset": dataset.name}
    if path.exists():
        old = load_text_embeddings(path)
        if old.classnames == dataset.classnames and old.templates == templates and all(
            str(old.attrs.get(k)) == str(v) for k, v in attrs.items()
        ) and (not cfg.pooled or old.pooled_template == SINGLE_TEMPLATE):
            return {"split": "text", "rows": len(templates) * dataset.num_classes, "status": "up to date"}
    with progress.task(f"text ({dataset.num_classes:,} classes × {len(templates)} templates)", dataset.num_classes, "cls") as advance:
        weights = text_classifier(backbone, dataset.classnames, templates, device=device, progress=advance)
    pooled = None
    if cfg.pooled:  # what finetune's head_text starts an input=pooled templates=single head from
        pooled = class_text_start(backbone, dataset.classnames, [SINGLE_TEMPLATE], True, device).cpu().numpy()
    save_text_embeddings(path, weights, dataset.classnames, templates, attrs, pooled=pooled,
                         pooled_template=SINGLE_TEMPLATE if cfg.pooled else None)
    return {"split": "text", "rows": dataset.num_classes, "status": "written"}


def run_extract(cfg: ExtractConfig, progress: Progress | None = None) -> dict:
    """Extract every requested split (resumable), then the class text embeddings. Returns a summary."""
    progress = progress or Progress()
    check_values(cfg)  # every range and set of values its fields declare, as a built config is checked
    dataset = open_dataset(cfg.data)
    splits = cfg.splits or tuple(dataset.splits)
    for split in splits:
        dataset.split(split)  # refuse unknown splits before any work
    fmt = _token_format(cfg)
    _check_out(cfg, dataset)
    with _out_dir(cfg.out) as out:  # before the model loads: an unwritable --out is refused at once
        _check_recorded(cfg, out)
        ctx, device = setup(cfg.device)
        with folder_lock(out, "extract", ctx):
            return _extract(cfg, dataset, splits, fmt, out, ctx, device, progress)


def _extract(cfg: ExtractConfig, dataset, splits, fmt: TokenFormat, out: Path, ctx, device, progress: Progress) -> dict:
    """:func:`run_extract`'s work, ``out`` held by this command."""
    saved_cfg, cfg = cfg, dataclasses.replace(cfg, workers=_workers(cfg.workers, ctx))
    autocast(device, cfg.precision)  # refuse a precision the device lacks before any work
    backbone = _backbone(cfg, device)
    if cfg.pooled and backbone.pooled_dim is None:
        raise LtclipError(f"--pooled: {cfg.model} is not an open_clip ViT, so it has no pooled feature before a projection; drop --pooled")
    if cfg.tokens and not backbone.has_tokens:
        raise LtclipError(f"--tokens: {cfg.model} is not an open_clip ViT, so it has no token sequence; pass --no-tokens")
    if cfg.tokens:
        fmt.check(backbone.encode_dims()[1])  # a pool that does not divide the patch grid, a PCA too wide
    if device.type == "cuda":
        backbone.model.to(memory_format=torch.channels_last)
    for split in splits if cfg.decode == "device" else ():  # views with a step that cannot run on tensors: refused now
        on_tensors(_views_for(cfg, split, backbone))
    basis = _token_basis(cfg, fmt, dataset, backbone, device, ctx, out, progress)
    results = [_extract_split(cfg, dataset, s, backbone, device, ctx, out, progress, fmt, basis) for s in splits]
    if ctx.is_main:
        results.append(_text_file(cfg, dataset, backbone, device, out, progress))
        save_json(out / CACHE_RECORD, {"config": to_dict(saved_cfg), "provenance": provenance(), "identity": backbone.identity})
    return {"out": str(out), "splits": results, "identity": backbone.identity}
