"""Reports across evaluation results: Markdown, JSON and CSV tables (the figures: :mod:`ltclip.evaluation.plots`).

A result is a dict from :func:`ltclip.evaluation.metrics.evaluate` extended with identity keys: ``name``
(row label), ``kind`` ("run", "zero-shot", "knn", ...), ``dataset``, ``split``, optionally
``run_dir`` and ``train_counts`` (per class; the plot needs it).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from ..config.files import flatten
from ..core.atomic import atomic_path
from ..core.errors import LtclipError


class Column(NamedTuple):
    header: str
    decimals: int
    lower_is_better: bool


COLUMNS = {
    "many": Column("Many", 1, False),
    "medium": Column("Medium", 1, False),
    "few": Column("Few", 1, False),
    "top1": Column("All", 1, False),
    "top5": Column("Top-5", 1, False),
    "balanced_accuracy": Column("Bal. acc.", 1, False),
    "macro_f1": Column("Macro-F1", 1, False),
    "nll": Column("NLL", 3, True),
    "ece": Column("ECE", 2, True),
}
IDENTITY_KEYS = ("name", "kind", "dataset", "split", "run_dir")
EMPTY = "—"


# ----------------------------------------------------------------------------- Markdown


def _groups(results: Sequence[dict]) -> dict[tuple, list[dict]]:
    """Results by (dataset, split), in order of first appearance."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r.get("dataset"), r.get("split")), []).append(r)
    return groups


def _cell_text(value, decimals: int) -> str | None:
    return None if value is None or math.isnan(value) else f"{value:.{decimals}f}"


def _table(rows: list[dict], columns: Sequence[str]) -> list[str]:
    specs = [COLUMNS[c] for c in columns]
    lines = [
        "| Method | " + " | ".join(s.header for s in specs) + " |",
        "|---|" + "---:|" * len(specs),
    ]
    texts = [[_cell_text(r.get(c), s.decimals) for c, s in zip(columns, specs)] for r in rows]
    best = []
    for j, spec in enumerate(specs):  # compare the shown numbers: cells that read the same tie
        shown = [float(t[j]) for t in texts if t[j] is not None]
        best.append(None if not shown else (min(shown) if spec.lower_is_better else max(shown)))
    for r, row_texts in zip(rows, texts):
        cells = [str(r.get("name", "")).replace("|", "\\|")]
        for text, top in zip(row_texts, best):
            cells.append(EMPTY if text is None else f"**{text}**" if float(text) == top else text)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_table(
    results: Sequence[dict],
    *,
    zero_shot_first: bool = True,
    columns: Sequence[str] = ("many", "medium", "few", "top1", "top5", "ece"),
) -> str:
    """One Markdown table per (dataset, split): a header line, then one row per result.

    Columns Many / Medium / Few / All (top-1) / ... with 1 decimal (ECE 2, NLL 3), "—" for
    None; the best shown value of each column is bold (max; min for ECE and NLL; ties all bold).
    Zero-shot rows come first when ``zero_shot_first``; otherwise the input order is kept.
    """
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise LtclipError(f"unknown report column(s) {', '.join(unknown)}; choose from {', '.join(COLUMNS)}")
    blocks = []
    for (dataset, split), rows in _groups(results).items():
        if zero_shot_first:
            rows = sorted(rows, key=lambda r: r.get("kind") != "zero-shot")  # stable: others keep order
        sizes = {r.get("num_samples") for r in rows}
        size = f" — {sizes.pop():,} images" if len(sizes) == 1 and None not in sizes else ""
        blocks.append("\n".join([f"**{dataset} / {split}**{size}", "", *_table(rows, columns)]))
    return "\n\n".join(blocks) + "\n"


def write_markdown(results: Sequence[dict], path: str | os.PathLike, **options) -> Path:
    """:func:`markdown_table` of ``results`` written to ``path``, atomically."""
    text = markdown_table(results, **options)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


# ----------------------------------------------------------------------------- JSON / CSV


def _plain(value):
    """``value`` with numpy scalars/arrays and tuples turned into JSON types."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_json(results: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write every result in full (per-class lists included) as ``{"results": [...]}``, atomically."""
    try:
        text = json.dumps({"results": _plain(list(results))}, indent=2, allow_nan=False) + "\n"
    except ValueError:
        raise LtclipError(
            f"{path}: a result holds NaN or infinity, which JSON cannot store; check the evaluation"
        ) from None
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, bool, int, float, np.generic))


def _csv_columns(results: Sequence[dict]) -> list[str]:
    """Identity keys, the metric columns, then any other scalar keys, in first-seen order."""
    present = {k for r in results for k, v in r.items() if _is_scalar(v)}
    fixed = [k for k in (*IDENTITY_KEYS, *COLUMNS, "num_samples") if k in present]
    extra = dict.fromkeys(k for r in results for k, v in r.items() if _is_scalar(v) and k not in fixed)
    return fixed + list(extra)


def write_csv(results: Sequence[dict], path: str | os.PathLike) -> Path:
    """One row per result, flat scalar columns (identity keys, metrics, then other scalars); lists such as
    ``per_class`` are left out, None is an empty cell, floats keep full precision. Atomic."""
    columns = _csv_columns(results)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in results:
        writer.writerow(["" if r.get(c) is None else _plain(r[c]) for c in columns])
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return Path(path)


# ----------------------------------------------------------------------------- row labels


def _label(value) -> str:
    """A config entry as a name: a string, or a dict's ``name``; "" for none."""
    if isinstance(value, dict):
        value = value.get("name")
    return "" if value in (None, False, "", "none") else str(value)


def method_name(config: dict) -> str:
    """A short row label from a run's resolved config: ``head · loss · sampler [→ two_stage] [+ LA]``.

    Entries are registry names or dicts with a ``name``; missing or "none" parts are left out;
    ``head_opts`` / ``loss_opts`` (a mapping, or ``key=value`` strings in runs of earlier versions)
    follow their part in brackets.
    ``posthoc_la`` may be true, a tau, or a dict with ``tau``. Example: ``{"head": "decoder",
    "loss": "balanced_softmax", "sampler": "class-balanced", "two_stage": "crt"}`` →
    ``"decoder · balanced_softmax · class-balanced → crt"``.
    """
    parts = []
    for key in ("head", "loss", "sampler"):
        label, opts = _label(config.get(key)), config.get(f"{key}_opts") or ()
        if isinstance(opts, dict):
            opts = [f"{k}={v}" for k, v in opts.items()]
        if label:
            parts.append(f"{label}({', '.join(opts)})" if opts else label)
    name = " · ".join(parts)
    if not name:
        raise LtclipError("cannot name a run whose config has no head, loss or sampler")
    two_stage = _label(config.get("two_stage"))
    if two_stage:
        name += f" → {two_stage}"
    la = config.get("posthoc_la")
    if isinstance(la, dict):
        la = la.get("tau", True) if la else None
    if la is True:
        name += " + LA"
    elif isinstance(la, (int, float)) and not isinstance(la, bool):
        name += f" + LA τ={la:g}"
    return name


class RunFacts(NamedTuple):
    """What a run's row label is made of: its ``run.json``, its ``config.json`` ({} where missing) and,
    for a sweep's point or ``best/`` run, the point's grid values (option → value)."""

    info: dict
    config: dict
    grid_values: dict | None = None
    sweep_best: bool = False


NAMED_METHODS = ("head", "loss", "sampler", "two_stage")  # sweep grid options the label names anyway
Defaults = Callable[[str, str], dict]  # ("head" or "loss", its name) → that entry's options and their defaults


def run_label(facts: RunFacts, defaults: Defaults = lambda option, name: {}) -> str:
    """What a run is: ``finetune TUNE`` for a finetuned encoder (a head on a cache has no prefix),
    :func:`method_name` with only the head and loss options off their ``defaults`` (none under a
    recipe, which names them), the recipe (where the run records one) and a sweep point's grid values (those of options the label does not name
    already). Example: ``finetune lora · linear · ce · instance``."""
    method = dict(facts.info["method"])
    recipe = facts.info.get("recipe") or facts.config.get("recipe")
    if recipe:  # the recipe names its head and loss options; runs that differ in them are told apart below
        method.update(head_opts={}, loss_opts={})
    for key in ("head", "loss"):
        opts = method.get(f"{key}_opts")
        if isinstance(opts, dict) and isinstance(method.get(key), str):  # lists: ``key=value`` strings of earlier versions
            own = defaults(key, method[key])
            method[f"{key}_opts"] = {k: v for k, v in opts.items() if k not in own or own[k] != v}
    label = method_name(method)
    if facts.info.get("kind") == "finetune":
        label = f"finetune {method.get('tune') or 'frozen'} · {label}"
    if recipe:
        label += f" ({recipe} recipe)"
    if facts.grid_values is None:
        return label
    values = ", ".join(f"{k}={_shown(v)}" for k, v in facts.grid_values.items() if k not in NAMED_METHODS)
    if facts.sweep_best:
        return f"{label} [sweep best{': ' + values if values else ''}]"
    return f"{label} [{values or 'sweep point'}]"


def run_labels(runs: dict[str, RunFacts], defaults: Defaults = lambda option, name: {}) -> dict[str, str]:
    """A label for each run (folder → its facts) that no other run has: :func:`run_label`, and where
    runs would share one, the fewest options that tell them apart (``lr=0.1``), else the folder name."""
    base = {run: run_label(facts, defaults) for run, facts in runs.items()}
    told = {run: [] for run in runs}
    for same in _clashes(base):
        told.update(_telling({run: _config_options(runs[run].config) for run in same}))

    def labels() -> dict[str, str]:
        return {run: base[run] + (f" ({', '.join(told[run])})" if told[run] else "") for run in runs}

    for same in _clashes(labels()):  # the folder name, else (folders of one name) the path as given
        folders = [Path(run).name for run in same]
        for run, folder in zip(same, folders):
            told[run].append(folder if len(set(folders)) == len(folders) else run)
    return labels()


def _clashes(labels: dict[str, str]) -> list[list[str]]:
    """The groups of runs that share a label."""
    by_label: dict[str, list[str]] = {}
    for run, label in labels.items():
        by_label.setdefault(label, []).append(run)
    return [same for same in by_label.values() if len(same) > 1]


def _telling(options: dict[str, dict]) -> dict[str, list[str]]:
    """Per run, ``key=value`` of the fewest options whose values tell the runs apart (chosen greedily:
    the key that leaves the fewest runs sharing values, the shortest on ties); [] where none differ."""
    keys = sorted({k for o in options.values() for k in o if len({_shown(o.get(k)) for o in options.values()}) > 1})
    chosen: list[str] = []

    def sharing(keys_: list[str]) -> int:
        seen = [tuple(_shown(o.get(k)) for k in keys_) for o in options.values()]
        return sum(seen.count(v) > 1 for v in seen)

    while keys and sharing(chosen):
        best = min(keys, key=lambda k: (sharing(chosen + [k]), sum(len(_shown(o.get(k))) for o in options.values())))
        if sharing(chosen + [best]) == sharing(chosen):
            break
        chosen.append(best)
        keys.remove(best)
    return {run: [f"{k.rpartition('.')[2]}={_shown(o.get(k))}" for k in chosen] for run, o in options.items()}


def _config_options(config: dict) -> dict:
    """A saved config as flat options (method options as ``head_opts.depth``), without its output folder."""
    flat = {}
    for key, value in flatten(config).items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        elif key != "out":
            flat[key] = value
    return flat


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
