"""The built-in synthetic long-tailed set: profile, determinism, content, rerun and refusal rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ltclip.data.manifests import read_manifest
from ltclip.data.synthetic import (
    COLOURS,
    MAX_CLASSES,
    SHAPES,
    TEXTURES,
    make_synthetic,
    synthetic_classnames,
    synthetic_train_counts,
)
from ltclip.data.templates import SYNTHETIC_TEMPLATES
from ltclip.core.errors import LtclipError

SMALL = dict(classes=6, imbalance=10.0, max_per_class=20, val_per_class=2, test_per_class=3, size=32)
# 20 · 10^(−i/5) = 20, 12.62, 7.96, 5.02, 3.17, 2.00
SMALL_TRAIN = [20, 13, 8, 5, 3, 2]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "set"
    make_synthetic(out, **SMALL)
    return out


def test_train_counts_follow_the_exponential_profile():
    assert synthetic_train_counts(6, 10.0, 20) == SMALL_TRAIN
    # 200 · 100^(−i/4) = 200, 63.2, 20, 6.3, 2
    assert synthetic_train_counts(5, 100.0, 200) == [200, 63, 20, 6, 2]
    assert synthetic_train_counts(3, 1.0, 7) == [7, 7, 7]
    assert synthetic_train_counts(4, 1000.0, 2) == [2, 1, 1, 1]  # never below one image


def test_split_files_match_profile_and_images(small_set):
    names = synthetic_classnames(6)
    lines = (small_set / "classnames.txt").read_text().splitlines()
    assert lines == [f"{name.replace(' ', '_')} {name}" for name in names]
    expected = {"train": SMALL_TRAIN, "val": [2] * 6, "test": [3] * 6}
    for split, counts in expected.items():
        rows = read_manifest(small_set / f"{split}.txt", split, num_classes=6)
        assert rows.class_counts(6).tolist() == counts
        for key, label in zip(rows.keys, rows.labels.tolist()):
            assert key.startswith(f"{split}/{names[label].replace(' ', '_')}/")
            with Image.open(small_set / key) as image:
                assert image.mode == "RGB" and image.size == (32, 32)
    meta = json.loads((small_set / "synthetic.json").read_text())
    assert meta["params"]["imbalance"] == 10.0 and meta["train_counts"] == SMALL_TRAIN
    assert not (small_set / "synthetic.partial.json").exists()


def test_same_seed_gives_identical_files_for_any_worker_count(small_set, tmp_path):
    progress = []
    make_synthetic(tmp_path / "two", workers=2, progress=progress.append, **SMALL)
    assert _files(small_set) == _files(tmp_path / "two")
    assert progress[-1] == sum(SMALL_TRAIN) + 6 * (2 + 3)
    assert progress == sorted(progress)

    make_synthetic(tmp_path / "other", seed=1, **SMALL)
    a, b = _files(small_set), _files(tmp_path / "other")
    assert a.keys() == b.keys()
    assert a["train/red_circle/0000.png"] != b["train/red_circle/0000.png"]


def test_class_names_are_unique_and_meaningful():
    names = synthetic_classnames(MAX_CLASSES)
    assert len(set(names)) == MAX_CLASSES == len(SHAPES) * len(COLOURS) * len(TEXTURES)
    assert names[:3] == ["red circle", "green square", "blue triangle"]
    for name in names:
        *texture, colour, shape = name.split()
        assert shape in SHAPES and colour in COLOURS
        assert texture in ([], ["striped"], ["dotted"])
    # The first classes already vary both shape and colour.
    assert len({n.split()[-1] for n in names[:8]}) == 8 and len({n.split()[0] for n in names[:8]}) == 8
    assert all(template.count("{}") == 1 for template in SYNTHETIC_TEMPLATES)


def test_images_carry_their_class_colour(tmp_path):
    out = tmp_path / "colours"
    make_synthetic(out, classes=20, imbalance=1.0, max_per_class=12, val_per_class=1, test_per_class=1, size=32)
    names = synthetic_classnames(20)
    mean = {}
    for name in names:
        paths = sorted((out / "train" / name.replace(" ", "_")).glob("*.png"))
        mean[name] = np.mean([np.asarray(Image.open(p), dtype=float) for p in paths], axis=(0, 1, 2))
    red_excess = {name: m[0] - (m[1] + m[2]) / 2 for name, m in mean.items()}
    blue_excess = {name: m[2] - (m[0] + m[1]) / 2 for name, m in mean.items()}
    assert red_excess["red circle"] > max(red_excess["green circle"], red_excess["blue circle"]) + 10
    assert blue_excess["blue square"] > max(blue_excess["green square"], blue_excess["yellow square"]) + 10
    # Same colour, different shape: images still differ.
    assert not np.allclose(mean["red circle"], mean["red hexagon"])


def test_rerun_with_same_options_is_skipped(small_set):
    before = {p: p.stat().st_mtime_ns for p in small_set.rglob("*")}
    summary = make_synthetic(small_set, **SMALL)
    assert summary["skipped"] is True
    assert summary["train_counts"] == SMALL_TRAIN
    assert {p: p.stat().st_mtime_ns for p in small_set.rglob("*")} == before


def test_rerun_with_other_options_is_refused(small_set):
    with pytest.raises(LtclipError, match="--imbalance"):
        make_synthetic(small_set, **{**SMALL, "imbalance": 100.0})
    with pytest.raises(LtclipError, match="--size"):
        make_synthetic(small_set, **{**SMALL, "size": 48})


def test_foreign_folder_is_refused_and_interrupted_run_is_redone(small_set, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "train.txt").write_text("mine 0\n")
    with pytest.raises(LtclipError, match="neither an empty folder"):
        make_synthetic(foreign, **SMALL)
    assert (foreign / "train.txt").read_text() == "mine 0\n"

    # An interrupted run leaves the partial marker, no synthetic.json, and stray files.
    broken = tmp_path / "broken"
    make_synthetic(broken, **SMALL)
    (broken / "synthetic.json").unlink()
    (broken / "synthetic.partial.json").write_text("{}")
    (broken / "train" / "red_circle" / "0000.png").write_bytes(b"truncated")
    (broken / "train" / "stale_class").mkdir()
    summary = make_synthetic(broken, **SMALL)
    assert summary["skipped"] is False
    assert _files(broken) == _files(small_set)


@pytest.mark.parametrize(
    "option, value",
    [
        ("classes", 1),
        ("classes", MAX_CLASSES + 1),
        ("imbalance", 0.5),
        ("imbalance", float("inf")),
        ("max_per_class", 0),
        ("size", 8),
        ("workers", 0),
    ],
)
def test_bad_options_name_the_option(tmp_path, option, value):
    with pytest.raises(LtclipError, match=f"--{option.replace('_', '-')}"):
        make_synthetic(tmp_path / "x", **{**SMALL, option: value})
    assert not (tmp_path / "x").exists()
