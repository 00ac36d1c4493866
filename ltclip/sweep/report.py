"""The sweep's record: ``sweep.json`` (every point: options, state, its val metric and best epoch;
the groups; the best point) and ``sweep.md``, the same as a table. Both are rewritten after
every group, atomically, and hold no timings: a resumed sweep ends with the same files."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..artifacts.workspace import SWEEP_FILE
from ..core.atomic import atomic_path, save_json
from ..evaluation.metrics import LOWER_IS_BETTER

SWEEP_MD = "sweep.md"
SWEEP_SCHEMA_VERSION = 1


def new_record(base: dict, grid: list[tuple[str, list]], metric: str, points, groups) -> dict:
    """The record of a sweep about to start: every point pending."""
    where = {p.name: g for g, members in groups.items() for p in members}
    return {
        "schema_version": SWEEP_SCHEMA_VERSION, "metric": metric, "higher_is_better": metric not in LOWER_IS_BETTER,
        "base": _plain(base), "grid": [[k, _plain(v)] for k, v in grid],
        "groups": {g: {"points": [p.name for p in members], "batched": len(members) > 1, "note": None}
                   for g, members in groups.items()},
        "points": [{"name": p.name, "options": _plain(p.options), "group": where[p.name], "state": "pending",
                    "val": None, "best_epoch": None, "best": None, "error": None} for p in points],
        "best": None,
    }


def _plain(value):
    return json.loads(json.dumps(value))


def same_sweep(saved: dict, now: dict) -> list[str]:
    """What differs between an interrupted sweep's record and this one's options."""
    return [k for k in ("metric", "base", "grid") if saved.get(k) != now.get(k)]


def set_done(entry: dict, best: dict | None, metric: str) -> None:
    epoch = (best or {}).get("epoch")  # None: a second stage (its selection is inside the method)
    entry.update(state="done", best=best, error=None, val=(best or {}).get(f"val_{metric}"),
                 best_epoch=None if epoch is None else epoch + 1)


def set_failed(entry: dict, error: str) -> None:
    entry.update(state="failed", error=error, val=None, best=None, best_epoch=None)


def choose_best(record: dict) -> dict | None:
    """The finished point with the best val metric (the first in grid order on ties), or None."""
    sign = 1.0 if record["higher_is_better"] else -1.0
    scored = [p for p in record["points"] if p["state"] == "done" and p["val"] is not None and not math.isnan(p["val"])]
    return max(scored, key=lambda p: sign * p["val"], default=None)


def save(folder: Path, record: dict) -> None:
    save_json(folder / SWEEP_FILE, record)
    with atomic_path(folder / SWEEP_MD) as tmp:
        tmp.write_text(markdown(record), encoding="utf-8")


def markdown(record: dict) -> str:
    keys = [k for k, _ in record["grid"]]
    metric = record["metric"]
    lines = [f"# Sweep: {len(record['points'])} points, scored by val {metric} "
             f"({'higher' if record['higher_is_better'] else 'lower'} is better)", ""]
    if record["base"]:
        lines += ["Base options: " + ", ".join(f"`{k}={v}`" for k, v in sorted(record["base"].items())), ""]
    best = record["best"]
    if best is not None:
        lines += [f"Best: **{best['point']}** (val {metric} {best['val']:.4g}), kept as the run `{best['run']}`.", ""]
    lines += ["| point | " + " | ".join(keys) + f" | val {metric} | best epoch | group | state |",
              "|---" * (len(keys) + 5) + "|"]
    for p in record["points"]:
        val = "–" if p["val"] is None else f"{p['val']:.4g}"
        state = p["state"] + (f": {p['error']}" if p["error"] else "")
        batched = record["groups"][p["group"]]["batched"]
        lines.append(f"| {p['name']} | " + " | ".join(str(p["options"][k]) for k in keys) +
                     f" | {val} | {p['best_epoch'] or '–'} | {p['group'] + (' (batched)' if batched else '')} | {state} |")
    notes = [f"- {g}: {info['note']}" for g, info in record["groups"].items() if info["note"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"
