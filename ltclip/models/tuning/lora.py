"""LoRA on open_clip's ViT: low-rank updates ``W + (alpha/rank)·B A`` of the block weights.

Written here rather than with HF ``peft`` (0.21.2 was tried): peft targets a whole
``nn.MultiheadAttention`` only, with one joint factor pair for the fused q/k/v projection and
always the output projection too, and it does so, in its own words, by merging the weights before
each forward call and unmerging them after (``F.multi_head_attention_forward`` reads
``in_proj_weight`` directly, and ``out_proj.forward`` is never called). It would also bring
transformers and accelerate along.

Here each update is a ``torch.nn.utils.parametrize`` parametrization of the weight, so every
forward path — ``encode_image``, ``Backbone.encode``, open_clip's fast path, gradient
checkpointing, DDP — sees ``W + ΔW`` with no patching. The fused ``in_proj_weight`` [3W, W] gets
SEPARATE factors for each targeted one of q, k and v: ``A`` [r, W] and ``B`` [W, r] per
projection, zero rows for the untargeted ones. A weight-space update cannot drop its input, so
there is no LoRA dropout. The base weight moves to ``<module>.parametrizations.<name>.original`` in
the state dict; the factors are ``….parametrizations.<name>.0.A`` / ``.B``.

The defaults are LIFT's LoRA (``models/peft_modules.py`` ``LoRA``, placed in ``models/peft_vit.py``
``Peft_ViT.forward``): q and v of every block, rank from the class count (``rank=auto``,
:func:`~.core.lift_width`), scaling ``alpha / rank`` = 1/r, ``B`` zero (the tuned model starts
equal to the base) and ``A`` uniform in ±1/sqrt(r) — LIFT's Kaiming-uniform (a=√5) of its [W, r]
factor ``x @ A``, whose fan-in as torch computes it is r. ``blocks=k``: the last k blocks only.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from .core import ALL, AUTO, TUNING, Inserted, last_blocks, placed, require, require_vit, width

# target → (submodule of a block, weight name, which of its equal row blocks; None: the whole weight)
TARGETS = {
    "q": ("attn", "in_proj_weight", 0),
    "k": ("attn", "in_proj_weight", 1),
    "v": ("attn", "in_proj_weight", 2),
    "out": ("attn.out_proj", "weight", None),
    "fc": ("mlp.c_fc", "weight", None),
    "proj": ("mlp.c_proj", "weight", None),
}


class LoRADelta(Inserted):
    """``W ↦ W + scaling · B A`` on the selected row blocks of a weight split into ``parts`` equal ones."""

    def __init__(self, shape: torch.Size, rank: int, alpha: float, rows: tuple[int, ...], parts: int):
        super().__init__()
        self.out, self.fan_in = shape[0] // parts, shape[1]
        self.rows, self.parts, self.scaling = rows, parts, alpha / rank
        bound = 1 / math.sqrt(rank)
        self.A = nn.Parameter(torch.empty(len(rows), rank, self.fan_in).uniform_(-bound, bound))
        self.B = nn.Parameter(torch.zeros(len(rows), self.out, rank))

    def extra_repr(self) -> str:
        return f"rank={self.A.shape[1]}, rows={self.rows} of {self.parts}, scaling={self.scaling:g}"

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        delta = self.scaling * (self.B @ self.A)  # [len(rows), out, fan_in]
        if self.parts == 1:
            return W + delta[0]
        blocks = [W.new_zeros(self.out, self.fan_in)] * self.parts
        for i, row in enumerate(self.rows):
            blocks[row] = delta[i]
        return W + torch.cat(blocks)


@TUNING.register("lora")
def lora(visual, *, rank: str = AUTO, alpha: float = 1.0, targets: str = "q,v", blocks: str = ALL,
         num_classes: int | None = None) -> None:
    """Low-rank updates (alpha/rank)·B A of each block's attention (and optionally MLP) weights (LIFT: q, v).

    ``targets``: comma-separated among q, k, v (separate factors for each part of the fused
    in_proj), out (attn.out_proj), fc and proj (mlp.c_fc, mlp.c_proj).
    """
    chosen_blocks = last_blocks(visual, "lora", blocks)
    chosen = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in TARGETS]
    require(chosen and not unknown, "targets", targets, f"choose among {', '.join(TARGETS)} (comma-separated)")
    r = width("rank", rank, num_classes, len(require_vit(visual, "lora")))
    weights: dict[tuple[str, str], list[int | None]] = {}
    for t in dict.fromkeys(chosen):
        path, name, row = TARGETS[t]
        weights.setdefault((path, name), []).append(row)
    for block in chosen_blocks:
        for (path, name), rows in weights.items():
            module = block.get_submodule(path)
            weight = getattr(module, name)
            fused = rows != [None]
            delta = LoRADelta(weight.shape, r, alpha, tuple(sorted(rows)) if fused else (0,), 3 if fused else 1)
            parametrize.register_parametrization(module, name, placed(delta, weight))


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its weight, which becomes a plain parameter ``W + scaling · B A``
    (no parametrization left: the base architecture); the number of weights merged."""
    merged = 0
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for name, chain in list(module.parametrizations.items()):
            if all(isinstance(p, LoRADelta) for p in chain):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                merged += 1
    return merged
