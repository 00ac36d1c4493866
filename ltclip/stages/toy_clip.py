"""A toy CLIP pretrained on the CPU: a tiny open_clip model trained contrastively on drawn image–caption pairs.

Real CLIP weights need a download; the demo and the tests need a backbone whose zero-shot classifier
and text embeddings mean something. :func:`pretrain_toy_clip` trains both towers of a tiny open_clip
model with open_clip's ``ClipLoss`` through the engine's one loop (:func:`ltclip.engine.fit`), and
writes an open_clip checkpoint (``--model M --pretrained DIR/toy_clip.pt`` loads it everywhere) and
``toy_clip.json`` (settings, provenance, loss per epoch). Same settings and seed, same weights; a
folder that already holds them is returned at once.

The pretraining set is the analogue of web data for a real CLIP: every concept the synthetic
generator can draw (texture × colour × shape, up to 192), the same number of images per concept
(no long tail), drawn from a random stream that no synthetic split uses, so no image of any
synthetic set (any seed) is ever seen; captions use phrasings other than the zero-shot prompts
(``SYNTHETIC_TEMPLATES``). A downstream set of the first N classes thus asks for concepts the
model has seen, in images and prompts it has not.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import __version__
from ..core.atomic import atomic_path
from ..config import OptimConfig, option
from ..config.fields import check_values
from ..data.manifests import file_sha256
from ..data.synthetic import MAX_CLASSES, SPLITS, render_image, synthetic_classnames
from ..core.errors import LtclipError
from ..core.progress import Progress

if TYPE_CHECKING:
    import torch

CHECKPOINT_FILE = "toy_clip.pt"
INFO_FILE = "toy_clip.json"  # written last: its presence marks a finished pretraining
SCHEMA_VERSION = 1
# torch and open_clip are imported where used: the CLI reads the settings' defaults without them.
# The synthetic generator seeds image (label, index) of a split with [seed, split index, label, index];
# pretraining images take the split index len(SPLITS), which no synthetic split has.
PRETRAIN_STREAM = len(SPLITS)
# Caption phrasings, none of them a zero-shot prompt of the synthetic set.
CAPTIONS = (
    "{}",
    "a {}.",
    "a picture of a {}.",
    "there is a {} in this image.",
    "a {} on a blurry background.",
    "one {}, nothing else.",
    "a {} drawn on a canvas.",
    "look, a {}!",
)
WARMUP_FRACTION = 0.1  # of the steps: linear warm-up, then a cosine decay


@dataclass(frozen=True)
class ToyClipSettings:
    """What a toy CLIP is trained with (every field is a ``pretrain-toy`` option and part of the cache key)."""

    model: str = option("ltclip-tiny-vit", "open_clip architecture trained from scratch.", short="-m")
    classes: int = option(MAX_CLASSES, f"Synthetic concepts pretrained on (the first N; all: {MAX_CLASSES}).", minimum=2,
                          maximum=MAX_CLASSES)
    images_per_class: int = option(30, "Images drawn per concept.", minimum=1)
    steps: int = option(300, "Optimizer steps.", minimum=1)
    batch_size: int = option(128, "Image–caption pairs per step (a contrastive batch needs negatives: 2 at least).", minimum=2)
    lr: float = option(2e-3, "Peak AdamW learning rate.", above=0)
    weight_decay: float = option(0.1, "AdamW weight decay.", minimum=0)
    seed: int = option(0, "Seed of the weights, images, captions and order.", minimum=0)

    def optim(self) -> OptimConfig:
        """The engine's settings: AdamW, no decay on biases/norms/logit scale, warm-up then cosine."""
        rows = self.classes * self.images_per_class
        warmup_epochs = WARMUP_FRACTION * self.steps / math.ceil(rows / self.batch_size)
        return OptimConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                           decay_1d=False, warmup=warmup_epochs, seed=self.seed)


def check_settings(s: ToyClipSettings) -> None:
    """Refuse settings that cannot train (a number outside its field's range, a local model folder),
    with the option to change."""
    from ..engine import check_optim

    check_values(s)
    if s.model.startswith("local-dir:"):
        raise LtclipError(f"--model {s.model}: name an open_clip architecture to train from scratch (e.g. ltclip-tiny-vit)")
    check_optim(s.optim())


class ContrastiveTask:
    """The engine's task for CLIP pretraining: batches are (images, caption tokens), the loss open_clip's ``ClipLoss``.

    Returns the loss and the image-to-caption logits of the batch.
    """

    total_epochs = 1  # set by the engine; the loss does not depend on it

    def __init__(self):
        from open_clip.loss import ClipLoss

        self.loss = ClipLoss()

    def __call__(self, model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, epoch: int):
        image_features, text_features, logit_scale = model(images, tokens)[:3]
        logits, _ = self.loss.get_logits(image_features, text_features, logit_scale)
        return self.loss(image_features, text_features, logit_scale), logits


class CaptionedImages:
    """Training rows for the engine: each row an image and its class; every epoch draws each row a caption."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, captions: torch.Tensor, seed: int):
        self.images, self.labels, self.captions, self.seed = images, labels, captions, seed  # captions: [C, K, L]

    def batches(self, order: np.ndarray, batch_size: int, epoch: int, positions: np.ndarray):
        phrasing = np.random.default_rng([self.seed, epoch]).integers(self.captions.shape[1], size=len(self.labels))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            yield self.images[rows], self.captions[self.labels[rows], phrasing[rows]]


def pretraining_image(label: int, index: int, size: int, seed: int):
    """Pretraining image ``index`` of concept ``label`` (a PIL image from the synthetic generator)."""
    return render_image(label, size, np.random.default_rng([seed, PRETRAIN_STREAM, label, index]))


def build_model(model_name: str, seed: int):
    """A randomly initialised open_clip model (seeded), its eval preprocessing and its tokenizer."""
    import open_clip
    import torch

    from ..models.backbone import _quiet_random_weights_note, resolve_weights

    resolve_weights(model_name, "none")  # registers ltclip's tiny configs; an unknown name is a one-line error
    try:
        with torch.random.fork_rng(devices=[]), _quiet_random_weights_note():
            torch.manual_seed(seed)
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
        tokenizer = open_clip.get_tokenizer(model_name)
    except (RuntimeError, ValueError, OSError) as err:
        raise LtclipError(f"--model {model_name}: could not build it ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if not hasattr(model, "encode_text"):
        raise LtclipError(f"--model {model_name}: has no text tower to pretrain; choose a CLIP model (e.g. ltclip-tiny-vit)")
    return model, preprocess, tokenizer


def pretraining_data(s: ToyClipSettings, preprocess, tokenizer) -> CaptionedImages:
    """The balanced pretraining set of ``s.classes`` concepts: images preprocessed as extraction does, captions tokenized."""
    import torch

    size = preprocess_size(preprocess)
    labels = np.repeat(np.arange(s.classes), s.images_per_class)
    images = torch.stack([preprocess(pretraining_image(int(c), i % s.images_per_class, size, s.seed))
                          for i, c in enumerate(labels)])
    names = synthetic_classnames(s.classes)
    tokens = tokenizer([caption.format(name) for name in names for caption in CAPTIONS])
    return CaptionedImages(images, labels, tokens.view(s.classes, len(CAPTIONS), -1), s.seed)


def preprocess_size(preprocess) -> int:
    """The square side the model's eval preprocessing produces (its centre crop)."""
    from torchvision.transforms import CenterCrop

    crop = next((t for t in getattr(preprocess, "transforms", ()) if isinstance(t, CenterCrop)), None)
    if crop is None:
        raise LtclipError("the model's preprocessing has no centre crop; pretrain-toy draws square images for open_clip's ViTs")
    return int(crop.size[0])


def _cached(out: Path, settings: dict) -> dict | None:
    """The info of a finished pretraining with ``settings`` in ``out``, None if there is none; raises on a different one."""
    info_path = out / INFO_FILE
    if not info_path.is_file():
        return None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        old, sha = info["settings"], info["checkpoint_sha256"]
    except (ValueError, KeyError, TypeError):
        raise LtclipError(f"{info_path}: unreadable toy CLIP description; delete {out} or choose another --out") from None
    for key, value in settings.items():
        if old.get(key) != value:
            raise LtclipError(f"{out} holds a toy CLIP trained with --{key.replace('_', '-')} {old.get(key)}, not {value}; "
                              "choose another --out (or the same options)")
    checkpoint = out / CHECKPOINT_FILE
    if not checkpoint.is_file() or file_sha256(checkpoint) != sha:
        raise LtclipError(f"{checkpoint}: missing or changed since it was trained; delete {out} and rerun")
    return info


def pretrain_toy_clip(out: str | Path, settings: ToyClipSettings = ToyClipSettings(),
                      progress: Progress | None = None) -> dict:
    """Train (or find in ``out``) the toy CLIP of ``settings``; returns its ``toy_clip.json`` plus ``cached``."""
    import torch

    from ..engine import RunEnv, fit

    out = Path(out)
    check_settings(settings)
    key = dataclasses.asdict(settings)
    info = _cached(out, key)
    if info is not None:
        return {**info, "cached": True}
    start = time.perf_counter()
    model, preprocess, tokenizer = build_model(settings.model, settings.seed)
    data = pretraining_data(settings, preprocess, tokenizer)
    model.train()
    result = fit(model, ContrastiveTask(), data, settings.optim(), num_classes=settings.classes, env=RunEnv(progress=progress))
    model.eval()
    buffer = io.BytesIO()  # saved to a file, torch names the archive after the (temporary) file: bytes would differ
    torch.save(model.state_dict(), buffer)
    with atomic_path(out / CHECKPOINT_FILE) as tmp:
        tmp.write_bytes(buffer.getvalue())
    checkpoint = out / CHECKPOINT_FILE
    losses = [r["loss"] for r in result.history if r.get("loss") is not None]
    info = {
        "schema_version": SCHEMA_VERSION,
        "settings": key,
        "checkpoint": CHECKPOINT_FILE,
        "checkpoint_sha256": file_sha256(checkpoint),
        "use": f"--model {settings.model} --pretrained {checkpoint}",
        "pretraining_set": {
            "concepts": synthetic_classnames(settings.classes),
            "images": len(data.labels),
            "image_size": preprocess_size(preprocess),
            "image_stream": f"synthetic generator, split index {PRETRAIN_STREAM} (no synthetic split uses it)",
            "captions": list(CAPTIONS),
        },
        "steps": result.steps,
        "epochs": result.epochs,
        "loss_per_epoch": losses,
        "logit_scale": model.logit_scale.detach().exp().item(),
        "seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
        "versions": {"ltclip": __version__, "torch": torch.__version__, "open_clip": _open_clip_version(),
                     "python": platform.python_version()},
    }
    with atomic_path(out / INFO_FILE) as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return {**info, "cached": False}


def _open_clip_version() -> str:
    import open_clip

    return open_clip.__version__
