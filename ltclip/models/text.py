"""Zero-shot text classifiers: class names × prompt templates → one normalised embedding per class."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SINGLE_TEMPLATE = "a photo of a {}."  # LIFT's one prompt (its trainer.py, prompt "default")


def text_classifier(
    backbone,
    classnames: list[str],
    templates: list[str],
    *,
    device: str | torch.device = "cpu",
    texts_per_batch: int = 1024,
    progress=None,
) -> np.ndarray:
    """``[C, D]`` float32: each class's prompts encoded, normalised, averaged, normalised again.

    Classes are encoded a chunk at a time (about ``texts_per_batch`` prompts per forward), so
    8,142 iNaturalist classes × 80 templates run in bounded memory. Uses open_clip's own
    tokenizer and ``build_zero_shot_classifier``.
    """
    from open_clip import build_zero_shot_classifier

    per_chunk = max(1, texts_per_batch // len(templates))
    out = np.empty((len(classnames), 0), dtype=np.float32)
    rows = []
    with torch.inference_mode():
        for start in range(0, len(classnames), per_chunk):
            chunk = classnames[start : start + per_chunk]
            weights = build_zero_shot_classifier(
                backbone.model, backbone.tokenizer, chunk, templates, num_classes_per_batch=None, device=device
            )
            rows.append(weights.T.float().cpu().numpy())
            if progress is not None:
                progress(len(chunk))
    out = np.concatenate(rows, axis=0) if rows else out
    return np.ascontiguousarray(out, dtype=np.float32)


def class_text_start(backbone, classnames: list[str], templates: list[str], pooled: bool, device="cpu") -> torch.Tensor:
    """The class rows a text-initialised head starts from: the ``templates``' zero-shot classifier,
    mapped back into the pre-projection space for a head reading the pooled feature (``pooled``)."""
    text = torch.from_numpy(text_classifier(backbone, classnames, templates, device=device))
    proj = backbone.visual.proj
    return to_pooled_space(text, proj) if pooled and proj is not None else text


def to_pooled_space(text: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Class text embeddings ``[C, D]`` mapped back into the ViT's pre-projection space ``[C, W]``:
    ``normalise(normalise(text) @ proj.T)``, as LIFT starts its classifier (trainer.py, init_head_text_feat)."""
    return F.normalize(F.normalize(text.float(), dim=-1) @ proj.detach().float().T.to(text.device), dim=-1)
