"""ltclip: CLIP-style vision-language models for long-tailed image classification.

``ltclip.load(RUN)`` (or ``ltclip.load(features=CACHE)``: zero-shot CLIP) gives a trained run as an
image classifier (:mod:`ltclip.api`); it is imported on first use, so ``import ltclip`` stays fast.
"""

__version__ = "0.1.0"
__all__ = ["Classifier", "Prediction", "__version__", "load"]

_LAZY = {"load": "api", "Classifier": "api", "Prediction": "api"}


def __getattr__(name: str):
    if name in _LAZY:  # by name: the modules below read __version__ from here, which the root does not import
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'ltclip' has no attribute {name!r}")
