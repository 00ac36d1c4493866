"""``ltclip sweep``: a grid of train-head points scored on val, the best kept as a normal run.

Layout of SWEEPDIR: ``points/NAME/`` (each point's train-head run folder, a second stage's when
the points name ``--from RUN``), ``groups/NAME/`` (the
engine's folder of a batched group: its checkpoint and log), ``sweep.json`` + ``sweep.md`` and
``best/``, a copy of the best point's run whose ``config.json`` is that point's single-run config
with ``out = SWEEPDIR/best``. A point counts as finished when its folder has ``run.json``: a
resumed sweep skips those, continues a batched group from its checkpoint at the step it reached
and a point trained alone from its own ``last.pt``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from ..artifacts.outputs import Input, check_out_folder, folder_input, run_folder_inputs
from ..core.atomic import WriteError, save_json
from ..core.lock import LOCK_FILE, folder_lock
from ..config import SecondStageConfig, to_dict
from ..engine import BEST_FILE, LAST_FILE, SUMMARY_KEYS, check_optim
from ..core.errors import LtclipError
from ..core.progress import Progress
from ..artifacts.runs import CONFIG_FILE, features_input, read_run_info
from ..artifacts.workspace import RUN_FILE, SWEEP_BEST
from ..stages.second_stage import check_options, run_second_stage
from ..stages.train_head import run_train_head
from . import report
from .grid import Point, expand, plan_groups
from .group import train_group

GROUPS_DIR = "groups"


def run_sweep(base: dict, grid: list[tuple[str, list]], metric: str, out: Path, progress: Progress | None = None,
              resume: bool = False) -> dict:
    """Train every point of ``grid`` over the train-head option values ``base`` (each point a stage-1
    or second-stage config: :func:`~.grid.point_config`), keep the best by val ``metric``; returns the
    sweep record."""
    progress = progress or Progress()
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise LtclipError("ltclip sweep runs in one process; start it without torchrun")
    if metric not in SUMMARY_KEYS:
        raise LtclipError(f"--metric {metric!r}: choose one of {', '.join(SUMMARY_KEYS)}")
    points = expand(base, grid, out)
    for point in points:
        _check(point)
    check_out_folder(out, "sweep", _inputs(points))
    with folder_lock(out, "sweep"):
        return _sweep(base, grid, metric, out, points, progress, resume)


def _inputs(points: list[Point]) -> list[Input]:
    """The caches and first-stage runs the points read."""
    found = []
    for point in points:
        cfg = point.cfg
        if isinstance(cfg, SecondStageConfig):
            found += run_folder_inputs(cfg.from_run, read_run_info(cfg.from_run))
        if cfg.features:
            found.append(folder_input(cfg.features, "the feature cache"))
    return list(dict.fromkeys(found))


def _sweep(base: dict, grid, metric: str, out: Path, points: list[Point], progress: Progress, resume: bool) -> dict:
    """:func:`run_sweep`'s work, ``out`` held by this command."""
    groups = {f"g{i:02d}": members for i, members in enumerate(plan_groups(points))}
    record = report.new_record(base, grid, metric, points, groups)
    _start(out, record, resume)
    entries = {p["name"]: p for p in record["points"]}
    fingerprints: dict[str, dict] = {}
    for name, members in groups.items():
        todo = [p for p in members if not _finished(p, entries[p.name], metric) and entries[p.name]["state"] != "failed"]
        if not todo:
            continue
        info = record["groups"][name]
        if info["batched"]:
            features = members[0].cfg.features
            if features not in fingerprints:
                fingerprints[features] = features_input(Path(features))
            try:
                train_group(members, out / GROUPS_DIR / name, fingerprints[features], progress)
                todo = []
            except LtclipError as err:
                if not _point_failure(err):
                    raise
                info.update(batched=False, note=f"trained one by one: trained together, {err}")
                report.save(out, record)
        for point in todo:
            _train_alone(point, entries[point.name], progress)
        for point in members:
            _finished(point, entries[point.name], metric)
        report.save(out, record)
    best = report.choose_best(record)
    if best is None:
        raise LtclipError(f"no point of the sweep finished with a val {metric}; see {out / report.SWEEP_MD}", exit_code=1)
    _keep_best(out, next(p for p in points if p.name == best["name"]))
    record["best"] = {"point": best["name"], "run": SWEEP_BEST, "val": best["val"], "options": best["options"]}
    report.save(out, record)
    progress.log(f"sweep: {out}, best {best['name']} (val {metric} {best['val']:.4g}), kept as {out / SWEEP_BEST}")
    return record


def _check(point: Point) -> None:
    """Refuse a point that could not train, before anything trains."""
    cfg = point.cfg
    where = f"sweep point {point.name}: "
    second = isinstance(cfg, SecondStageConfig)
    try:
        if second:
            check_options(cfg)
            stage1 = read_run_info(cfg.from_run)  # a finished run
            features = cfg.features or stage1["inputs"]["features"]["dir"]
        else:
            features = cfg.features
        check_optim(cfg.optim)
    except LtclipError as err:
        raise LtclipError(where + str(err)) from None
    if not second and cfg.optim.select not in SUMMARY_KEYS:
        raise LtclipError(f"{where}--select {cfg.optim.select!r}: choose one of {', '.join(SUMMARY_KEYS)}")
    if not (Path(features) / f"{cfg.val_split}.h5").is_file():
        raise LtclipError(f"--features {features}: no {cfg.val_split}.h5 to score the points on; "
                          f"run `ltclip extract --splits {cfg.val_split}` or pass --val-split")


def _start(out: Path, record: dict, resume: bool) -> None:
    """A new sweep needs a folder without one; ``--resume`` the interrupted sweep's options and record."""
    saved_path = out / report.SWEEP_FILE
    if resume:
        if not saved_path.is_file():
            raise LtclipError(f"--resume: {out} holds no interrupted sweep ({report.SWEEP_FILE} missing); drop --resume")
        saved = json.loads(saved_path.read_text())
        differ = report.same_sweep(saved, record)
        if differ:
            raise LtclipError(f"--resume: the {', '.join(differ)} differ from the interrupted sweep's; resume with the same options")
        record["groups"] = saved["groups"]  # groups already split into single runs stay so
        for entry, before in zip(record["points"], saved["points"]):
            if before["state"] == "failed":
                entry.update(before)
    elif saved_path.exists() or (out / "points").exists():
        raise LtclipError(f"--out {out} already holds a sweep; pass --resume to continue it or choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LtclipError(f"--out {out}: cannot write ({err.strerror}); choose a writable folder") from None
    report.save(out, record)


def _finished(point: Point, entry: dict, metric: str) -> bool:
    """Whether the point's run is written; its entry then records it."""
    run = Path(point.cfg.out)
    if not (run / RUN_FILE).is_file():
        return False
    report.set_done(entry, read_run_info(run).get("best"), metric)
    return True


def _point_failure(err: LtclipError) -> bool:
    """A training that failed its checks (a diverging loss): the point fails, the sweep goes on."""
    return err.exit_code == 1 and not isinstance(err, WriteError)


def _train_alone(point: Point, entry: dict, progress: Progress) -> None:
    progress.log(f"training {point.name} alone")
    run = run_second_stage if isinstance(point.cfg, SecondStageConfig) else run_train_head
    try:
        run(point.cfg, progress, resume=(Path(point.cfg.out) / LAST_FILE).is_file())
    except LtclipError as err:
        if not _point_failure(err):
            raise
        report.set_failed(entry, str(err))


def _keep_best(out: Path, point: Point) -> None:
    """``out/best``: the best point's run (without its checkpoints), its config that of a run in ``out/best``."""
    dest, partial = out / SWEEP_BEST, out / f"{SWEEP_BEST}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(point.cfg.out, partial, ignore=shutil.ignore_patterns(LAST_FILE, BEST_FILE, LOCK_FILE, "tensorboard"))
    save_json(partial / CONFIG_FILE, to_dict(dataclasses.replace(point.cfg, out=str(dest))))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(partial, dest)
