"""Text-side prompt tuning (CoOp, Zhou et al. IJCV 2022) as a head, in bounded memory at 8,142 classes.

Class ``j``'s prompt is ``[SOS] ctx_1 … ctx_M <name_j tokens> . [EOS]`` in token-embedding space
(CoOp's "end" position). The learnable context ``ctx`` is shared by all classes, or one per class
(``class_specific``). It starts as the token embeddings of ``init`` (``M`` = its token count, the
default), or as ``context=N`` random vectors (normal, std 0.02) when ``init=""``. Before any
training the default head is zero-shot CLIP with the template ``"a photo of a {name}."``.

The prompts run through open_clip's frozen text tower as ``CLIP.encode_text`` runs token ids (our
embeddings in place of ``token_embedding``; positional embedding, the transformer with its causal
mask, ``ln_final``, the EOT row, ``text_projection``). Under the causal mask the EOT row reads no
later position, so each chunk is cut after its last EOT: the same numbers, several times less work.
Logits are ``logit_scale · cos(embed, t_j)`` with CLIP's own frozen scale ``exp(model.logit_scale)``.

**Memory.** A naive training forward keeps the activations of all ``C`` prompts for backward
(``O(C)``: 4.4 GiB at 8,142 classes for the 2-layer, 64-wide test tower; ViT-B's is 12 × 512). Here:

- ``classes_per_step=0`` (exact): all ``C`` features are computed at every training forward,
  ``chunk`` classes at a time under ``torch.utils.checkpoint``. Backward keeps only the ``[C, D]``
  features; it recomputes one chunk at a time, so the peak is one chunk's activations, not ``C``'s.
  Exact logits and gradient, for one extra forward of every chunk (the recompute).
- ``classes_per_step=N``: ``N`` classes get fresh, gradient-carrying features at each training
  forward; every other class uses a cached, detached feature, recomputed exactly (no grad, chunked)
  every ``refresh_every`` optimizer steps (a step = ``ctx`` changed between two training forwards).
  Fresh rows are written back into the cache. **Bias**: a stale row is ``t_j`` of an older ``ctx``,
  so the logits are exact only up to staleness, and ``ctx``'s gradient comes only through the fresh
  classes (the stale ones enter the softmax as constants). The engine calls ``forward(x)`` without
  labels, so the fresh set is chosen from the embeddings: ``sample="hard"`` takes, rank by rank, each
  sample's highest-scoring classes under the cached classifier (the confusable classes, and the true
  class whenever the cache ranks it high, which a trained prompt does); ``sample="uniform"`` draws
  them uniformly. ``classifier(z, targets)`` (or ``head(x, targets)``) puts the batch's labels first.

Out of training (``eval()``, no grad, or ``ctx`` frozen) the whole classifier is computed exactly,
chunked and without grad, and cached until ``ctx`` changes: its values are compared with a copy
(fused optimizers do not bump version counters), so an optimizer step, ``load_state_dict``, a move
or a cast all invalidate it.

**The text tower is not a submodule.** :class:`TextEncoder` (a plain object) holds it, the tokenizer
and the class names, so neither ``state_dict`` (just ``classifier.ctx``) nor ``config`` carries it.
:meth:`PromptClassifier._apply` applies ``.to()/.cuda()/.half()`` to the tower too (moving the
backbone's shared text parameters in place); copies of the head share one tower. Rebuild with
``create_head("prompt", **head.config, text_encoder=text_encoder(backbone, classnames),
from_checkpoint=True)`` and ``load_state_dict``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..core.errors import LtclipError
from .heads import HEADS, Head, _require

SAMPLES = ("hard", "uniform")
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


def _first_unique(x: Tensor) -> Tensor:
    """The distinct values of ``x`` in order of first occurrence."""
    uniq, inverse = torch.unique(x, return_inverse=True)
    pos = torch.arange(x.numel(), device=x.device)
    first = torch.full_like(uniq, x.numel()).scatter_reduce_(0, inverse, pos, "amin")
    return uniq[first.argsort()]


class PromptClassifier(nn.Module):
    """``logit_scale · cos(z, t_j)`` with ``t_j`` the text feature of class ``j``'s learned prompt.

    Owns ``ctx`` (its only state_dict entry). ``weight`` is ``logit_scale ·`` the exact text
    features ``[C, D]`` (no grad) for second stages; ``refreshes`` counts full cache recomputations
    in training and ``last_fresh`` holds the classes of the last sampled training forward.
    """

    def __init__(self, text: TextEncoder, *, context: int, init: str, class_specific: bool,
                 classes_per_step: int, refresh_every: int, chunk: int, sample: str):
        super().__init__()
        self.text = text  # a plain object: not registered, not in state_dict
        self.num_classes, self.scale = len(text.classnames), text.logit_scale
        self.init, self.class_specific = init, class_specific
        self.classes_per_step, self.refresh_every = classes_per_step, refresh_every
        self.chunk, self.sample = chunk, sample
        tok = text.tokenizer
        if init:
            phrase = tok([init])[0]
            self.n_ctx = int(text.pool_index(phrase[None])[0]) - 1
            _require(self.n_ctx >= 1, "init", init, "must have at least one token (or give init= and context=N)")
            _require(context in (0, self.n_ctx), "context", context,
                     f"init {init!r} has {self.n_ctx} tokens: give context=0 (its length), "
                     "or init= (empty) for random vectors")
            prefix = init
        else:
            _require(context >= 1, "context", context, "must be >= 1 when init is empty (e.g. context=16)")
            self.n_ctx, phrase, prefix = context, None, " ".join(["X"] * context)  # CoOp's placeholder
        tokens = tok([f"{prefix} {name}." for name in text.classnames])
        lead = tok([prefix])[0, : self.n_ctx + 1]
        if not bool((tokens[:, : self.n_ctx + 1] == lead).all()):
            raise LtclipError(f"--head-opt init={init!r}: the tokenizer splits the phrase differently "
                              "before a class name; choose another init")
        self.register_buffer("tokens", tokens, persistent=False)  # [C, context length], rebuilt from the names
        shape = (self.num_classes, self.n_ctx, text.width) if class_specific else (self.n_ctx, text.width)
        self.ctx = nn.Parameter(torch.empty(shape))
        self._phrase = phrase
        self.reset_parameters()
        self.refreshes, self.last_fresh = 0, None
        self._cache = self._exact_at = self._seen = None
        self._steps = self._refreshed_at = 0

    def reset_parameters(self) -> None:
        """``ctx`` from the init phrase's token embeddings, or normal(std 0.02) without one."""
        with torch.no_grad():
            if self._phrase is None:
                nn.init.normal_(self.ctx, std=0.02)
            else:
                emb = self.text.tower.token_embedding
                phrase = self._phrase[1 : self.n_ctx + 1].to(emb.weight.device)
                self.ctx.copy_(emb(phrase).to(self.ctx))  # broadcasts over classes when class-specific

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.text.tower._apply(fn)  # the frozen tower travels with the head (shared parameters in place)
        self._cache = self._exact_at = self._seen = None
        return self

    def _same(self, snapshot: Tensor | None) -> bool:
        """Whether ``ctx`` still holds ``snapshot``'s values. Compared by content, since fused
        optimizers update parameters without bumping their version counter."""
        c = self.ctx.detach()
        return snapshot is not None and snapshot.shape == c.shape and snapshot.device == c.device and \
            snapshot.dtype == c.dtype and torch.equal(snapshot, c)

    def _snapshot(self) -> Tensor:
        return self.ctx.detach().clone()

    def _encode_chunk(self, ctx: Tensor, idx: Tensor) -> Tensor:
        tokens = self.tokens[idx]
        if self.text.truncate:
            tokens = tokens[:, : int(self.text.pool_index(tokens).max()) + 1]
        emb = self.text.tower.token_embedding(tokens)
        c = ctx[idx] if self.class_specific else ctx.expand(len(idx), -1, -1)
        x = torch.cat([emb[:, :1], c.to(emb.dtype), emb[:, 1 + self.n_ctx :]], dim=1)
        return F.normalize(self.text.encode(x, tokens).float(), dim=-1)

    def encode(self, idx: Tensor, grad: bool) -> Tensor:
        """Normalised text features of classes ``idx``, ``chunk`` at a time; with ``grad``, each
        chunk under activation checkpointing (recomputed in backward)."""
        if not grad:
            with torch.no_grad():
                return torch.cat([self._encode_chunk(self.ctx, part) for part in idx.split(self.chunk)])
        return torch.cat([checkpoint(self._encode_chunk, self.ctx, part, use_reentrant=False, preserve_rng_state=False)
                          for part in idx.split(self.chunk)])

    def exact(self) -> Tensor:
        """All ``C`` features at the current ``ctx``, no grad; cached until ``ctx`` changes."""
        if self._cache is None or not self._same(self._exact_at):
            self._cache = self.encode(torch.arange(self.num_classes, device=self.tokens.device), grad=False)
            self._exact_at = self._snapshot()
        return self._cache

    @property
    def weight(self) -> Tensor:
        return self.scale * self.exact()

    def select(self, z: Tensor, targets: Tensor | None) -> Tensor:
        """The classes that get fresh features: ``targets`` first, then hard or uniform ones."""
        n, dev = min(self.classes_per_step, self.num_classes), self.tokens.device
        picks = [targets.reshape(-1).to(dev)] if targets is not None else []
        if self.sample == "hard":  # rank-major: every sample's top-1 class, then every top-2, ...
            with torch.no_grad():
                picks.append((z.detach().float() @ self._cache.T).topk(n, dim=1).indices.T.reshape(-1))
        else:
            picks.append(torch.randperm(self.num_classes, device=dev))
        return _first_unique(torch.cat(picks))[:n]

    def text_features(self, z: Tensor, targets: Tensor | None = None) -> Tensor:
        """``[C, D]`` features for this forward (see the module doc for the three regimes)."""
        if not (self.training and torch.is_grad_enabled() and self.ctx.requires_grad):
            return self.exact()
        if self.classes_per_step == 0 or self.classes_per_step >= self.num_classes:
            w = self.encode(torch.arange(self.num_classes, device=self.tokens.device), grad=True)
            self._cache, self._exact_at = w.detach(), self._snapshot()
            return w
        if not self._same(self._seen):
            self._steps += self._seen is not None  # ctx changed since the last training forward: a step
            self._seen = self._snapshot()
        if self._cache is None or self._steps - self._refreshed_at >= self.refresh_every:
            self._cache, self._exact_at = None, None
            self.exact()
            self._refreshed_at, self.refreshes = self._steps, self.refreshes + 1
        fresh = self.select(z, targets)
        w_fresh = self.encode(fresh, grad=True)
        self.last_fresh = fresh
        w = self._cache.index_copy(0, fresh, w_fresh)
        self._cache = self._cache.index_copy(0, fresh, w_fresh.detach())  # exact rows at this ctx
        return w

    def forward(self, z: Tensor, targets: Tensor | None = None) -> Tensor:
        z = F.normalize(z, dim=-1)
        return self.scale * z @ self.text_features(z, targets).T.to(z.dtype)


@HEADS.register("prompt")
class PromptHead(Head):
    """CoOp prompt tuning: the classifier is the frozen text tower on learned context vectors.

    Needs ``text_encoder`` (:func:`text_encoder(backbone, classnames) <text_encoder>`); trains only
    ``ctx``. ``context=0`` takes ``M`` and the initial vectors from ``init``; ``init=""`` with
    ``context=N`` starts from ``N`` random ones. ``classes_per_step=0`` encodes every class at every
    step (chunked, checkpointed: exact); ``N > 0`` refreshes ``N`` classes per step and the rest
    every ``refresh_every`` steps (``sample`` = hard | uniform). ``chunk`` classes per text forward.
    """

    input = "embeds"
    requires_text_encoder = True  # create_head must pass text_encoder=; contract tests need one

    def __init__(
        self, num_classes, embed_dim, token_shape=None, text_embeds=None, text_encoder: TextEncoder | None = None, *,
        context: int = 0, init: str = "a photo of a", class_specific: bool = False,
        classes_per_step: int = 0, refresh_every: int = 10, chunk: int = 128, sample: str = "hard",
    ):
        if text_encoder is None:
            raise LtclipError("--head prompt needs the model's text tower and the class names, which only "
                              "train-head (from the cache's model) and finetune (its own) provide; choose another --head")
        super().__init__(num_classes, embed_dim, token_shape)
        if len(text_encoder.classnames) != self.num_classes or text_encoder.embed_dim != int(embed_dim):
            raise LtclipError(
                f"--head prompt: the text encoder has {len(text_encoder.classnames)} class names and "
                f"{text_encoder.embed_dim}-d features, the head {self.num_classes} classes and {embed_dim}-d "
                "embeddings; build it with the cache's model and class names"
            )
        _require(context >= 0, "context", context, "must be >= 0 (0: the length of init)")
        _require(classes_per_step >= 0, "classes_per_step", classes_per_step, "must be >= 0 (0: every class, exact)")
        _require(refresh_every >= 1, "refresh_every", refresh_every, "must be >= 1 (optimizer steps)")
        _require(chunk >= 1, "chunk", chunk, "must be >= 1 (classes per text forward)")
        _require(sample in SAMPLES, "sample", sample, f"must be one of {', '.join(SAMPLES)}")
        self.feature_dim = int(embed_dim)
        self.classifier = PromptClassifier(
            text_encoder, context=context, init=init, class_specific=class_specific,
            classes_per_step=classes_per_step, refresh_every=refresh_every, chunk=chunk, sample=sample,
        )

    @property
    def text_encoder(self) -> TextEncoder:
        return self.classifier.text

    def features(self, x):
        return F.normalize(x, dim=-1)

    def forward(self, x: Tensor, targets: Tensor | None = None) -> Tensor:
        return self.classifier(self.features(x), targets)

    def sample_macs(self, input_shape):
        return self.num_classes * self.feature_dim  # per sample; the text tower runs per step, not per sample
