"""open_clip backbones: pretrained tags, checkpoint files, local folders, tiny test configs.

One call builds the model, its evaluation preprocessing, its tokenizer and an identity record
(what the feature cache stores for provenance and refuses to mix).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.manifests import file_sha256
from ..errors import LtclipError

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def register_tiny_configs() -> list[str]:
    """Register ltclip's tiny open_clip configs (fast on a CPU; for tests and the demo)."""
    import open_clip

    names = []
    for path in sorted(CONFIG_DIR.glob("*.json")):
        if path.stem not in open_clip.list_models():
            open_clip.add_model_config(path)
        names.append(path.stem)
    return names


@dataclass
class Backbone:
    model: torch.nn.Module
    preprocess: object  # PIL image -> tensor (open_clip's eval transform)
    preprocess_cfg: dict
    tokenizer: object
    identity: dict  # model, pretrained, checkpoint_sha256, quick_gelu, preprocess

    @property
    def visual(self):
        return self.model.visual

    @property
    def has_tokens(self) -> bool:
        """True for open_clip's own ViT, whose token sequence the decoder head reads."""
        from open_clip.transformer import VisionTransformer

        return isinstance(self.model.visual, VisionTransformer)

    def encode_dims(self) -> tuple[int, tuple[int, int] | None]:
        """(embedding dim, (tokens, width) or None), from one forward of a blank image."""
        size = self.preprocess_cfg["size"]
        size = size if isinstance(size, (tuple, list)) else (size, size)
        param = next(self.model.parameters())
        x = torch.zeros(1, 3, *size, device=param.device, dtype=param.dtype)
        with torch.inference_mode():
            embeds, tokens = self.encode(x, tokens=self.has_tokens)
        return embeds.shape[-1], (tuple(tokens.shape[1:]) if tokens is not None else None)

    def encode(self, images: torch.Tensor, tokens: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Projected image embedding (unnormalised) and, for ViTs, the final token sequence.

        The tokens are the transformer's output including CLS, before ``ln_post`` and the
        projection: what the decoder head consumes. One forward pass gives both.
        """
        if not tokens:
            return self.model.encode_image(images), None
        if not self.has_tokens:
            raise LtclipError(f"--tokens: model {self.identity['model']} is not an open_clip ViT; use --no-tokens")
        v = self.model.visual
        seq = v.transformer(v._embeds(images))
        pooled, _ = v._pool(seq)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return pooled, seq


def _close(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=4, cutoff=0.5)
    return f" (close: {', '.join(close)})" if close else ""


def _tag_preprocess(model_name: str) -> dict | None:
    """The one preprocessing all of a model's pretrained tags share, or None when they differ/none."""
    import open_clip

    cfgs = []
    for tag in open_clip.list_pretrained_tags_by_model(model_name):
        cfg = open_clip.get_pretrained_cfg(model_name, tag)
        cfgs.append({k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg})
    distinct = {json.dumps(c, sort_keys=True) for c in cfgs}
    return cfgs[0] if len(distinct) == 1 else None


def preprocess_fingerprint(cfg: dict) -> str:
    """A stable description of the preprocessing (what the cache refuses to mix)."""
    return json.dumps({k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(cfg.items())}, sort_keys=True)


def load_backbone(
    model_name: str,
    pretrained: str = "none",
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    preprocess_from: str | None = None,
    cache_dir: str | None = None,
) -> Backbone:
    """Build an open_clip model + eval preprocessing.

    ``pretrained``: an open_clip tag (downloaded once into open_clip's cache; set
    ``HF_HUB_OFFLINE=1`` to use the cache offline), a checkpoint file, ``local-dir:/path`` via
    ``model_name``, or ``none`` (random weights: warned about and recorded). OpenAI-style tags that
    were trained with QuickGELU get it automatically. A checkpoint file gets the preprocessing of
    ``preprocess_from`` (a tag of the model) or, when every tag of the model agrees, that one.
    """
    import open_clip

    register_tiny_configs()
    if precision not in PRECISIONS:
        raise LtclipError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    kwargs: dict = {}
    identity = {"model": model_name, "pretrained": pretrained, "checkpoint_sha256": "", "quick_gelu": False}
    is_local_dir = model_name.startswith("local-dir:")
    if not is_local_dir and model_name not in open_clip.list_models():
        raise LtclipError(f"--model {model_name!r}: unknown open_clip model{_close(model_name, open_clip.list_models())}")
    if is_local_dir:
        pretrained_arg = None
    elif pretrained in ("none", ""):
        log.warning("--pretrained none: %s has RANDOM weights; features are meaningless for real data", model_name)
        pretrained_arg = None
    elif os.path.isfile(pretrained):
        identity["checkpoint_sha256"] = file_sha256(pretrained)
        source = preprocess_from
        cfg = open_clip.get_pretrained_cfg(model_name, source) if source else _tag_preprocess(model_name)
        if source and not cfg:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            raise LtclipError(f"--preprocess-from {source!r}: not a tag of {model_name}{_close(source, tags)}")
        if cfg is None and open_clip.list_pretrained_tags_by_model(model_name):
            raise LtclipError(
                f"--pretrained {pretrained}: the tags of {model_name} use different preprocessing; "
                "name the one this checkpoint needs with --preprocess-from TAG"
            )
        if cfg:
            kwargs["force_preprocess_cfg"] = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
            kwargs["force_quick_gelu"] = bool(source and cfg.get("quick_gelu", False))
        pretrained_arg = pretrained
    else:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
        if not tag_cfg:
            raise LtclipError(
                f"--pretrained {pretrained!r}: not a file nor a tag of {model_name}"
                f"{_close(pretrained, tags) or ' (tags: ' + ', '.join(tags[:8]) + ')' if tags else ''}"
            )
        kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
        pretrained_arg = pretrained
    identity["quick_gelu"] = bool(kwargs.get("force_quick_gelu", False))
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained_arg, precision=precision, device=device, cache_dir=cache_dir, **kwargs
        )
    except (RuntimeError, FileNotFoundError, ValueError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LtclipError(
            f"--model {model_name} --pretrained {pretrained}: could not load ({first}); without internet use a cached "
            "tag with HF_HUB_OFFLINE=1, or a checkpoint file"
        ) from None
    model.eval()
    model.requires_grad_(False)
    cfg = dict(model.visual.preprocess_cfg)
    identity["preprocess"] = preprocess_fingerprint(cfg)
    identity["preprocess_sha256"] = hashlib.sha256(identity["preprocess"].encode()).hexdigest()[:16]
    return Backbone(model, preprocess, cfg, open_clip.get_tokenizer(model_name), identity)
