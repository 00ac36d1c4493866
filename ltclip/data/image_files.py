"""Decoding one image file as RGB, within bounds: only regular files, a pixel budget, EXIF orientation."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# The largest image decoded (16384 × 16384, 0.8 GB as RGB): well above any camera's photos, which
# PIL's own decompression-bomb limit (89 Mpx, a warning; an error above 179 Mpx) would refuse.
MAX_IMAGE_PIXELS = 2**28
# The longest side decoded: the largest a JPEG can have (its header holds 16 bits per side).
MAX_IMAGE_SIDE = 65_535
# The most elongated image: resizing its short side to 1024 px (above any model's resolution)
# stays within MAX_IMAGE_PIXELS (1024 × 1024·256 = 2^28). Without it a 1 × 400,000 strip (1 KB as
# a PNG) would pass the pixel budget and become 224 × 89,600,000 px (60 GB as RGB) when resized to 224.
MAX_ASPECT_RATIO = MAX_IMAGE_PIXELS // 1024**2
_PIL_DEFAULT_LIMIT = Image.MAX_IMAGE_PIXELS
EXIF_ORIENTATION = 0x0112  # the EXIF tag


def check_image_size(width: int, height: int) -> None:
    """Refuse (``ValueError``) an image too large, too long on a side or too elongated to decode and resize."""
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{width}×{height} pixels is more than ltclip decodes ({MAX_IMAGE_PIXELS:,} pixels); downscale it")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ValueError(f"{width}×{height} pixels is more elongated than ltclip resizes (at most {MAX_ASPECT_RATIO}:1); crop it")
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ValueError(f"{width}×{height} pixels: a side is longer than ltclip decodes ({MAX_IMAGE_SIDE:,} px); downscale it")


def _check_regular(info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device or socket"
        raise ValueError(f"not a regular file ({kind})")
    if info.st_size == 0:
        raise ValueError("the file is empty (0 bytes)")


def open_regular(path: Path):
    """A binary file object on ``path``, refused (``ValueError``) unless a non-empty regular file.

    A FIFO or device is refused from its ``stat`` without being opened; the file is then opened
    without blocking and checked again on the open descriptor, so one swapped in between cannot
    hang the reader either.
    """
    _check_regular(os.stat(path))
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        _check_regular(os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def read_rgb(path: str | Path) -> Image.Image:
    """Decode an image file as 8-bit RGB, upright, whatever its mode; a file that is no readable image
    raises ``ValueError`` or ``OSError`` with a short reason.

    Only regular files are opened. The size is checked from the header before decoding
    (:func:`check_image_size`). An EXIF orientation (a phone photo taken sideways) is applied.
    CMYK, greyscale, 1-bit, palette and alpha images are PIL's ``convert("RGB")`` (a palette with
    transparency is converted through RGBA, which gives the same pixels without PIL's warning);
    16-bit greyscale (``I;16``, ``I``) is scaled to 8 bits (``round(v / 257)``), which PIL's own
    conversion would clip to 255.
    """
    if Image.MAX_IMAGE_PIXELS == _PIL_DEFAULT_LIMIT:  # ltclip checks the size itself, without a warning
        Image.MAX_IMAGE_PIXELS = None
    with open_regular(Path(path)) as f, Image.open(f) as im:
        check_image_size(*im.size)
        upright = ImageOps.exif_transpose(im) if im.getexif().get(EXIF_ORIENTATION, 1) != 1 else im
        if upright.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            grey = (np.clip(np.asarray(upright, dtype=np.int64), 0, 65535) + 128) // 257
            return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
        if upright.mode == "P" and "transparency" in upright.info:
            return upright.convert("RGBA").convert("RGB")
        return upright.convert("RGB")
