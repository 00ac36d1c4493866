"""SIGKILL at random moments, then the same command (extract) or ``--resume`` (train-head): the result
equals an uninterrupted run, for extract, a stage-1 head and a second stage.

Each test kills its process at ``KILLS`` seeded random moments after it started writing (blocks of a
cache; checkpoints at every optimizer step), checks that what it left opens, finishes the work, and
compares it with an uninterrupted run: cache arrays byte for byte, ``model.pt`` state dicts with
``torch.equal`` and ``train_log.jsonl`` line for line. It also counts the kills that landed before
the process finished by itself (docs/reliability.md quotes the counts) and asserts that most did.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_MODEL, kill_at_random_moments, newest_mtime, write_token_cache
from ltclip.cli import app
from ltclip.artifacts.store import FeatureCache, load_text_embeddings

runner = CliRunner()
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
ENV.pop("WORLD_SIZE", None)
KILLS = 6
MOST = 4  # of KILLS: a kill that comes after the process finished tests nothing

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ./ltclip.toml and default folders stay in tmp


def ok(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def ltclip(*args) -> list[str]:
    return [sys.executable, "-m", "ltclip", *map(str, args)]


def report(stage: str, landed: int, progress: list) -> None:
    print(f"\n{stage}: {landed} of {KILLS} kills landed before the process finished; left behind at each restart: {progress}")
    assert landed >= MOST, f"{stage}: only {landed} of {KILLS} kills landed; give the process more work"


# ---------------------------------------------------------------------------- extract


def cache_arrays(folder: Path) -> dict:
    out = {}
    for split in ("train", "val"):
        with h5py.File(folder / f"{split}.h5", "r") as f:
            out.update({f"{split}/{k}": f[k][()] for k in ("embeds", "tokens", "labels", "done")})
            out[f"{split}/complete"] = np.asarray(f.attrs["complete"])
    out["text"] = load_text_embeddings(folder / "text.h5").embeds
    return out


def test_extract_killed_at_random_moments_then_rerun_equals_an_uninterrupted_run(synthetic_root, tmp_path):
    args = ["extract", "--dataset", "synthetic", "--data-root", synthetic_root, "--model", TINY_MODEL, "--pretrained", "none",
            "--device", "cpu", "--workers", "0", "--splits", "train,val", "--batch-size", "2", "--block-size", "2",
            "--train-views", "10", "--test-views", "tencrop"]  # 10 views per image: seconds of work, written 2 rows at a time
    ok(*args, "--out", tmp_path / "reference")
    out = tmp_path / "killed"
    files = [out / f"{name}.h5" for name in ("train", "val", "text")]
    progress = []  # blocks written (train, val) after each kill

    def left_behind() -> tuple:
        blocks = []
        for path in files[:2]:  # whatever the moment of the kill, every file left behind opens
            if path.exists():
                FeatureCache(path, allow_incomplete=True).close()
                with h5py.File(path, "r") as f:
                    blocks.append(int(f["done"][()].sum()))
        return tuple(blocks)

    def killed_command():
        if out.exists():
            progress.append(left_behind())
        return ltclip(*args, "--out", out)

    landed = kill_at_random_moments(killed_command, lambda: newest_mtime(*files), kills=KILLS, seed=11, max_delay=0.5, env=ENV)
    progress.append(left_behind())
    ok(*args, "--out", out)
    reference, resumed = cache_arrays(tmp_path / "reference"), cache_arrays(out)
    assert reference.keys() == resumed.keys()
    for key in reference:
        np.testing.assert_array_equal(resumed[key], reference[key], err_msg=key)
    report("extract (train, val blocks of 2 rows written)", landed, progress)


# ---------------------------------------------------------------------------- train-head

STAGE1 = ["--head", "decoder", "--head-opt", "depth=1", "--head-opt", "heads=2", "--head-opt", "dropout=0.1", "--loss", "ldam",
          "--sampler", "progressive", "--epochs", "20", "--batch-size", "16", "--lr", "3e-3", "--checkpoint-every", "1",
          "--device", "cpu"]


def assert_same_run(a: Path, b: Path, part: str) -> None:
    sa = torch.load(a / "model.pt", weights_only=True)[part]["state_dict"]
    sb = torch.load(b / "model.pt", weights_only=True)[part]["state_dict"]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert (a / "train_log.jsonl").read_text() == (b / "train_log.jsonl").read_text()


def kill_and_resume(args: list, out: Path, seed: int, progress: list) -> int:
    """Kill ``ltclip ARGS --out OUT`` at random moments after a checkpoint; ``progress`` gets the
    checkpoint's step at each restart. Then finish the run with ``--resume``."""
    last = out / "last.pt"

    def command():
        if last.exists():
            progress.append(int(torch.load(last, weights_only=True)["state"]["step"]))
        return ltclip(*args, "--out", out, *(["--resume"] if last.exists() else []))

    landed = kill_at_random_moments(command, lambda: newest_mtime(last), kills=KILLS, seed=seed, max_delay=0.4, env=ENV)
    if last.exists():
        progress.append(int(torch.load(last, weights_only=True)["state"]["step"]))
    if not (out / "run.json").exists():  # else the last start finished the run by itself
        ok(*args, "--out", out, *(["--resume"] if last.exists() else []))
    return landed


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    return write_token_cache(tmp_path_factory.mktemp("kill") / "features")


@pytest.fixture(scope="module")
def stage1_reference(features, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("stage1") / "reference"
    ok("train-head", "--features", features, "--out", run, *STAGE1)
    return run


def test_train_head_killed_at_random_steps_then_resume_equals_an_uninterrupted_run(features, stage1_reference, tmp_path):
    args = ["train-head", "--features", features, *STAGE1]
    out = tmp_path / "killed"
    steps = []
    landed = kill_and_resume(args, out, seed=12, progress=steps)
    assert_same_run(stage1_reference, out, "head")
    report("train-head (stage 1, checkpoint step; 15 steps per epoch)", landed, steps)


def test_second_stage_killed_at_random_steps_then_resume_equals_an_uninterrupted_run(stage1_reference, tmp_path):
    args = ["train-head", "--from", stage1_reference, "--two-stage", "lws", "--epochs", "40", "--batch-size", "16",
            "--checkpoint-every", "1", "--device", "cpu"]
    ok(*args, "--out", tmp_path / "reference")
    out = tmp_path / "killed"
    steps = []
    landed = kill_and_resume(args, out, seed=13, progress=steps)
    assert_same_run(tmp_path / "reference", out, "two_stage")
    report("second stage (lws, checkpoint step; 15 steps per epoch)", landed, steps)
