"""Prompt templates for zero-shot classifiers: named sets or a file with one ``{}`` template per line."""

from __future__ import annotations

from pathlib import Path

from ..errors import LtclipError


def _open_clip_templates(attr: str) -> list[str]:
    from open_clip import zero_shot_metadata

    # open_clip stores templates as functions of the class name; render them back to "{}" strings.
    return [t("{}") for t in getattr(zero_shot_metadata, attr)]


def _synthetic() -> list[str]:
    from .synthetic import SYNTHETIC_TEMPLATES

    return list(SYNTHETIC_TEMPLATES)


def _cifar() -> list[str]:
    from .cifar import CIFAR100_TEMPLATES

    return list(CIFAR100_TEMPLATES)


NAMED_TEMPLATES = {
    "openai_imagenet": lambda: _open_clip_templates("OPENAI_IMAGENET_TEMPLATES"),
    "simple": lambda: _open_clip_templates("SIMPLE_IMAGENET_TEMPLATES"),
    "synthetic": _synthetic,
    "cifar": _cifar,
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
