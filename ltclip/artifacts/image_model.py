"""A run, or a feature cache's zero-shot classifier, as an image classifier: images → logits, with the
preprocessing it was trained on and its class names.

A finetuned run holds its encoder. A head (or second stage) trained on a feature cache gets its encoder
back from the cache: the model the cache's ``train.h5`` names (the weights ``extract.json`` loaded, or
the finetuned run of ``extract --from-run``), checked against the identity the cache recorded, followed
by what extract stored (the float16 embedding, the pooled feature, or the tokens in the cache's token
format, encoded and decoded as a reader sees them) and the run's :class:`~ltclip.artifacts.runs.RunModel`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DataConfig, from_dict
from ..core.errors import LtclipError
from ..data.image_batches import normalized_preprocess
from ..data.views import Views, check_view_options, make_views
from .outputs import CACHE_RECORD
from .runs import finetuned_backbone, load_run, read_run_info
from .store import FeatureCache, TokenCodec, zero_shot_text

log = logging.getLogger(__name__)

CLIP_LOGIT_SCALE = 100.0  # the scale of CLIP's zero-shot logits (``ltclip eval --zero-shot`` and predict)
IDENTITY_KEYS = ("model", "pretrained", "checkpoint_sha256", "quick_gelu", "preprocess", "normalize", "finetuned_run_sha256")


@dataclass
class ImageClassifier:
    """``model``: preprocessed images ``[B, 3, H, W]`` → logits ``[B, C]`` (eval mode); ``preprocess``:
    PIL → ``[3, H, W]`` (the center view) normalised as trained; ``preprocess_cfg``: its size, mean, std and
    interpolation; ``eval_resize``/``interpolation``: the recorded test view (None: the model's)."""

    model: nn.Module
    preprocess: Callable
    preprocess_cfg: dict
    classnames: list[str]
    eval_resize: int | None = None
    interpolation: str | None = None

    def views(self, kind: str = "center", resize: int | None = None, interpolation: str | None = None) -> Views:
        """The test views ``kind`` (``--test-views``); ``resize``/``interpolation`` replace the recorded ones."""
        resize = self.eval_resize if resize is None else resize
        interpolation = interpolation or self.interpolation
        check_view_options(resize, interpolation)
        return make_views(kind, self.preprocess, self.preprocess_cfg, resize=resize, interpolation=interpolation)


class StoredFeatures(nn.Module):
    """Images → the head input exactly as ``ltclip extract`` stored it and a cache reader returns it:
    ``embeds`` and ``pooled`` rounded to float16, ``tokens`` through the cache's :class:`TokenCodec`."""

    def __init__(self, backbone, kind: str, codec: TokenCodec | None = None, with_tokens: bool = False):
        super().__init__()
        self.encoder = backbone.model.visual  # the image tower only: an export does not carry the text tower
        self.backbone, self.kind, self.codec, self.with_tokens = backbone, kind, codec, with_tokens

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == "pooled":
            return self.backbone.encode_with_pooled(images)[1].half().float()
        if self.kind == "embeds":  # extract reads the embedding off the token pass when it stores tokens
            return self.backbone.encode(images, tokens=self.with_tokens)[0].half().float()
        return self.codec.decode(*self.codec.encode_tensors(self.backbone.encode(images, tokens=True)[1]))


class CacheHeadModel(nn.Module):
    """A run trained on a feature cache, on images: :class:`StoredFeatures` then the run's model."""

    def __init__(self, features: StoredFeatures, head: nn.Module):
        super().__init__()
        self.features, self.head = features, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class ZeroShotModel(nn.Module):
    """CLIP's zero-shot classifier: the normalised image embedding against the class text embeddings, ×100."""

    def __init__(self, features: StoredFeatures, text_embeds: torch.Tensor):
        super().__init__()
        self.features = features
        self.register_buffer("text", text_embeds.float())  # text.h5 holds them normalised

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return CLIP_LOGIT_SCALE * F.normalize(self.features(images).float(), dim=-1) @ self.text.T


def run_classifier(run_dir: str | Path, device: str | torch.device = "cpu") -> ImageClassifier:
    """The image classifier of a finished run of any kind (head, second stage, finetuned)."""
    info = read_run_info(run_dir)
    if info["kind"] == "finetune":
        return _finetuned(run_dir, device)
    run = load_run(run_dir, device=device)
    backbone, cache, record = _cache_encoder(run.features, f"run {run_dir}", device)
    kind = run.model.head.input
    if kind == "tokens" and cache.codec is None:
        raise LtclipError(f"{run.features / 'train.h5'} stores no tokens but the run's head reads them; the cache is not the run's")
    features = StoredFeatures(backbone, kind, cache.codec, with_tokens=cache.has_tokens)
    model = CacheHeadModel(features, run.model).to(device).eval()
    return _classifier(model, backbone, cache, record)


def zero_shot_classifier(features: str | Path, device: str | torch.device = "cpu") -> ImageClassifier:
    """CLIP zero-shot on images with the encoder and the class text embeddings (``text.h5``) of a cache."""
    features = Path(features)
    text = zero_shot_text(features)
    backbone, cache, record = _cache_encoder(features, f"--features {features}", device)
    model = ZeroShotModel(StoredFeatures(backbone, "embeds", with_tokens=cache.has_tokens), torch.from_numpy(text.embeds))
    return _classifier(model.to(device).eval(), backbone, cache, record)


def _classifier(model, backbone, cache: FeatureCache, record: dict) -> ImageClassifier:
    names = cache.classnames or [f"class {i}" for i in range(cache.num_classes)]
    return ImageClassifier(model, backbone.preprocess, backbone.preprocess_cfg, list(names),
                           record.get("eval_resize"), record.get("interpolation"))


def _finetuned(run_dir: str | Path, device) -> ImageClassifier:
    run = load_run(run_dir, device=device)
    return finetuned_classifier(run, _dataset_classnames(run.info))


def finetuned_classifier(run, classnames: list[str]) -> ImageClassifier:
    """A loaded finetuned run (:func:`~ltclip.artifacts.runs.load_run`): its encoder and head, viewed as
    it recorded (normalisation, ``--eval-resize``, ``--interpolation``)."""
    model = run.model
    normalize = run.config.get("normalize", "model")
    return ImageClassifier(model.eval(), *normalized_preprocess(model.preprocess, model.preprocess_cfg, normalize),
                           list(classnames), run.config.get("eval_resize"), run.config.get("interpolation"))


def _dataset_classnames(info: dict) -> list[str]:
    """The class names of a finetuned run's dataset; ``class i`` where the dataset cannot be opened here."""
    from ..data.registry import open_dataset

    try:
        return list(open_dataset(from_dict(DataConfig, info["inputs"]["data"])).classnames)
    except LtclipError as err:
        log.warning("class names: %s; naming the classes by their index", err)
        return [f"class {i}" for i in range(info["num_classes"])]


def _cache_encoder(features: Path, owner: str, device):
    """``(backbone, train cache, extract.json's config)``: the encoder that made the cache ``features``,
    normalised as it was, refused in one line unless its identity is the one the cache recorded."""
    from ..models.backbone import load_backbone

    train = features / "train.h5"
    if not train.is_file():
        raise LtclipError(f"{owner}: the cache {features} has no train.h5; pass the folder `ltclip extract` wrote")
    with FeatureCache(train) as cache:
        attrs = cache.attrs
    record_path = features / CACHE_RECORD
    try:
        record = json.loads(record_path.read_text()).get("config", {}) if record_path.is_file() else {}
    except (ValueError, AttributeError):
        raise LtclipError(f"{record_path}: not the JSON record `ltclip extract` writes; re-extract the cache") from None
    if "model" not in attrs:
        raise LtclipError(f"{train} records no encoder (no model attribute): it was not written by `ltclip extract`; "
                          "re-extract it")
    if attrs.get("finetuned_run_sha256"):
        if not record.get("from_run"):
            raise LtclipError(f"{train} was extracted with a finetuned run's encoder, but {record_path} does not name the run; "
                              "re-extract the cache with `ltclip extract --from-run RUN`")
        backbone = finetuned_backbone(record["from_run"], device)
        normalize = backbone.identity["normalize"]
    else:
        pretrained = record.get("pretrained", attrs.get("pretrained"))
        if pretrained == "file":
            raise LtclipError(f"{train} was extracted from a checkpoint file that {record_path} does not name; "
                              "re-extract the cache")
        backbone = load_backbone(attrs["model"], pretrained, device=device, preprocess_from=record.get("preprocess_from"))
        normalize = attrs.get("normalize", "model")
    backbone.preprocess, backbone.preprocess_cfg = normalized_preprocess(backbone.preprocess, backbone.preprocess_cfg, normalize)
    _check_identity(train, attrs, {**backbone.identity, "normalize": normalize})
    return backbone, cache, record


def _check_identity(train: Path, attrs: dict, identity: dict) -> None:
    """Refuse an encoder other than the one the cache ``train`` recorded (weights moved or changed, another model)."""
    changed = [k for k in IDENTITY_KEYS if k in attrs and k in identity and attrs[k] != identity[k]]
    if changed:
        shown = "; ".join(f"{k} {str(attrs[k])[:40]!r} vs {str(identity[k])[:40]!r}" for k in changed)
        raise LtclipError(f"{train} was extracted with another encoder than {identity['model']} / {identity['pretrained']} "
                          f"loads now ({shown}); restore that model or re-extract the cache and retrain")

