"""Defaults that make the examples run as written: output folders named from their options, and the
workspace file ``ltclip.toml`` through which ``extract`` tells later commands which cache to use.

Every default is printed by the CLI, and an explicit option always wins.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from ..core.atomic import atomic_path
from ..core.errors import LtclipError
from ..core.lock import is_locked

WORKSPACE_FILE = "ltclip.toml"
FEATURES_DIR = Path("features")
SWEEP_FILE, SWEEP_BEST = "sweep.json", "best"  # a sweep's record and its best point kept as a run (ltclip.sweep.run)
RUNS_DIR = Path("runs")
RUN_FILE = "run.json"  # written last: a folder holding it is a finished run (ltclip.artifacts.runs)


def slug(text: str) -> str:
    """``text`` as one path component: separators and odd characters become ``-``."""
    return re.sub(r"[^A-Za-z0-9._+=-]+", "-", text).strip("-") or "x"


def default_features_dir(dataset: str, model: str, pretrained: str) -> Path:
    """``features/<dataset>-<model>-<pretrained>``; a checkpoint file is named by its stem."""
    model = Path(model.removeprefix("local-dir:")).name if model.startswith("local-dir:") else model
    weights = Path(pretrained).stem if Path(pretrained).is_file() else pretrained
    return FEATURES_DIR / slug(f"{dataset}-{model}-{weights}")


def default_run_dir(name: str, resume: bool) -> Path:
    """``runs/<name>``, or ``runs/<name>-2``, ``-3``, … so that a finished run, or one another process is
    writing, is never overwritten.

    With ``resume`` it is the newest of those folders (the one an interrupted run left).
    """
    candidates = [RUNS_DIR / slug(name)] + [RUNS_DIR / slug(f"{name}-{k}") for k in range(2, 10_000)]
    if resume:
        existing = [c for c in candidates[:1000] if c.exists()]
        if not existing:
            raise LtclipError(f"--resume: no run folder {candidates[0]} to resume; pass --out RUN")
        return existing[-1]
    return next(c for c in candidates if not (c / RUN_FILE).exists() and not is_locked(c))


def record_features(features: Path, where: Path = Path(".")) -> Path:
    """Write ``where/ltclip.toml`` naming ``features`` as this folder's cache."""
    path = where / WORKSPACE_FILE
    text = ("# Written by `ltclip extract`: the feature cache later commands use when --features is not given.\n"
            f"features = {json.dumps(str(features))}\n")
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def recorded_features(where: Path = Path(".")) -> Path | None:
    """The cache ``ltclip.toml`` in ``where`` names, or None without that file."""
    path = where / WORKSPACE_FILE
    if not path.is_file():
        return None
    try:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise LtclipError(f"{path}: cannot parse ({err}); delete it or pass --features DIR") from None
    if not isinstance(data.get("features"), str):
        raise LtclipError(f"{path}: no `features = \"DIR\"` line; delete it or pass --features DIR")
    return Path(data["features"])


def finished_runs(root: Path = RUNS_DIR) -> list[Path]:
    """The finished run folders under ``root`` (holding ``run.json``) and the ``best/`` runs of its
    finished sweeps, in name order."""
    if not root.is_dir():
        return []
    runs = [p.parent for p in root.glob(f"*/{RUN_FILE}")]
    return sorted(runs + [p.parent for p in root.glob(f"*/{SWEEP_BEST}/{RUN_FILE}") if (p.parents[1] / SWEEP_FILE).is_file()])


def sweep_best(folder: Path) -> Path | None:
    """The run a sweep folder (holding ``sweep.json``, no ``run.json``) is evaluated through: its ``best/``;
    None for any other folder. A sweep that has not finished is refused."""
    if not (folder / SWEEP_FILE).is_file() or (folder / RUN_FILE).exists():
        return None
    best = folder / SWEEP_BEST
    if not (best / RUN_FILE).is_file():
        raise LtclipError(f"{folder}: a sweep without a best run yet ({best} missing); finish it with "
                          "`ltclip sweep ... --resume`, or name one of its points/ folders")
    return best


def sweep_point(run_dir: Path) -> tuple[dict, bool] | None:
    """For a sweep's point (``SWEEP/points/NAME``) or best run (``SWEEP/best``): the point's grid values
    (option → value, in the grid's order) and whether ``run_dir`` is the best run; None for other runs."""
    run_dir = run_dir.resolve()
    best = run_dir.name == SWEEP_BEST
    sweep = run_dir.parent if best else run_dir.parents[1] if run_dir.parent.name == "points" else None
    try:
        record = json.loads((sweep / SWEEP_FILE).read_text(encoding="utf-8")) if sweep is not None else {}
    except (OSError, ValueError):
        return None
    name = (record.get("best") or {}).get("point") if best else run_dir.name
    point = next((p for p in record.get("points", ()) if p.get("name") == name), None)
    if point is None:
        return None
    return {key: point["options"].get(key) for key, _ in record.get("grid", ())}, best

