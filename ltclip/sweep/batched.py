"""K linear/cosine heads trained as one model on the same batches.

Their logits are one matrix product of the batch with the K heads' class weights stacked
(``[B, D] @ [K·C, D]ᵀ``, once per kind of head), their losses a sum (one cross-entropy call for
every head whose loss declares itself a softmax cross-entropy of offset logits, see
:func:`~ltclip.methods.losses.softmax_offset`), so each head's gradient is its own. Each head keeps
its own parameters (the engine gives every head its own optimizer groups, lr, weight decay and
schedule) and its own best weights on val, kept in buffers of the stack so that the engine's
checkpoint carries them and a killed group resumes exactly.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine import SUMMARY_KEYS
from ..methods.losses import compute_loss, softmax_offset
from ..models.heads import CosineHead, LinearHead

BATCHABLE_HEADS = ("linear", "cosine")  # heads whose logits are a (scaled) product with one class-weight matrix


def log_key(metric: str, name: str) -> str:
    """The log record key of head ``name``'s validation ``metric``."""
    return f"val_{metric}/{name}"


class HeadStack(nn.Module):
    """``heads`` (linear or cosine, named ``names``) as one model; ``forward(x, active)`` gives the
    logits ``[B, len(active), C]`` of the heads in ``active`` (default: all), one matrix product per
    kind of head (linear on normalised or on raw inputs, cosine).

    ``keep_best(record)`` (the engine's ``on_record``) keeps, for each head, the weights of the
    record with its best ``selects[k]`` metric (the first of equal scores, as the engine's model
    selection does), among the records of its own ``epochs[k]`` epochs.
    """

    def __init__(self, heads: Sequence[nn.Module], names: Sequence[str], selects: Sequence[str], epochs: Sequence[int]):
        super().__init__()
        for head in heads:
            if not isinstance(head, (LinearHead, CosineHead)):
                raise ValueError(f"HeadStack stacks {', '.join(BATCHABLE_HEADS)} heads, not {type(head).__name__}")
        self.heads = nn.ModuleList(heads)
        self.best = nn.ModuleList(copy.deepcopy(h).requires_grad_(False).eval() for h in heads)
        self.names, self.selects, self.epochs = list(names), list(selects), list(epochs)
        self.kinds = ["cosine" if isinstance(h, CosineHead) else "linear" if h.normalize else "raw" for h in heads]
        self._classifiers = tuple(h.classifier for h in heads)  # a plain tuple: read each step without module lookups
        k = len(heads)
        self.register_buffer("best_epoch", torch.full((k,), -1, dtype=torch.int64))
        self.register_buffer("best_step", torch.full((k,), -1, dtype=torch.int64))
        self.register_buffer("best_metrics", torch.full((k, len(SUMMARY_KEYS)), math.nan, dtype=torch.float64))

    def train(self, mode: bool = True) -> "HeadStack":
        """The stack's own mode only: it reads its heads' weights and never calls them (linear and
        cosine heads have no mode-dependent layer), and the engine switches modes twice an epoch,
        which through 2K heads' modules was a tenth of a quick sweep."""
        self.training = mode
        return self

    def forward(self, x: Tensor, active: Sequence[int] | None = None) -> Tensor:
        active = list(range(len(self.heads))) if active is None else list(active)
        z = F.normalize(x, dim=-1) if any(self.kinds[k] != "raw" for k in active) else None
        parts, order = [], []
        for kind in ("linear", "raw", "cosine"):
            ks = [k for k in active if self.kinds[k] == kind]
            if ks:
                parts.append(self._logits(kind, ks, x if kind == "raw" else z))
                order += ks
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return out if order == active else out[:, [order.index(k) for k in active]]

    def _logits(self, kind: str, ks: list[int], z: Tensor) -> Tensor:
        """``[B, len(ks), C]``: the logits of heads ``ks`` (all of ``kind``) on inputs ``z``, one matrix product."""
        classifiers = [self._classifiers[k] for k in ks]
        weight = torch.cat([c.weight for c in classifiers])  # [len(ks)·C, D]
        if kind == "cosine":
            scale = torch.stack([c.scale for c in classifiers])
            return (z @ F.normalize(weight, dim=-1).T).view(len(z), len(ks), -1) * scale[:, None]
        logits = torch.addmm(torch.cat([c.bias for c in classifiers]), z, weight.T).view(len(z), len(ks), -1)
        if not any(hasattr(c, "logit_scale") for c in classifiers):  # heads without a logit scale (scale=0)
            return logits
        one = logits.new_ones(())
        return logits * torch.stack([getattr(c, "logit_scale", one) for c in classifiers])[:, None]

    @torch.no_grad()
    def keep_best(self, record: dict) -> None:
        for k, name in enumerate(self.names):
            score = record.get(log_key(self.selects[k], name))
            if score is None or record["epoch"] >= self.epochs[k]:
                continue
            best = self.best_metrics[k, SUMMARY_KEYS.index(self.selects[k])].item()
            if self.best_step[k] < 0 or score > best:
                for kept, now in zip(_tensors(self.best[k]), _tensors(self.heads[k])):
                    kept.copy_(now)
                self.best_epoch[k], self.best_step[k] = record["epoch"], record["step"]
                values = [record.get(log_key(m, name)) for m in SUMMARY_KEYS]
                self.best_metrics[k] = torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64)

    def best_record(self, k: int) -> dict | None:
        """Head ``k``'s selected validation as the engine records it: epoch, step and ``val_<metric>``s."""
        if self.best_step[k] < 0:
            return None
        metrics = {f"val_{m}": None if math.isnan(v) else v for m, v in zip(SUMMARY_KEYS, self.best_metrics[k].tolist())}
        return {"epoch": int(self.best_epoch[k]), "step": int(self.best_step[k]), **metrics}


def _tensors(module: nn.Module) -> list[Tensor]:
    return [*module.parameters(), *module.buffers()]


class StackTask:
    """The engine's task for a :class:`HeadStack`: the sum of each head's own loss.

    ``losses[k] = (name, options)``; head ``k`` trains for ``epochs[k]`` epochs and is left out of
    the forward from then on (no gradient: the optimizer skips its parameters), and its loss sees
    its own ``total_epochs`` (LDAM's deferred re-weighting). The engine's ``total_epochs`` (the
    longest head's) is not used. The heads whose loss is a softmax cross-entropy of offset logits
    (as its registration declares: :func:`~ltclip.methods.losses.softmax_offset`) share one
    cross-entropy call over their ``[B·n, C]`` logits; every other head's loss is its own call.
    """

    def __init__(self, losses: Sequence[tuple[str, dict]], class_counts, epochs: Sequence[int]):
        self.losses, self.epochs = list(losses), list(epochs)
        self.counts = torch.as_tensor(class_counts, dtype=torch.float32)
        self.total_epochs = max(self.epochs)
        offsets = [softmax_offset(name, class_counts, **opts) for name, opts in self.losses]
        self.softmax = [k for k, o in enumerate(offsets) if o is not None]
        self.offsets = torch.stack([o for o in offsets if o is not None]).float() if self.softmax else None  # [n, C]

    def to(self, device) -> "StackTask":
        self.counts = self.counts.to(device)
        self.offsets = None if self.offsets is None else self.offsets.to(device)
        return self

    def __call__(self, model: HeadStack, x: Tensor, y: Tensor, epoch: int):
        active = [k for k, e in enumerate(self.epochs) if epoch < e]
        logits = model(x, active)
        shared = [i for i, k in enumerate(active) if k in self.softmax]
        losses = [compute_loss(self.losses[k][0], logits[:, i].float(), y, self.counts, epoch=epoch,
                               total_epochs=self.epochs[k], **self.losses[k][1])
                  for i, k in enumerate(active) if k not in self.softmax]
        if shared:
            z = (logits if len(shared) == len(active) else logits[:, shared]).float()
            offsets = self.offsets[[self.softmax.index(active[i]) for i in shared]]
            losses.append(F.cross_entropy((z + offsets).flatten(0, 1), y.repeat_interleave(len(shared)), reduction="sum") / len(y))
        return sum(losses[1:], losses[0]), logits
