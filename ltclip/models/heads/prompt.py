"""Text-side prompt tuning (CoOp, Zhou et al. IJCV 2022) as a head, in bounded memory at 8,142 classes.

Class ``j``'s prompt is ``[SOS] ctx_1 … ctx_M <name_j tokens> . [EOS]`` in token-embedding space
(CoOp's "end" position). The learnable context ``ctx`` is shared by all classes, or one per class
(``class_specific``). It starts as the token embeddings of ``init`` (``M`` = its token count, the
default), or as ``context=N`` random vectors (normal, std 0.02) when ``init=""``. Before any
training the default head is zero-shot CLIP with the template ``"a photo of a {name}."``.

The prompts run through the frozen text tower (:class:`~ltclip.models.text_prompts.TextEncoder`),
each chunk cut after its last EOT. Logits are ``logit_scale · cos(embed, t_j)`` with CLIP's own
frozen scale ``exp(model.logit_scale)``.

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

The text tower is not a submodule (see :mod:`ltclip.models.text_prompts`):
:meth:`PromptClassifier._apply` applies ``.to()/.cuda()/.half()`` to the tower too (moving the
backbone's shared text parameters in place).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ...core.errors import LtclipError
from ..text_prompts import TextEncoder
from .base import Head, HeadInputs, HeadNeeds, require
from .factory import HEADS

SAMPLES = ("hard", "uniform")


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
            require(self.n_ctx >= 1, "init", init, "must have at least one token (or give init= and context=N)")
            require(context in (0, self.n_ctx), "context", context,
                     f"init {init!r} has {self.n_ctx} tokens: give context=0 (its length), "
                     "or init= (empty) for random vectors")
            prefix = init
        else:
            require(context >= 1, "context", context, "must be >= 1 when init is empty (e.g. context=16)")
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

    Needs ``inputs.text_encoder`` (:func:`~ltclip.models.text_prompts.text_encoder`); trains only
    ``ctx``. ``context=0`` takes ``M`` and the initial vectors from ``init``; ``init=""`` with
    ``context=N`` starts from ``N`` random ones. ``classes_per_step=0`` encodes every class at every
    step (chunked, checkpointed: exact); ``N > 0`` refreshes ``N`` classes per step and the rest
    every ``refresh_every`` steps (``sample`` = hard | uniform). ``chunk`` classes per text forward.
    """

    needs = HeadNeeds(text_encoder=True)

    def __init__(
        self, inputs: HeadInputs, *,
        context: int = 0, init: str = "a photo of a", class_specific: bool = False,
        classes_per_step: int = 0, refresh_every: int = 10, chunk: int = 128, sample: str = "hard",
    ):
        super().__init__(inputs)
        require(context >= 0, "context", context, "must be >= 0 (0: the length of init)")
        require(classes_per_step >= 0, "classes_per_step", classes_per_step, "must be >= 0 (0: every class, exact)")
        require(refresh_every >= 1, "refresh_every", refresh_every, "must be >= 1 (optimizer steps)")
        require(chunk >= 1, "chunk", chunk, "must be >= 1 (classes per text forward)")
        require(sample in SAMPLES, "sample", sample, f"must be one of {', '.join(SAMPLES)}")
        self.feature_dim = int(inputs.embed_dim)
        self.classifier = PromptClassifier(
            inputs.text_encoder, context=context, init=init, class_specific=class_specific,
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
