"""The frozen text tower that prompt heads run their prompts through (:class:`TextEncoder`), built
from a backbone (:func:`text_encoder`) or from the model a record names (:func:`load_text_encoder`).

Prompts run through open_clip's frozen text tower as ``CLIP.encode_text`` runs token ids (token
embeddings in place of ``token_embedding``; positional embedding, the transformer with its causal
mask, ``ln_final``, the EOT row, ``text_projection``). Under the causal mask the EOT row reads no
later position, so a sequence may be cut after its last EOT: the same numbers, several times less work.

**The text tower is not a submodule.** :class:`TextEncoder` (a plain object) holds it, the tokenizer
and the class names, so neither a head's ``state_dict`` nor its ``config`` carries it; copies of a
head share one tower. Rebuild a prompt head with ``rebuild_head("prompt", head.config,
text_encoder(backbone, classnames))`` and ``load_state_dict``.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn
from torch import Tensor

from ..core.errors import LtclipError

# what names the text tower's weights: a backbone's identity minus its (image) preprocessing
TEXT_IDENTITY = ("model", "pretrained", "checkpoint_sha256", "quick_gelu")


class TextEncoder:
    """open_clip's frozen text tower, its tokenizer and the class names: what a prompt head needs
    besides its state_dict. A plain object (deep copies share it), never a submodule of the head."""

    def __init__(self, model: nn.Module, tokenizer, classnames: Sequence[str], identity: dict | None = None):
        from open_clip.transformer import text_global_pool

        tower = getattr(model, "text", model)  # CustomTextCLIP keeps its tower in .text
        parts = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
        if any(not hasattr(tower, p) for p in parts) or getattr(tower, "cls_emb", None) is not None:
            raise LtclipError(f"--head prompt needs an open_clip CLIP text transformer; got {type(tower).__name__}")
        holder = nn.Module()  # the tower's own parameters and modules, so _apply can move them together
        for p in parts:
            setattr(holder, p, getattr(tower, p))
        holder.register_buffer("attn_mask", tower.attn_mask, persistent=False)
        self.tower = holder.requires_grad_(False).eval()
        self.pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
        self.eos_id = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
        # the EOT row reads no later position under the causal mask: sequences may end after it
        self.truncate = tower.attn_mask is not None and self.pool_type in ("argmax", "eos")
        self._pool = text_global_pool
        self.tokenizer = tokenizer
        self.classnames = [str(c) for c in classnames]
        self.identity = {k: identity[k] for k in TEXT_IDENTITY if k in identity} if identity else {}
        self.logit_scale = float(model.logit_scale.detach().exp().reshape(-1)[0])
        self.width = tower.token_embedding.embedding_dim
        proj = tower.text_projection
        self.embed_dim = (self.width if proj is None else
                          proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])

    def __deepcopy__(self, memo):
        return self  # frozen: every copy of a head shares the one tower

    def record(self) -> dict:
        """What finds this tower again (:func:`load_text_encoder`): the model's identity and the class names."""
        return {**self.identity, "classnames": list(self.classnames)}

    def pool_index(self, tokens: Tensor) -> Tensor:
        """The position whose output is the text feature (open_clip's argmax / eos pooling)."""
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)

    def encode(self, embeds: Tensor, tokens: Tensor) -> Tensor:
        """``CLIP.encode_text`` from token embeddings ``[N, L, W]`` (``L`` ≤ context length), unnormalised."""
        t, length = self.tower, embeds.shape[1]
        cast = t.transformer.get_cast_dtype() if hasattr(t.transformer, "get_cast_dtype") else embeds.dtype
        x = embeds.to(cast) + t.positional_embedding[:length].to(cast)
        mask = t.attn_mask[:length, :length] if t.attn_mask is not None else None
        x = t.ln_final(t.transformer(x, attn_mask=mask))
        x = self._pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        if t.text_projection is not None:
            x = t.text_projection(x) if isinstance(t.text_projection, nn.Linear) else x @ t.text_projection
        return x


def text_encoder(backbone, classnames: Sequence[str]) -> TextEncoder:
    """The :class:`TextEncoder` of a :class:`~ltclip.models.backbone.Backbone` for ``classnames``."""
    return TextEncoder(backbone.model, backbone.tokenizer, classnames, backbone.identity)


def load_text_encoder(identity: dict, classnames: Sequence[str], where: str) -> TextEncoder:
    """The text tower of the model ``identity`` records (a cache's attributes, :meth:`TextEncoder.record`),
    loaded by name and checked against the record; ``where`` names the record in errors."""
    from .backbone import load_backbone

    model, pretrained = identity.get("model"), identity.get("pretrained")
    fix = "extract the cache with an open_clip tag (--pretrained TAG or none), or fine-tune with finetune --head prompt"
    if not model or pretrained is None:
        raise LtclipError(f"--head prompt: {where} records no model/pretrained to rebuild the text tower from; {fix}")
    if pretrained == "file":
        raise LtclipError(f"--head prompt: {where} was made from a checkpoint file known only by its sha256 "
                          f"({str(identity.get('checkpoint_sha256', ''))[:12]}), so its text tower cannot be rebuilt; {fix}")
    try:
        backbone = load_backbone(str(model), str(pretrained))
    except LtclipError as err:
        raise LtclipError(f"--head prompt: cannot rebuild the text tower of {where} ({err}); "
                          "make that model loadable here, or retrain") from None
    differ = [k for k in TEXT_IDENTITY if k in identity and str(identity[k]) != str(backbone.identity.get(k))]
    if differ:
        raise LtclipError(f"--head prompt: {model} / {pretrained} loads with other {', '.join(differ)} than {where} "
                          "records; restore the weights it was made with, or retrain")
    return text_encoder(backbone, classnames)
