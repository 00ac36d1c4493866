"""Training runs as processes: torchrun equals one process, SIGKILL + --resume equals an uninterrupted
run (stage 1 and a second stage), saved configs rerun, run-folder schema errors, option refusal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import kill_at_random_moments, newest_mtime, write_cache
from ltclip.cli import app

runner = CliRunner()
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    """A long-tailed token cache (240 train rows: both processes of a 2-rank run get 120)."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("runs") / "features"
    counts = [96, 60, 40, 24, 12, 8]
    for split, per_class in (("train", counts), ("val", [10] * 6)):
        y = np.repeat(np.arange(6), per_class)
        tokens = rng.standard_normal((len(y), 5, 16)).astype(np.float32)
        tokens[:, 0, :6] += 2.0 * np.eye(6)[y]
        write_cache(root, split, tokens[:, 0], y, 6, tokens=tokens)
    return root


def state_dict(run: Path, part: str = "head") -> dict:
    return torch.load(run / "model.pt", weights_only=True)[part]["state_dict"]


def log_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def run_process(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``args`` in a fresh process group, killed whole if it ever hangs."""
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


STAGE1 = ["--head", "decoder", "--head-opt", "depth=1", "--head-opt", "heads=2", "--loss", "balanced_softmax",
          "--epochs", "3", "--batch-size", "32", "--optimizer", "sgd", "--lr", "0.05", "--device", "cpu"]
# SGD, not Adam, where processes are compared: Adam turns the float noise of a zero gradient (an attention
# key bias has one) into full-size steps.


@pytest.mark.slow
def test_torchrun_two_processes_train_the_same_model_as_one(features, tmp_path):
    one = tmp_path / "one"
    invoke("train-head", "--features", features, "--out", one, *STAGE1)
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ltclip",
           "train-head", "--features", str(features), "--out", str(two), *STAGE1, "--max-ram", "1K"]  # ranks stream their rows
    done = run_process(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((two / "run.json").read_text())
    assert info["processes"] == 2 and info["inputs_in_ram"] is False
    a, b = state_dict(one), state_dict(two)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    for r1, r2 in zip(log_records(one), log_records(two), strict=True):
        assert r1["step"] == r2["step"]
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-4)
        assert r2["val_balanced_accuracy"] == pytest.approx(r1["val_balanced_accuracy"])  # validation shared by the ranks


def kill_at_random_steps(args: list[str], out: Path, kills: int, seed: int) -> int:
    """Start ``ltclip ARGS --out OUT``, SIGKILL it at a random moment after its first checkpoint, resume; ``kills`` times.

    Returns how many kills landed before the run finished."""
    last = out / "last.pt"
    landed = kill_at_random_moments(
        lambda: [sys.executable, "-m", "ltclip", *args, "--out", str(out)] + (["--resume"] if last.exists() else []),
        lambda: newest_mtime(last), kills=kills, seed=seed, max_delay=0.3, env=ENV,
    )
    result = runner.invoke(app, [*args, "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    return landed


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_equals_an_uninterrupted_run(features, tmp_path):
    args = ["train-head", "--features", str(features), *STAGE1, "--epochs", "10", "--batch-size", "16", "--head-opt",
            "dropout=0.1", "--sampler", "progressive", "--checkpoint-every", "1"]
    reference = tmp_path / "reference"
    invoke(*args, "--out", reference)
    killed = tmp_path / "killed"
    assert kill_at_random_steps(args, killed, kills=3, seed=0) >= 2
    a, b = state_dict(reference), state_dict(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert log_records(reference) == log_records(killed)

    stage2 = ["train-head", "--from", str(reference), "--two-stage", "lws", "--epochs", "12", "--batch-size", "16",
              "--checkpoint-every", "1", "--device", "cpu"]
    ref2 = tmp_path / "ref2"
    invoke(*stage2, "--out", ref2)
    killed2 = tmp_path / "killed2"
    assert kill_at_random_steps(stage2, killed2, kills=3, seed=1) >= 2
    a, b = state_dict(ref2, "two_stage"), state_dict(killed2, "two_stage")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert log_records(ref2) == log_records(killed2)


def test_saved_configs_rerun_their_stage(features, tmp_path):
    first = tmp_path / "first"
    invoke("train-head", "--features", features, "--out", first, "--head", "linear", "--epochs", "2", "--device", "cpu")
    second = tmp_path / "second"
    invoke("train-head", "--from", first, "--out", second, "--two-stage", "crt", "--epochs", "2", "--lr", "0.5")
    saved = json.loads((second / "config.json").read_text())
    assert saved["optim"]["lr"] == 0.5 and saved["optim"]["optimizer"] == "sgd"  # the second stage's own defaults
    again = tmp_path / "again"
    invoke("train-head", "--config", second / "config.json", "--out", again)
    a, b = state_dict(second, "two_stage"), state_dict(again, "two_stage")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--two-stage", "tau-norm", "--lr", "0.3"], "tau-norm does not train: --lr would have no effect"),
        (["--two-stage", "ncm", "--sampler", "class-balanced"], "ncm does not train: --sampler"),
        (["--posthoc-la", "--epochs", "3"], "--posthoc-la alone trains nothing: --epochs"),
        (["--two-stage", "crt", "--head", "linear"], "--head: not an option of a second stage"),
        (["--two-stage", "crt", "--head-opt", "depth=1"], "--head-opt: not an option of a second stage"),
        ([], "needs --two-stage METHOD and/or --posthoc-la"),
        (["--two-stage", "crt", "--batch-size", "10", "--accum", "3"], "must be a multiple of processes × --accum"),
    ],
)
def test_second_stage_refuses_options_it_would_not_use(features, tmp_path, args, message):
    first = tmp_path / "first"
    invoke("train-head", "--features", features, "--out", first, "--head", "linear", "--epochs", "1", "--device", "cpu")
    result = runner.invoke(app, ["train-head", "--from", str(first), "--out", str(tmp_path / "s2"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_run_folder_schema_is_checked_when_read(features, tmp_path):
    run = tmp_path / "run"
    invoke("train-head", "--features", features, "--out", run, "--head", "linear", "--epochs", "1", "--device", "cpu")
    info = json.loads((run / "run.json").read_text())
    assert info["schema_version"] == 1 and info["kind"] == "head" and "train_sha256" in info["inputs"]["features"]
    payload = torch.load(run / "model.pt", weights_only=True)  # plain tensors and containers only
    assert payload["schema_version"] == 1
    for change, message in (
        ({"schema_version": 99}, "schema_version 99 but ltclip"),
        ({"schema_version": None}, "has no schema_version"),
        ({"kind": "mystery"}, "kind 'mystery'"),
    ):
        (run / "run.json").write_text(json.dumps({k: v for k, v in {**info, **change}.items() if v is not None}))
        result = runner.invoke(app, ["eval", str(run)])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    (run / "run.json").unlink()
    result = runner.invoke(app, ["eval", str(run)])
    assert result.exit_code == 2 and "not a finished run (run.json missing); resume it with --resume" in result.output


def test_extract_json_reruns_extract(synthetic_root, tmp_path):
    out = tmp_path / "feat"
    first = runner.invoke(app, ["extract", "--dataset", "synthetic", "--data-root", str(synthetic_root), "--model", "ltclip-tiny-vit",
                                "--pretrained", "none", "--device", "cpu", "--workers", "0", "--splits", "val,test", "--out", str(out)])
    assert first.exit_code == 0, first.output
    saved = json.loads((out / "extract.json").read_text())
    assert saved["config"]["splits"] == ["val", "test"] and saved["config"]["data"]["dataset"] == "synthetic"
    again = runner.invoke(app, ["extract", "--config", str(out / "extract.json")])
    assert again.exit_code == 0, again.output
    assert again.output.count("up to date") == 3  # val, test and the text embeddings: nothing recomputed
