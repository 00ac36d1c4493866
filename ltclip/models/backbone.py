"""open_clip backbones: pretrained tags, checkpoint files, local folders, tiny test configs.

One call builds the model, its evaluation preprocessing, its tokenizer and an identity record
(what the feature cache stores for provenance and refuses to mix).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config.values import ENCODE_PRECISIONS
from ..data.manifests import file_sha256
from ..core.errors import LtclipError

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


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
        pooled, seq = self._pooled(images, "--tokens", "use --no-tokens")
        v = self.model.visual
        return (pooled @ v.proj if v.proj is not None else pooled), seq

    @property
    def pooled_dim(self) -> int | None:
        """The size of :meth:`encode_pooled`'s feature (the ViT's width); None for a model without one."""
        return int(self.model.visual.ln_post.weight.shape[0]) if self.has_tokens else None

    def encode_pooled(self, images: torch.Tensor) -> torch.Tensor:
        """The ViT's pooled feature before the projection, ``ln_post(CLS)`` [B, W]: what ``proj`` maps to
        the embedding, and what LIFT's classifier reads (its models/peft_vit.py)."""
        return self._pooled(images, "--head-opt input=pooled", "use input=embeds")[0]

    def encode_with_pooled(self, images: torch.Tensor, tokens: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`encode`'s embedding and tokens with :meth:`encode_pooled`'s feature, from one forward pass:
        ``(embedding [B, D], pooled [B, W], tokens [B, T, W] or None)`` (``extract --pooled``)."""
        pooled, seq = self._pooled(images, "--pooled", "drop --pooled")
        v = self.model.visual
        return (pooled @ v.proj if v.proj is not None else pooled), pooled, seq if tokens else None

    def _pooled(self, images: torch.Tensor, flag: str, instead: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(pre-projection pooled feature, final token sequence before ``ln_post``) of an open_clip ViT."""
        if not self.has_tokens:
            raise LtclipError(f"{flag}: model {self.identity['model']} is not an open_clip ViT; {instead}")
        v = self.model.visual
        seq = v.transformer(v._embeds(images))
        return v._pool(seq)[0], seq


class _RandomWeightsNote(logging.Filter):
    """open_clip's own root-logger line for random weights: ltclip has already warned once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextmanager
def _quiet_random_weights_note():
    note = _RandomWeightsNote()
    logging.getLogger().addFilter(note)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(note)


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


def resolve_weights(model_name: str, pretrained: str, preprocess_from: str | None = None) -> tuple[str | None, dict, dict]:
    """Decide how open_clip loads ``pretrained`` for ``model_name``, before anything is built.

    Returns open_clip's ``pretrained`` argument, extra ``create_model`` kwargs (QuickGELU,
    preprocessing) and the identity record. OpenAI-style tags that were trained with QuickGELU get
    it automatically. A checkpoint file gets the preprocessing of ``preprocess_from`` (a tag of the
    model) or, when every tag of the model agrees, that one.
    """
    import open_clip

    register_tiny_configs()
    kwargs: dict = {}
    identity = {"model": model_name, "pretrained": pretrained, "checkpoint_sha256": "", "quick_gelu": False}
    if model_name.startswith("local-dir:"):
        return None, kwargs, identity  # the folder's own config and preprocessing
    if model_name not in open_clip.list_models():
        raise LtclipError(f"--model {model_name!r}: unknown open_clip model{_close(model_name, open_clip.list_models())}")
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained in ("none", ""):
        return None, kwargs, identity
    if os.path.isfile(pretrained):
        # the bytes identify a checkpoint, not its path: a moved file still matches its caches
        identity.update(pretrained="file", checkpoint_sha256=file_sha256(pretrained))
        cfg = open_clip.get_pretrained_cfg(model_name, preprocess_from) if preprocess_from else _tag_preprocess(model_name)
        if preprocess_from and not cfg:
            raise LtclipError(f"--preprocess-from {preprocess_from!r}: not a tag of {model_name}{_close(preprocess_from, tags)}")
        if cfg is None and tags:
            raise LtclipError(
                f"--pretrained {pretrained}: the tags of {model_name} use different preprocessing; "
                "name the one this checkpoint needs with --preprocess-from TAG"
            )
        if cfg:
            kwargs["force_preprocess_cfg"] = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
            kwargs["force_quick_gelu"] = bool(preprocess_from and cfg.get("quick_gelu", False))
        gelus = {bool(open_clip.get_pretrained_cfg(model_name, t).get("quick_gelu", False)) for t in tags}
        if not preprocess_from and len(gelus) > 1:
            log.warning(
                "--pretrained %s: tags of %s differ in QuickGELU; loading with GELU. For OpenAI weights pass "
                "--preprocess-from openai (or use %s-quickgelu)", pretrained, model_name, model_name,
            )
    else:
        tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
        if not tag_cfg:
            listed = _close(pretrained, tags) or (f" (tags: {', '.join(tags[:8])})" if tags else " (it has no pretrained tags)")
            raise LtclipError(f"--pretrained {pretrained!r}: not a file nor a tag of {model_name}{listed}")
        kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
    identity["quick_gelu"] = bool(kwargs.get("force_quick_gelu", False))
    return pretrained, kwargs, identity


def _tag_weights_cached(model_name: str, tag: str, cache_dir: str | None) -> bool:
    """True when a tag's weights are in the Hugging Face cache; False when they are not but the Hub
    answers one quick request; else one line at once (open_clip's own download retries a dead
    network for a minute, logging every try)."""
    import open_clip
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives

    hub = open_clip.get_pretrained_cfg(model_name, tag).get("hf_hub", "")
    if not hub:
        return False  # a plain URL: open_clip's single urllib request fails at once
    repo, filename = os.path.split(hub)
    filename = filename or HF_WEIGHTS_NAME
    if any(isinstance(try_to_load_from_cache(repo, name, cache_dir=cache_dir), str)
           for name in (*_get_safe_alternatives(filename), filename)):
        return True
    try:
        get_hf_file_metadata(hf_hub_url(repo, filename), timeout=constants.HF_HUB_ETAG_TIMEOUT)  # one try, no retries
    except HfHubHTTPError:
        return False  # the Hub answered: open_clip's download reports what it says
    except Exception as err:  # no route, refused, DNS, timeout, offline mode: the same advice
        why = "HF_HUB_OFFLINE=1 is set" if isinstance(err, OfflineModeIsEnabled) else f"no network: {type(err).__name__}"
        raise LtclipError(
            f"--pretrained {tag}: could not load {model_name}'s weights: {repo}/{filename} is not in the local cache "
            f"({cache_dir or constants.HF_HUB_CACHE}) and cannot be downloaded ({why}); on a machine with internet run "
            f"`hf download {repo} {filename}` and copy its cache folder here (or point HF_HOME at it), "
            "or pass --pretrained FILE"
        ) from None
    return False


@contextmanager
def _hub_offline(active: bool):
    """Hugging Face's offline mode (``HF_HUB_OFFLINE``) inside the block when ``active``: cached weights
    load without a request (open_clip first asks the Hub for a ``.safetensors`` twin of a cached
    ``.bin``, and without a network that request is retried for 20 s)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or active
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def load_backbone(
    model_name: str,
    pretrained: str = "none",
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    preprocess_from: str | None = None,
    cache_dir: str | None = None,
) -> Backbone:
    """Build an open_clip model + eval preprocessing, frozen, in eval mode.

    ``pretrained``: an open_clip tag (downloaded once into the Hugging Face cache; missing there
    and unreachable, a one-line error at once), a checkpoint file, or ``none`` (random weights:
    warned about and recorded); ``model_name`` may be ``local-dir:/path`` (config + weights +
    preprocessing from that folder). See :func:`resolve_weights`.
    """
    import open_clip

    if precision not in ENCODE_PRECISIONS:
        raise LtclipError(f"--precision {precision!r}: choose one of {', '.join(ENCODE_PRECISIONS)}")
    pretrained_arg, kwargs, identity = resolve_weights(model_name, pretrained, preprocess_from)
    tag = pretrained_arg is not None and identity["pretrained"] != "file"
    cached = tag and _tag_weights_cached(model_name, pretrained_arg, cache_dir)
    if pretrained_arg is None and not model_name.startswith("local-dir:"):
        log.warning("--pretrained none: %s has RANDOM weights; features are meaningless for real data", model_name)
    try:
        with torch.random.fork_rng(devices=[]), _quiet_random_weights_note(), _hub_offline(cached):
            torch.manual_seed(0)  # random weights ('none') are the same in every process and run
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained_arg, precision=precision, device=device, cache_dir=cache_dir, **kwargs
            )
    except Exception as err:  # a checkpoint file that is no checkpoint fails in any way (torch.load is weights_only)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if identity["pretrained"] == "file":
            raise LtclipError(f"--pretrained {pretrained}: not an open_clip checkpoint of {model_name} ({type(err).__name__}: "
                              f"{first[:160]}); pass a state dict (.pt or .safetensors) saved from that model") from None
        if not isinstance(err, (RuntimeError, FileNotFoundError, ValueError, OSError)):
            raise
        raise LtclipError(
            f"--model {model_name} --pretrained {pretrained}: could not load ({first}); without internet use a cached "
            "tag with HF_HUB_OFFLINE=1, or a checkpoint file"
        ) from None
    model.eval()
    model.requires_grad_(False)
    cfg = dict(model.visual.preprocess_cfg)
    identity["preprocess"] = preprocess_fingerprint(cfg)
    return Backbone(model, preprocess, cfg, open_clip.get_tokenizer(model_name), identity)
