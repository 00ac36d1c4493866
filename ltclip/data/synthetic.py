"""The built-in long-tailed image set: coloured, textured shapes drawn procedurally.

Classes are combinations a text encoder can read ("red triangle", "striped blue circle"), so
zero-shot prompts make sense. ``make_synthetic`` writes the images plus split files in the same
``relative/path label`` format as the real benchmarks, so the generic manifest loader reads it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from ..core.errors import LtclipError

# Bump when the drawing changes: a folder made by another version is refused, not reused.
GENERATOR_VERSION = 1
META_FILE = "synthetic.json"  # written last: its presence marks a complete set
PARTIAL_FILE = "synthetic.partial.json"  # present while a generation is in progress
SPLITS = ("train", "val", "test")

COLOURS = {
    "red": (210, 35, 35),
    "green": (40, 170, 60),
    "blue": (35, 70, 215),
    "yellow": (235, 215, 40),
    "purple": (135, 50, 175),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}


def _regular(n: int, phase: float = 0.0) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star() -> np.ndarray:
    return _regular(10) * np.where(np.arange(10) % 2 == 0, 1.0, 0.42)[:, None]


_W = 0.3  # half-width of a cross's arms
# Outlines with circumradius 1 before rotation and scaling; circle and ring are (outer, inner) radii.
SHAPES: dict[str, np.ndarray | tuple[float, float]] = {
    "circle": (0.85, 0.0),
    "square": _regular(4, np.pi / 4),
    "triangle": _regular(3, np.pi / 2),
    "star": _star(),
    "cross": np.array(
        [(_W, 1), (_W, _W), (1, _W), (1, -_W), (_W, -_W), (_W, -1),
         (-_W, -1), (-_W, -_W), (-1, -_W), (-1, _W), (-_W, _W), (-_W, 1)], dtype=float
    ),
    "ring": (0.9, 0.5),
    "diamond": np.array([(0, 1), (0.55, 0), (0, -1), (-0.55, 0)], dtype=float),
    "hexagon": _regular(6),
}
TEXTURES = ("plain", "striped", "dotted")
MAX_CLASSES = len(SHAPES) * len(COLOURS) * len(TEXTURES)


def _class_parts(label: int) -> tuple[str, str, str]:
    """(texture, colour, shape) of a class: consecutive classes differ in both shape and colour."""
    texture, j = divmod(label, len(SHAPES) * len(COLOURS))
    shape = j % len(SHAPES)
    colour = (shape + j // len(SHAPES)) % len(COLOURS)  # a Latin square: every pair once
    return TEXTURES[texture], list(COLOURS)[colour], list(SHAPES)[shape]


def synthetic_classnames(classes: int) -> list[str]:
    """Class names in label order, e.g. ``red circle``, ``green square``, …, ``striped red circle``."""
    names = []
    for label in range(classes):
        texture, colour, shape = _class_parts(label)
        names.append(f"{colour} {shape}" if texture == "plain" else f"{texture} {colour} {shape}")
    return names


def synthetic_train_counts(classes: int, imbalance: float, max_per_class: int) -> list[int]:
    """Exponential profile n_i = round(max_per_class · imbalance^(−i/(C−1))), at least 1."""
    return [max(1, round(max_per_class * imbalance ** (-i / (classes - 1)))) for i in range(classes)]


def _image_rng(seed: int, split: str, label: int, index: int) -> np.random.Generator:
    """Each image has its own stream, so output does not depend on worker count or order."""
    return np.random.default_rng([seed, SPLITS.index(split), label, index])


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Coverage in [0, 1] of one randomly placed, scaled and rotated shape (drawn at 2× then averaged)."""
    big = 2 * size
    radius = rng.uniform(0.2, 0.38) * big
    cx, cy = rng.uniform(radius, big - radius, size=2)
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    outline = SHAPES[shape]
    if isinstance(outline, tuple):
        for r, fill in zip(outline, (255, 0)):
            if r:
                draw.ellipse((cx - r * radius, cy - r * radius, cx + r * radius, cy + r * radius), fill=fill)
    else:
        angle = rng.uniform(0, 2 * np.pi)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        points = outline @ rot.T * radius + (cx, cy)
        draw.polygon([tuple(p) for p in points.tolist()], fill=255)
    return np.asarray(canvas.reduce(2), dtype=np.float32) / 255.0


def _texture(texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """1 where the shape shows its colour, 0 where it shows the darker second tone."""
    if texture == "plain":
        return np.ones((size, size), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(0.12, 0.2) * size
    if texture == "striped":
        angle = rng.uniform(0, np.pi)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) / period + rng.uniform()
        return (phase % 1.0 < 0.5).astype(np.float32)
    u = (xx / period + rng.uniform()) % 1.0 - 0.5
    v = (yy / period + rng.uniform()) % 1.0 - 0.5
    return (u * u + v * v >= 0.3**2).astype(np.float32)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A muted, low-saturation base with a gradient and soft blotches (float RGB, size×size×3)."""
    base = rng.uniform(80, 175) + rng.uniform(-20, 20, size=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    gradient = rng.uniform(0, 40) * (xx * np.cos(angle) + yy * np.sin(angle))
    blotches = rng.normal(0, 12, size=(4, 4, 3))
    blotch_img = Image.fromarray(np.clip(blotches + 128, 0, 255).astype(np.uint8))
    soft = np.asarray(blotch_img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) - 128
    return (base + gradient[..., None] + soft).astype(np.float32)


def render_image(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one image of class ``label`` from ``rng``."""
    texture, colour, shape = _class_parts(label)
    rgb = (np.asarray(COLOURS[colour]) + rng.uniform(-15, 15, size=3)).astype(np.float32)
    # Dark colours pair with a lighter second tone, others with a darker one.
    second = rgb + 110 if rgb.mean() < 60 else rgb * 0.35
    background = _background(size, rng)
    mask = _shape_mask(shape, size, rng)[..., None]
    pattern = _texture(texture, size, rng)[..., None]
    fill = pattern * rgb + (1 - pattern) * second
    noise = rng.standard_normal((size, size, 3), dtype=np.float32) * rng.uniform(4, 14)
    image = (1 - mask) * background + mask * fill + noise
    return Image.fromarray(np.clip(image + 0.5, 0, 255).astype(np.uint8))


def _image_key(split: str, folder: str, index: int) -> str:
    return f"{split}/{folder}/{index:04d}.png"


def _write_batch(out_dir: str, seed: int, size: int, folders: list[str], jobs: list[tuple[str, int, int]]) -> int:
    for split, label, index in jobs:
        image = render_image(label, size, _image_rng(seed, split, label, index))
        image.save(os.path.join(out_dir, _image_key(split, folders[label], index)), format="PNG")
    return len(jobs)


def _check_params(params: dict, workers: int) -> None:
    combos = f"{len(SHAPES)} shapes × {len(COLOURS)} colours × {len(TEXTURES)} textures"
    limits = {
        "classes": (2, MAX_CLASSES, f" ({combos})"),
        "imbalance": (1, math.inf, ""),
        "max_per_class": (1, math.inf, ""),
        "val_per_class": (1, math.inf, ""),
        "test_per_class": (1, math.inf, ""),
        "size": (16, 1024, ""),
        "seed": (0, math.inf, ""),
        "workers": (1, math.inf, ""),
    }
    for key, (low, high, note) in limits.items():
        value = workers if key == "workers" else params[key]
        if not (low <= value <= high and math.isfinite(value)):
            bound = f"between {low} and {high}" if math.isfinite(high) else f">= {low}"
            raise LtclipError(f"--{key.replace('_', '-')} must be {bound}{note}; got {value}")


def _summary(out_dir: Path, params: dict, skipped: bool) -> dict:
    train = synthetic_train_counts(params["classes"], params["imbalance"], params["max_per_class"])
    return {
        "out_dir": str(out_dir),
        "skipped": skipped,
        "params": params,
        "classnames": synthetic_classnames(params["classes"]),
        "train_counts": train,
        "images": {
            "train": sum(train),
            "val": params["val_per_class"] * params["classes"],
            "test": params["test_per_class"] * params["classes"],
        },
    }


def _existing_set(out_dir: Path, params: dict) -> bool:
    """True if ``out_dir`` already holds this exact set; raises if it holds something else."""
    meta_path = out_dir / META_FILE
    if meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8"))["params"]
        except (ValueError, KeyError, TypeError):
            raise LtclipError(f"{meta_path}: unreadable synthetic-set description; use another output folder") from None
        for key, value in params.items():
            if old.get(key) != value:
                what = "generator version" if key == "version" else f"--{key.replace('_', '-')}"
                raise LtclipError(
                    f"{out_dir} holds a synthetic set made with {what} {old.get(key)}, not {value}; "
                    "use another output folder (or the same options)"
                )
        return True
    if out_dir.exists() and not (out_dir / PARTIAL_FILE).is_file() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise LtclipError(
            f"{out_dir} is neither an empty folder nor a synthetic set; choose a new or empty output folder"
        )
    return False


def _write_text(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def make_synthetic(
    out_dir: str | Path,
    *,
    classes: int = 20,
    imbalance: float = 100.0,
    max_per_class: int = 200,
    val_per_class: int = 20,
    test_per_class: int = 20,
    size: int = 64,
    seed: int = 0,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Draw the long-tailed set into ``out_dir`` and return a summary (see ``_summary``).

    Layout: ``{train,val,test}/<class_folder>/<index>.png``, split files ``train.txt``,
    ``val.txt``, ``test.txt`` (``relative/path label``), ``classnames.txt`` (``folder class name``)
    and, last, ``synthetic.json`` with the parameters. A folder that already holds the same set is
    left as is (``summary["skipped"]``); one holding a different set is refused. An interrupted
    generation (``synthetic.partial.json`` present) is redrawn from scratch. ``progress`` is called
    with the number of images written so far.
    """
    out_dir = Path(out_dir)
    params = {
        "version": GENERATOR_VERSION,
        "classes": int(classes),
        "imbalance": float(imbalance),
        "max_per_class": int(max_per_class),
        "val_per_class": int(val_per_class),
        "test_per_class": int(test_per_class),
        "size": int(size),
        "seed": int(seed),
    }
    _check_params(params, workers)
    if _existing_set(out_dir, params):
        return _summary(out_dir, params, skipped=True)

    summary = _summary(out_dir, params, skipped=False)
    names = summary["classnames"]
    folders = [name.replace(" ", "_") for name in names]
    per_split = {
        "train": summary["train_counts"],
        "val": [params["val_per_class"]] * params["classes"],
        "test": [params["test_per_class"]] * params["classes"],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / PARTIAL_FILE).write_text(json.dumps({"params": params}), encoding="utf-8")
    for split in SPLITS:
        shutil.rmtree(out_dir / split, ignore_errors=True)  # leftovers of an interrupted run
        for folder in folders:
            (out_dir / split / folder).mkdir(parents=True)

    jobs = [(split, label, i) for split in SPLITS for label, n in enumerate(per_split[split]) for i in range(n)]
    batches = [jobs[i : i + 128] for i in range(0, len(jobs), 128)]
    write = functools.partial(_write_batch, str(out_dir), params["seed"], params["size"], folders)
    done = 0
    with contextlib.ExitStack() as stack:
        mapper = map if workers == 1 else stack.enter_context(ProcessPoolExecutor(workers)).map
        for n in mapper(write, batches):
            done += n
            if progress is not None:
                progress(done)

    for split in SPLITS:
        _write_text(
            out_dir / f"{split}.txt",
            [f"{_image_key(s, folders[label], i)} {label}" for s, label, i in jobs if s == split],
        )
    _write_text(out_dir / "classnames.txt", [f"{folder} {name}" for folder, name in zip(folders, names)])
    meta = {key: summary[key] for key in ("params", "classnames", "train_counts", "images")}
    tmp = out_dir / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / META_FILE)
    (out_dir / PARTIAL_FILE).unlink()
    return summary
