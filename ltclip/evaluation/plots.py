"""The report's figures (PNG): shot-group bars per method, and per-class accuracy against training frequency.

Results are those of :mod:`ltclip.evaluation.report`: :func:`ltclip.evaluation.metrics.evaluate` dicts with ``name``,
``kind``, ``dataset``, ``split`` and, for the per-class figure, ``train_counts``. ``eval --plot
PATH`` writes both (:func:`write_plots`): the bars at ``PATH``, the per-class figure beside it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.atomic import atomic_path
from ..core.errors import LtclipError
from .metrics import as_numpy

# Shot groups in the order the bars show them: (result key, colour).
GROUP_BARS = (("many", "#4c72b0"), ("medium", "#55a868"), ("few", "#c44e52"), ("top1", "#8c8c8c"))
ZERO_SHOT_COLOUR = "0.45"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def _where(results: Sequence[dict]) -> str:
    return ", ".join(f"{d} / {s}" for d, s in dict.fromkeys((r.get("dataset"), r.get("split")) for r in results))


def _zero_shot_first(results: Sequence[dict]) -> list[dict]:
    return sorted(results, key=lambda r: r.get("kind") != "zero-shot")  # stable, as the Markdown table


def per_class_path(path: str | os.PathLike) -> Path:
    """Where :func:`write_plots` puts the per-class figure of ``--plot path``: ``<stem>_per_class<suffix>`` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}_per_class{path.suffix or '.png'}")


def write_plots(results: Sequence[dict], path: str | os.PathLike, *, many_threshold: int = 100,
                few_threshold: int = 20) -> tuple[Path, Path]:
    """Shot-group bars at ``path`` and the per-class figure at ``<stem>_per_class<suffix>`` beside it."""
    path = Path(path)
    per_class = per_class_path(path)
    thresholds = {"many_threshold": many_threshold, "few_threshold": few_threshold}
    return plot_shot_groups(results, path, **thresholds), plot_per_class(results, per_class, **thresholds)


# ----------------------------------------------------------------------------- shot-group bars


def plot_shot_groups(
    results: Sequence[dict],
    path: str | os.PathLike,
    *,
    many_threshold: int = 100,
    few_threshold: int = 20,
    title: str | None = None,
) -> Path:
    """PNG of top-1 accuracy per method (one row each, zero-shot first): bars for Many, Medium, Few and All.

    Each bar is labelled with its value; a group a result has no classes in (None) has no bar and
    reads "—". A dotted line per group marks the zero-shot value where there is a zero-shot row.
    Written atomically.
    """
    from matplotlib.patches import Patch

    if not results:
        raise LtclipError("no results to plot")
    rows = _zero_shot_first(results)
    several = len({(r.get("dataset"), r.get("split")) for r in rows}) > 1
    labels = [str(r.get("name", f"result {i}")) + (f" ({r.get('dataset')} / {r.get('split')})" if several else "")
              for i, r in enumerate(rows)]
    names = {"many": f"Many (> {many_threshold})", "medium": f"Medium ({few_threshold}–{many_threshold})",
             "few": f"Few (< {few_threshold})", "top1": "All"}
    fig = _figure(10, max(3.0, 1.2 + 0.62 * len(rows)))
    ax = fig.add_subplot()
    height = 0.8 / len(GROUP_BARS)
    zero_shot = next((r for r in rows if r.get("kind") == "zero-shot"), None)
    for j, (key, colour) in enumerate(GROUP_BARS):
        offset = (j - (len(GROUP_BARS) - 1) / 2) * height
        values = [r.get(key) for r in rows]
        ys = [i + offset for i, v in enumerate(values) if v is not None]
        shown = [v for v in values if v is not None]
        ax.barh(ys, shown, height=height * 0.92, color=colour)
        for i, v in enumerate(values):
            ax.text(1 if v is None else v + 0.8, i + offset, "—" if v is None else f"{v:.1f}", va="center", fontsize=6.5)
        if zero_shot is not None and zero_shot.get(key) is not None and len(rows) > 1:
            ax.axvline(zero_shot[key], color=colour, linestyle=":", linewidth=1, alpha=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # the first row at the top, as in the table
    ax.set_xlim(0, 108)
    ax.set_xlabel("top-1 accuracy (%)" + ("; dotted: zero-shot" if zero_shot is not None and len(rows) > 1 else ""))
    ax.set_title(title or f"Accuracy by shot group — {_where(rows)}")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(handles=[Patch(color=colour, label=names[key]) for key, colour in GROUP_BARS], loc="upper left",
              bbox_to_anchor=(1.01, 1.0), fontsize=8, framealpha=0.9)  # beside the bars, never over them
    return _save(fig, path)


# ----------------------------------------------------------------------------- per class


def _binned_mean(counts: np.ndarray, acc: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean accuracy in ``bins`` log-spaced frequency bins (empty bins dropped), placed at the
    geometric mean count of each bin's classes."""
    logc = np.log(counts)
    span = logc.max() - logc.min()
    if span == 0:
        which = np.zeros(len(counts), int)
    else:
        which = np.minimum(((logc - logc.min()) / span * bins).astype(int), bins - 1)
    used = np.unique(which)
    x = np.array([math.exp(logc[which == b].mean()) for b in used])
    y = np.array([acc[which == b].mean() for b in used])
    return x, y


def _per_class_points(result: dict) -> tuple[np.ndarray, np.ndarray]:
    """(train count, accuracy) of the classes present in the eval set, sorted by count."""
    name = result.get("name", "?")
    if result.get("train_counts") is None or result.get("per_class") is None:
        raise LtclipError(f"result {name!r} needs 'train_counts' and 'per_class' for the per-class plot")
    counts = as_numpy(result["train_counts"], np.float64)
    acc = np.array([np.nan if a is None else a for a in result["per_class"]], np.float64)
    if counts.shape != acc.shape:
        raise LtclipError(
            f"result {name!r}: {counts.size} train counts but {acc.size} per-class accuracies; "
            "use the counts of the same class list"
        )
    keep = ~np.isnan(acc) & (counts > 0)  # absent from the eval set, or no training image (no log position)
    order = np.argsort(counts[keep], kind="stable")
    return counts[keep][order], acc[keep][order]


def _shot_regions(ax, few_threshold: int, many_threshold: int) -> None:
    """Dashed lines at the thresholds and the group names above the data, on a log x axis."""
    for threshold in (few_threshold, many_threshold):
        ax.axvline(threshold, color="0.4", linestyle="--", linewidth=1)
    trans = ax.get_xaxis_transform()
    lo, hi = ax.get_xlim()
    regions = {"few": (lo, few_threshold), "medium": (few_threshold, many_threshold), "many": (many_threshold, hi)}
    for text, (a, b) in regions.items():
        if a < b and lo <= math.sqrt(a * b) <= hi:
            ax.text(math.sqrt(a * b), 0.985, text, transform=trans, ha="center", va="top", color="0.35", fontsize=8)
    ax.set_xlim(lo, hi)


def plot_per_class(
    results: Sequence[dict],
    path: str | os.PathLike,
    *,
    many_threshold: int = 100,
    few_threshold: int = 20,
    bins: int = 12,
    title: str | None = None,
) -> Path:
    """PNG of per-class accuracy against training images per class (log x): one panel per result.

    Each panel shows its result's classes as points and their mean in ``bins`` log-spaced frequency
    bins as a line, with the zero-shot result's line in grey for reference (where there is one);
    dashed lines mark the few/many thresholds. Classes absent from the eval set (``per_class``
    None) or from the training set are not drawn. Written atomically.
    """
    import matplotlib

    if not results:
        raise LtclipError("no results to plot")
    rows = _zero_shot_first(results)
    points = []
    for i, result in enumerate(rows):
        counts, acc = _per_class_points(result)
        if not counts.size:
            raise LtclipError(f"result {result.get('name', i)!r} has no class with both eval and training images")
        points.append((counts, acc))
    reference = next((p for r, p in zip(rows, points) if r.get("kind") == "zero-shot"), None)
    cols = min(3, len(rows))
    grid = math.ceil(len(rows) / cols)
    fig = _figure(3.6 * cols + 0.4, 2.7 * grid + 0.6)
    axes = fig.subplots(grid, cols, sharex=True, sharey=True, squeeze=False).ravel()
    rgb = [matplotlib.colors.to_rgb(c["color"]) for c in matplotlib.rcParams["axes.prop_cycle"]]
    colours = [c for c in rgb if max(c) - min(c) > 0.05]  # no grey: grey is the zero-shot's
    for i, (ax, result, (counts, acc)) in enumerate(zip(axes, rows, points)):
        colour = ZERO_SHOT_COLOUR if result.get("kind") == "zero-shot" else colours[i % len(colours)]
        if reference is not None and result.get("kind") != "zero-shot":
            ax.plot(*_binned_mean(*reference, bins), "-", color=ZERO_SHOT_COLOUR, linewidth=1.2, alpha=0.8, label="zero-shot")
        ax.scatter(counts, acc, s=12, color=colour, alpha=0.45, linewidths=0)
        ax.plot(*_binned_mean(counts, acc, bins), "-o", color=colour, markersize=3, linewidth=1.8)
        ax.set_title(str(result.get("name", f"result {i}")), fontsize=8)
        ax.set_xscale("log")
        ax.set_ylim(-3, 112)  # room above 100 % for the shot-group names
        ax.set_yticks(range(0, 101, 25))
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes[len(rows):]:
        ax.set_visible(False)
    for ax in axes[: len(rows)]:
        _shot_regions(ax, few_threshold, many_threshold)
    fig.supxlabel("training images per class (log scale)", fontsize=9)
    fig.supylabel("per-class accuracy (%)", fontsize=9)
    fig.suptitle(title or f"Per-class accuracy vs. training frequency — {_where(rows)}", fontsize=10)
    return _save(fig, path)
