"""Prompt templates for zero-shot classifiers: named sets or a file with one ``{}`` template per line.

The named sets live here, not beside the datasets that use them: datasets name their set
(``LTDataset.templates``) and depend on this module, never the other way round.
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import LtclipError

# OpenAI CLIP's CIFAR-100 prompt templates (CLIP repository, data/prompts.md).
CIFAR100_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)

# For the built-in synthetic shapes (ltclip.data.synthetic): class names read "striped red circle".
SYNTHETIC_TEMPLATES = (
    "a photo of a {}.",
    "a drawing of a {}.",
    "a {} shape.",
    "an image of a {}.",
    "a small picture of a {}.",
)


def _open_clip_templates(attr: str) -> list[str]:
    # open_clip imports torch: load it only when one of its sets is asked for, not with this module.
    from open_clip import zero_shot_metadata

    # open_clip stores templates as functions of the class name; render them back to "{}" strings.
    return [t("{}") for t in getattr(zero_shot_metadata, attr)]


NAMED_TEMPLATES = {
    "openai_imagenet": lambda: _open_clip_templates("OPENAI_IMAGENET_TEMPLATES"),
    "simple": lambda: _open_clip_templates("SIMPLE_IMAGENET_TEMPLATES"),
    "synthetic": lambda: list(SYNTHETIC_TEMPLATES),
    "cifar": lambda: list(CIFAR100_TEMPLATES),
}


def resolve_templates(name_or_file: str) -> list[str]:
    """A named template set (``openai_imagenet``: OpenAI's 80) or a text file of templates."""
    if name_or_file in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[name_or_file]()
    path = Path(name_or_file)
    if not path.is_file():
        raise LtclipError(
            f"--templates {name_or_file!r}: neither a template file nor one of {', '.join(NAMED_TEMPLATES)}"
        )
    templates = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise LtclipError(f"{path}: every line must be a template with exactly one '{{}}' (bad: {bad[:1] or 'empty file'})")
    return templates
