"""ltclip: CLIP-style vision-language models for long-tailed image classification."""

__version__ = "0.1.0"
