"""The output guard: what a command writes never replaces what it reads, and two of its outputs
never name one file. Every command calls it with its outputs and inputs before any work.

Paths are compared after ``resolve()``, so a symlink counts as the file it points to. Inside a run
or cache folder every existing file is an input; inside a data root only the files the dataset
reads (its split files, class-name file and images), so that runs, caches and reports may sit
beside the images (the data root defaults to the working folder).
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from ..core.errors import LtclipError
from .runs import RUN_KINDS
from .workspace import RUN_FILE, SWEEP_FILE

CACHE_RECORD = "extract.json"  # a cache folder's record (ltclip.stages.extract)
FOLDER_KINDS = {"head": "a finished head run", "second_stage": "a finished second-stage run",
                "finetune": "a finished finetuned run", "run": "a finished run", "sweep": "a sweep", "cache": "a feature cache"}
RUNS = (*RUN_KINDS, "run")


@dataclass(frozen=True)
class Input:
    """A file or folder a command reads. ``images``: a data root's image paths (relative, POSIX);
    None for a run or cache folder, whose every file is an input."""

    path: Path
    what: str
    folder: bool = False
    images: frozenset[str] | None = None


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def file_input(path: str | Path, what: str) -> Input:
    return Input(_resolved(path), what)


def folder_input(path: str | Path, what: str) -> Input:
    return Input(_resolved(path), f"{what} {path}", folder=True)


def run_folder_inputs(run_dir: str | Path, info: dict) -> list[Input]:
    """A finished run folder and the feature cache it was trained on (a finetuned run: none)."""
    found = [folder_input(run_dir, "the run")]
    features = info.get("inputs", {}).get("features")
    if features:
        found.append(folder_input(features["dir"], "the feature cache"))
    return found


def dataset_inputs(dataset, data) -> list[Input]:
    """A dataset's split files, class-name file and data root (with its images); ``data``: its DataConfig."""
    found = [file_input(split.source, f"the {name} split file") for name, split in dataset.splits.items()
             if Path(split.source).is_file()]
    found += [file_input(path, f"the --{option.replace('_', '-')} file") for option in ("train_list", "val_list", "test_list", "classnames")
              if (path := getattr(data, option)) and Path(path).is_file()]
    images = frozenset(key for split in dataset.splits.values() for key in split.keys)
    root = dataset.data_root or data.data_root
    return found + [Input(_resolved(root), f"the data root {root}", folder=True, images=images)]


def _replaced(target: Path, inputs: Iterable[Input]) -> str | None:
    """What of ``inputs`` writing ``target`` would replace, or None."""
    for item in inputs:
        if not item.folder:
            if target == item.path:
                return item.what
        elif target.is_file() and target.is_relative_to(item.path):
            rel = target.relative_to(item.path).as_posix()
            if item.images is None or rel in item.images:
                return f"{rel} of {item.what}"
    return None


def _read_only(path: Path) -> bool:
    """No write bit at all: its owner protected it (checked by mode, as root may write anyway)."""
    return not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


def _existing_folder(path: Path) -> Path:
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_output_files(outputs: Mapping[str, str | Path | None], inputs: Iterable[Input],
                       own: Mapping[str, Path] | None = None) -> None:
    """Refuse (one line) an output file that would replace an input, that two options name, that
    is a folder, or that is read-only (itself or the folder it goes in). ``outputs``: option → path;
    ``own``: files the command writes by itself (what → path), which no option may name."""
    inputs = list(inputs)
    seen: dict[Path, str] = {_resolved(path): what for what, path in (own or {}).items()}
    for option, given in outputs.items():
        if not given:
            continue
        target = _resolved(given)
        link = f" (a link to {target})" if Path(given).is_symlink() else ""
        if target in seen:
            raise LtclipError(f"{seen[target]} and {option} both name {given}{link}; give each its own file")
        seen[target] = option
        replaced = _replaced(target, inputs)
        if replaced:
            raise LtclipError(f"{option} {given}{link}: would replace {replaced}, an input of this command; write it elsewhere")
        if target.is_dir():
            raise LtclipError(f"{option} {given}: is a folder; name a file in it")
        folder = _existing_folder(target)
        if not folder.is_dir():
            raise LtclipError(f"{option} {given}: {folder} is a file, not a folder; choose another path")
        if target.exists() and _read_only(target):
            raise LtclipError(f"{option} {given}: the file is read-only; make it writable or choose another path")
        if _read_only(folder):
            raise LtclipError(f"{option} {given}: the folder {folder} is read-only; make it writable or choose another path")


def folder_kind(folder: Path) -> str | None:
    """What ``folder`` already holds: a finished run's kind, ``sweep``, ``cache`` or None."""
    if (folder / RUN_FILE).is_file():
        try:
            kind = json.loads((folder / RUN_FILE).read_text()).get("kind")
        except (ValueError, AttributeError):
            kind = None
        return kind if kind in RUN_KINDS else "run"
    if (folder / SWEEP_FILE).is_file():
        return "sweep"
    if (folder / CACHE_RECORD).is_file() or any(folder.glob("*.h5")):
        return "cache"
    return None


def check_out_folder(out: str | Path, kind: str, inputs: Iterable[Input], option: str = "--out") -> None:
    """Refuse (one line) an output folder of a command writing ``kind`` (a run kind, ``sweep`` or
    ``cache``): inside a run or cache it reads, the data root itself or a folder of its images, a
    folder holding another kind of result, a file, or a read-only folder."""
    target = _resolved(out)
    for item in inputs:
        if not item.folder:
            if target == item.path:
                raise LtclipError(f"{option} {out}: is {item.what}, an input of this command; choose another folder")
            continue
        inside = target.is_relative_to(item.path)
        if item.images is None and inside:
            raise LtclipError(f"{option} {out}: lies in {item.what}, an input of this command; choose a folder outside it")
        if item.images is not None and target == item.path:
            raise LtclipError(f"{option} {out}: is {item.what}; choose a folder beside the images, not the root itself")
        if item.images is not None and inside:
            prefix = target.relative_to(item.path).as_posix() + "/"
            if any(key.startswith(prefix) for key in item.images):
                raise LtclipError(f"{option} {out}: holds images of {item.what}; choose a folder outside them")
    if target.exists() and not target.is_dir():
        raise LtclipError(f"{option} {out}: is a file; name a folder")
    if not target.is_dir():
        return
    held = folder_kind(target)
    if held is not None and held != kind and not (held in RUNS and kind in RUNS):
        raise LtclipError(f"{option} {out}: holds {FOLDER_KINDS.get(held, held)}, not {FOLDER_KINDS[kind].replace('a finished', 'a')}; "
                          f"choose another {option}")
    if _read_only(target):
        raise LtclipError(f"{option} {out}: the folder is read-only; make it writable or choose another folder")
