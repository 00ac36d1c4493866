"""`make reproduce`: the paper's table on the synthetic set with the tiny model and a few steps, through
the same Makefile target a researcher runs; then a rerun that skips every step, a run that lost its
run.json (only it and what depends on it run again), a cache of another model (refused), and
`make reproduce-lift` adding LIFT's and LIFT+'s rows."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_MODEL
from ltclip.core.errors import LtclipError
from ltclip.stages.reproduce import LIFT_ROWS, PAPER_ROWS, Plan, Settings

REPO = Path(__file__).resolve().parents[1]
SMALL = "--steps 2 --batch-size 16 --workers 0 --device cpu"


def make(target: str, root: Path, out: Path) -> subprocess.CompletedProcess:
    """``make TARGET`` in the checkout with small settings; ``-o`` keeps make from touching the venv."""
    command = ["make", "--no-print-directory", "-C", str(REPO), "-o", ".venv/.installed", target,
               f"LTCLIP={sys.executable} -m ltclip", "DATASET=synthetic", f"DATA_ROOT={root}", f"MODEL={TINY_MODEL}",
               "PRETRAINED=none", f"OUT={out}", f"ARGS={SMALL}"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def table_rows(report: Path) -> dict[str, list[str]]:
    """Row label -> its cells, from the Markdown table."""
    rows = {}
    for line in report.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "Method":
            rows[cells[0]] = cells[1:]
    return rows


def steps_logged(stderr: str, verb: str) -> list[str]:
    return re.findall(rf"^{verb} +(.+?): ", stderr, flags=re.M)


@pytest.mark.slow
def test_make_reproduce_writes_every_row_and_a_rerun_skips_every_step(synthetic_root, tmp_path):
    out = tmp_path / "exp"
    first = make("reproduce", synthetic_root, out)
    report = out / "table.md"
    rows = table_rows(report)
    assert list(rows) == ["zero-shot CLIP", *(row.label for row in PAPER_ROWS)]  # the paper's rows, in its order
    number = re.compile(r"^(\*\*)?\d+\.\d(\*\*)?$")
    for label, cells in rows.items():
        assert len(cells) == 4 and number.match(cells[3]), (label, cells)  # Many / Medium / Few / All
        assert all(number.match(c) or c == "—" for c in cells), (label, cells)
    results = json.loads((out / "table.json").read_text())["results"]
    assert [r["name"] for r in results] == list(rows)
    assert all(0 <= r["top1"] <= 100 for r in results)
    plan = Plan(Settings(dataset="synthetic", data_root=str(synthetic_root), out=str(out), model=TINY_MODEL, pretrained="none"))
    assert len(steps_logged(first.stderr, "run")) == len(plan.steps())
    second_stage = json.loads((out / "runs" / "decoder-ce-crt" / "config.json").read_text())
    assert Path(second_stage["from_run"]) == out / "runs" / "decoder-ce"  # second stages sit on the CE run

    stamps = {p: p.stat().st_mtime_ns for p in [*out.glob("runs/*/*.json"), report]}
    rerun = make("reproduce", synthetic_root, out)
    assert steps_logged(rerun.stderr, "run") == []
    assert steps_logged(rerun.stderr, "skip") == [s.name for s in plan.steps()] + ["report"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing was rewritten

    # A run that lost its run.json (as if killed before the end) trains again, then its eval and the report.
    (out / "runs" / "decoder-lade" / "run.json").unlink()
    assert [s.name for s in plan.steps() if not s.done()] == ["decoder-lade"]
    again = make("reproduce", synthetic_root, out)
    assert steps_logged(again.stderr, "run") == ["decoder-lade", "eval decoder-lade"]
    assert report.stat().st_mtime_ns > stamps[report]

    other = Plan(Settings(dataset="synthetic", data_root=str(synthetic_root), out=str(out), model="ltclip-tiny-vit-64", pretrained="none"))
    with pytest.raises(LtclipError, match="extracted with another model .*ltclip-tiny-vit.*pass another --out"):
        other.steps()[0].done()

    lift = make("reproduce-lift", synthetic_root, out)
    assert steps_logged(lift.stderr, "skip")[:2] == ["extract", "zero-shot"]  # the cache and the zero-shot row are shared
    assert list(table_rows(out / "table-lift.md")) == ["zero-shot CLIP", *(row.label for row in LIFT_ROWS)]
    lift_config = json.loads((out / "runs" / "lift-adaptformer" / "config.json").read_text())
    assert lift_config["tuning"]["tune"] == "adaptformer" and lift_config["optim"]["select"] == "last"
    plus_config = json.loads((out / "runs" / "lift-plus" / "config.json").read_text())
    assert (plus_config["train_crop"], plus_config["optim"]["lr"], plus_config["tuning"]["tune_opts"]) == ("mda", 0.02, {"down_init": "uniform"})
    plan = Plan(Settings(dataset="synthetic", data_root=str(synthetic_root), out=str(out), model=TINY_MODEL, pretrained="none",
                         recipe="lift"))
    lift_eval = next(step for step in plan.steps() if step.name == "eval lift-plus")
    assert lift_eval.args[2:6] == ["--test-views", "fivecrop", "--eval-resize", "248"]  # the tables' test-time ensembling
