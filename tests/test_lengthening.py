"""A default length lengthened on a small cache (``min_steps``) validates and checkpoints as often as
the head's own epochs would (``--eval-every-epochs``), so its time is its optimizer steps'; a given
``--epochs`` validates every epoch, as before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import write_cache
from ltclip.cli import app
from ltclip.config import OptimConfig
from ltclip.data.gaussian import gaussian_lt
from ltclip.engine import RunEnv, fit, hooks
from ltclip.engine.checkpoint import LAST_FILE
from ltclip.engine.hooks import epoch_end_due
from ltclip.methods.second_stage.fit import TensorSource
from ltclip.methods.task import Task
from ltclip.recipes.resolve import lengthened, stage_one_config

runner = CliRunner()
ROWS = 300  # two steps an epoch at batch 256: the linear head's 10 epochs grow 5× to 50 towards its 500 steps


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> Path:
    counts = np.array([120, 80, 50, 30, 20])
    _, splits = gaussian_lt(0, counts, 8, 3.0, {"val": 6})
    root = tmp_path_factory.mktemp("lengthening") / "features"
    for split, (x, y) in splits.items():
        write_cache(root, split, x, y, len(counts))
    return root


def counted_last_writes(monkeypatch) -> list[str]:
    """The names of the checkpoints written from now on."""
    writes, save = [], hooks.save_checkpoint
    monkeypatch.setattr(hooks, "save_checkpoint", lambda path, state: (writes.append(path.name), save(path, state)))
    return writes


def train(root: Path, out: Path, monkeypatch, *args: str) -> tuple[list[dict], int, dict]:
    """``train-head`` on ``root``: its log records, the ``last.pt`` writes counted, and its saved optim config."""
    writes = counted_last_writes(monkeypatch)
    result = runner.invoke(app, ["train-head", "--features", str(root), "--head", "linear", "--device", "cpu", "-o", str(out), *args])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return records, writes.count(LAST_FILE), json.loads((out / "config.json").read_text())["optim"]


def validated_epochs(records: list[dict]) -> list[int]:
    return [r["epoch"] + 1 for r in records if "val_balanced_accuracy" in r]


def test_the_loop_validates_and_checkpoints_at_every_nth_epoch_end_and_the_last(tmp_path, monkeypatch):
    x, y = torch.randn(40, 4), torch.arange(40) % 2
    validated, writes = [], counted_last_writes(monkeypatch)
    cfg = OptimConfig(epochs=7, batch_size=8, eval_every_epochs=3)
    result = fit(torch.nn.Linear(4, 2), Task("ce", {}, np.array([20, 20])), TensorSource(x, y), cfg, num_classes=2,
                 validate=lambda model: validated.append(1) or {"balanced_accuracy": float(len(validated))},
                 env=RunEnv(out=tmp_path))
    assert validated_epochs(result.history) == [3, 6, 7] and len(validated) == 3
    assert writes.count(LAST_FILE) == 3 and result.best["epoch"] == 6  # the last validation scored highest


@pytest.mark.slow  # 1-5 s: 100 optimizer steps through the CLI
def test_a_lengthened_default_validates_and_checkpoints_every_kth_epoch(small_cache, tmp_path, monkeypatch):
    records, last_writes, optim = train(small_cache, tmp_path / "default", monkeypatch)
    assert (optim["epochs"], optim["eval_every_epochs"]) == (50, 5)  # the saved config reruns with the same cadence
    assert len([r for r in records if "loss" in r]) == 50  # every epoch trains and is logged
    assert validated_epochs(records) == list(range(5, 51, 5))  # 10 validations: as many as the head's own 10 epochs
    assert last_writes == 10
    run = json.loads((tmp_path / "default" / "run.json").read_text())
    assert run["best"]["epoch"] + 1 in range(5, 51, 5)  # the kept weights are a validated epoch's


@pytest.mark.slow
def test_a_given_length_validates_every_epoch(small_cache, tmp_path, monkeypatch):
    records, last_writes, optim = train(small_cache, tmp_path / "given", monkeypatch, "--epochs", "50")
    assert (optim["epochs"], optim["eval_every_epochs"]) == (50, 1)
    assert validated_epochs(records) == list(range(1, 51))
    assert last_writes == 50


def test_the_cadence_follows_the_whole_lengthening(small_cache):
    base = {"features": str(small_cache), "out": "o", "head": "mlp"}

    def cadence(rows: int, **values) -> tuple[int, int]:
        optim = lengthened(stage_one_config({**base, **values}), rows)[0].optim
        return optim.epochs, optim.eval_every_epochs

    assert cadence(2478) == (100, 3)  # 10 steps an epoch: 30 epochs grow to 100, validated at 3, 6, … 99 and 100
    assert cadence(5270) == (48, 1)  # 21 steps an epoch: lengthened less than 2×, every epoch
    assert cadence(20_000) == (30, 1)  # long enough: not lengthened
    assert cadence(2478, eval_every_epochs=2) == (100, 6)  # a cadence given counts the head's own epochs
    assert cadence(2478, epochs=30) == (30, 1)  # a length given is kept, and so is its cadence
    assert [e + 1 for e in range(100) if epoch_end_due(e, 3, 100)] == [*range(3, 100, 3), 100]  # the last epoch always
