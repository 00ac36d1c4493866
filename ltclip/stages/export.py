"""``ltclip export``: a run (or a cache's zero-shot classifier) as one self-contained file
(:mod:`ltclip.artifacts.export`), its output checked before any work."""

from __future__ import annotations

from pathlib import Path

from ..artifacts.export import export_classifier
from ..artifacts.image_model import run_classifier, zero_shot_classifier
from ..artifacts.outputs import check_output_files, folder_input, run_folder_inputs
from ..artifacts.runs import read_run_info
from ..config import ExportConfig
from ..config.fields import check_values
from ..core.distributed import DistContext, resolve_device
from ..core.errors import LtclipError
from .predict import check_source


def _check(cfg: ExportConfig) -> None:
    check_values(cfg)  # --format among the formats, --batch-size >= 1, ...
    check_source(cfg, "exports a cache's zero-shot classifier")


def run_export(cfg: ExportConfig) -> dict:
    """Write ``cfg.out``; the metadata stored in it."""
    _check(cfg)
    if cfg.zero_shot:
        inputs, owner = [folder_input(cfg.features, "the feature cache")], f"--features {cfg.features}"
        source = {"kind": "zero-shot", "features": cfg.features}
    else:
        info = read_run_info(cfg.run)
        inputs, source, owner = run_folder_inputs(cfg.run, info), {"kind": info["kind"], "run": cfg.run}, f"run {cfg.run}"
    check_output_files({"--out": cfg.out}, inputs)
    if Path(cfg.out).exists():
        raise LtclipError(f"--out {cfg.out}: the file exists and export never replaces one; choose another --out")
    device = resolve_device(cfg.device, DistContext())
    classifier = zero_shot_classifier(cfg.features, device) if cfg.zero_shot else run_classifier(cfg.run, device)
    return export_classifier(classifier, cfg.out, fmt=cfg.format, batch_size=cfg.batch_size, source=source, owner=owner)
