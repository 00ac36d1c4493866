"""``ltclip predict``'s config (which model, which images, how they are viewed, where the predictions go)
and ``ltclip export``'s (which model, which file)."""

from __future__ import annotations

from dataclasses import dataclass

from .fields import REQUIRED, option
from .values import BAD_IMAGE_POLICIES, DEVICES, ENCODE_PRECISIONS, EXPORT_FORMATS, INTERPOLATIONS, TEST_VIEWS


@dataclass(frozen=True)
class PredictConfig:
    """``ltclip predict``: a run's (or a cache's zero-shot) top-k classes of image files."""

    run: str | None = None  # the command's first argument (none with --zero-shot)
    paths: tuple[str, ...] = ()  # the command's other arguments: image files and folders
    list_file: str | None = option(None, "File of image paths, one per line (relative ones: to the file's folder).",
                                   flag="--list", input="file")
    zero_shot: bool = option(False, "Zero-shot CLIP with a cache's text embeddings (--features); no run.")
    features: str | None = option(None, "Cache folder whose encoder and text embeddings --zero-shot uses.", short="-f",
                                  input="cache")
    top_k: int = option(5, "Classes per image, most probable first.", short="-k", minimum=1)
    out: str | None = option(None, "Write the predictions to this .csv or .jsonl file.", short="-o",
                             default_text="a table on stdout")
    test_views: str = option("center", "Views of each image whose logits are averaged: center, flip, fivecrop or tencrop.", one_of=TEST_VIEWS)
    eval_resize: int | None = option(None, "Resize the short side to this before cropping the views.",
                                     default_text="the run's (or cache's) recorded value", minimum=0)
    interpolation: str | None = option(None, "bilinear or bicubic resampling of the --eval-resize views.",
                                       default_text="the run's (or cache's) recorded value", one_of=INTERPOLATIONS)
    bad_images: str = option("fail", "Unreadable images: fail (stop) or skip (warn, no prediction).", one_of=BAD_IMAGE_POLICIES)
    batch_size: int = option(64, "Images per forward pass.", minimum=1)
    workers: int | None = option(None, "Image decode workers.", default_text="this process's share of the CPUs, at most 8",
                                 minimum=0)
    device: str = option("auto", "auto (cuda when a GPU is visible, else cpu), cpu, cuda or cuda:N.", one_of=DEVICES)
    precision: str = option("fp32", "fp32, fp16 or bf16 (autocast).", one_of=ENCODE_PRECISIONS)


@dataclass(frozen=True)
class ExportConfig:
    """``ltclip export``: a run (or a cache's zero-shot classifier) as one file for another program."""

    out: str = option(REQUIRED, "The file to write (.pt for torchscript, .pt2 for export); never replaced.", short="-o")
    run: str | None = None  # the command's argument (none with --zero-shot)
    format: str = option("torchscript", "torchscript (torch.jit.load) or export (torch.export.load, a .pt2 program).", one_of=EXPORT_FORMATS)
    zero_shot: bool = option(False, "Export zero-shot CLIP with a cache's text embeddings (--features); no run.")
    features: str | None = option(None, "Cache folder whose encoder and text embeddings --zero-shot uses.", short="-f",
                                  input="cache")
    batch_size: int = option(2, "Images in the example batch the model is traced with (other sizes work too).", minimum=1)
    device: str = option("cpu", "cpu, cuda or cuda:N (or auto): where the model is traced (and the file's weights lie).",
                         one_of=DEVICES)
