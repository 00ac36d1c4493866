"""A new user's first minutes: a pretrained tag without internet, ``datasets make-synthetic``'s
output, and the demo's progress.

Missing weights offline are one ``error:`` line at once (no minute of Hugging Face retries) and leave
nothing on disk; the network is made to fail for real (an empty HF cache, a closed port as the Hub).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_MODEL
from ltclip.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def no_network_env(tmp_path: Path) -> dict:
    """An empty Hugging Face cache and a Hub on a closed port: every download fails at once, for real."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "WORLD_SIZE"):
        env.pop(name, None)
    return env


def run_offline(tmp_path: Path, *args) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "ltclip", *map(str, args)], env=no_network_env(tmp_path),
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    return done, time.monotonic() - start


def assert_missing_weights_line(done: subprocess.CompletedProcess, seconds: float) -> None:
    """Exactly one line on stderr, ``error: ...`` naming the tag, the cache and the cause; exit 2."""
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr  # no retry warnings
    for fragment in ("--pretrained openai", "ViT-B-16", "not in the local cache", "no network: ConnectError", "--pretrained FILE"):
        assert fragment in done.stderr, done.stderr
    assert seconds < 30, seconds  # open_clip's own download retried for 50-78 s before its error


@pytest.mark.slow
def test_extract_with_missing_weights_offline_is_one_line_and_creates_no_folder(synthetic_root, tmp_path):
    done, seconds = run_offline(tmp_path, "extract", "--dataset", "synthetic", "--data-root", synthetic_root,
                                "--model", "ViT-B-16", "--pretrained", "openai", "--out", "features/vit", "--device", "cpu")
    assert_missing_weights_line(done, seconds)
    assert not (tmp_path / "features").exists()  # neither --out nor the parent it would have made
    assert not any((tmp_path / "hf").rglob("*.bin"))


@pytest.mark.slow
def test_finetune_with_missing_weights_offline_is_one_line_and_creates_no_run(synthetic_root, tmp_path):
    done, seconds = run_offline(tmp_path, "finetune", "--dataset", "synthetic", "--data-root", synthetic_root,
                                "--model", "ViT-B-16", "--pretrained", "openai", "--out", "run", "--device", "cpu")
    assert_missing_weights_line(done, seconds)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_eval_of_a_run_whose_base_weights_are_missing_is_one_line(synthetic_root, tmp_path):
    """A finetuned run copied from a machine that had the weights, evaluated on one without them."""
    result = runner.invoke(app, ["finetune", "--dataset", "synthetic", "--data-root", str(synthetic_root), "--model", TINY_MODEL,
                                 "--pretrained", "none", "--tune", "frozen", "--head", "linear", "--epochs", "1",
                                 "--workers", "0", "--device", "cpu", "--out", "run"])
    assert result.exit_code == 0, result.output
    payload = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    payload["encoder"].update(model="ViT-B-16", pretrained="openai")  # as if trained from the OpenAI weights
    torch.save(payload, tmp_path / "run" / "model.pt")
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    done, seconds = run_offline(tmp_path, "eval", "run", "--split", "val")
    assert_missing_weights_line(done, seconds)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


CACHED_TAG = """
import sys, time
import open_clip, torch
from open_clip.pretrained import _PRETRAINED, _pcfg
from ltclip.models.backbone import load_backbone, register_tiny_configs

register_tiny_configs()
_PRETRAINED[sys.argv[1]] = {"hubtest": _pcfg(hf_hub="ltclip/tiny-test/")}  # a Hub tag, weights open_clip_pytorch_model.bin
snapshot = sys.argv[2]
torch.save(open_clip.create_model(sys.argv[1]).state_dict(), snapshot + "/open_clip_pytorch_model.bin")
start = time.monotonic()
backbone = load_backbone(sys.argv[1], "hubtest")
print(round(time.monotonic() - start, 1), backbone.identity["pretrained"])
"""


@pytest.mark.slow
def test_a_cached_tag_loads_without_the_network_and_without_retries(tmp_path):
    """Weights cached as the .bin only: open_clip would first ask the dead Hub for a .safetensors twin (20 s of retries)."""
    repo = tmp_path / "hf" / "hub" / "models--ltclip--tiny-test"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    done = subprocess.run([sys.executable, "-c", CACHED_TAG, TINY_MODEL, str(snapshot)], env=no_network_env(tmp_path),
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    seconds, tag = done.stdout.split()
    assert tag == "hubtest" and float(seconds) < 5, done.stdout  # 23.6 s of retries before
    assert "Retrying" not in done.stderr and "127.0.0.1:9" not in done.stderr, done.stderr


def test_missing_weights_under_hf_hub_offline_name_the_setting(tmp_path, monkeypatch):
    """In process: HF_HUB_OFFLINE=1 (conftest) and an empty cache: the line says which setting stops the download."""
    from huggingface_hub import constants

    from ltclip.core.errors import LtclipError
    from ltclip.models.backbone import load_backbone

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(LtclipError) as err:
        load_backbone("ViT-B-16", "openai")
    message = str(err.value)
    assert "\n" not in message and "HF_HUB_OFFLINE=1 is set" in message and str(tmp_path / "empty-cache") in message
    assert "hf download timm/vit_base_patch16_clip_224.openai open_clip_pytorch_model.bin" in message


SMALL_SET = ["--classes", "4", "--max-per-class", "10", "--imbalance", "5", "--val-per-class", "2", "--test-per-class", "3",
             "--size", "16"]


def test_make_synthetic_prints_a_short_summary_and_json_on_request(tmp_path):
    result = runner.invoke(app, ["datasets", "make-synthetic", "syn", *SMALL_SET])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) <= 5, result.output
    assert lines[0] == "syn: synthetic set written"
    for fragment in ("4 classes (red circle, green square, blue triangle, …, yellow star), 16 px",
                     "train 21 images, 10 → 2 per class (imbalance 5)", "val 8, test 12", "--data-root syn"):
        assert fragment in result.output, result.output
    again = runner.invoke(app, ["datasets", "make-synthetic", "syn", *SMALL_SET, "--json"])
    assert again.exit_code == 0, again.output
    described = json.loads(again.output)
    assert described["skipped"] is True and described["train_counts"] == [10, 6, 3, 2]


def test_make_synthetic_usage_names_its_argument_out():
    result = runner.invoke(app, ["datasets", "make-synthetic", "--help"], env={"COLUMNS": "200"})
    usage = next(line for line in result.output.splitlines() if "Usage:" in line)
    assert "OUT" in usage and "{out}" not in usage, usage


FAKE_LTCLIP = r"""#!/usr/bin/env bash
# Stands in for ltclip in the demo driver: the steps' output, none of their work.
case "$1" in
    pretrain-toy)
        for epoch in 1 2 3; do sleep 0.7; echo "epoch $epoch/3 ━━━━━━━━ 45/45 6 step/s" >&2; echo "epoch $epoch/3: loss 2.$epoch" >&2; done
        echo "toy CLIP trained";;
    extract) echo "train (10 images) ━━━━━━━━ 10/10" >&2; printf 'cache: features\nltclip.toml names it\n';;
    train-head)  # a long run: line, wrapped at $COLUMNS (else 80) as rich wraps a line to a file
        mkdir -p "$3"
        printf 'run: %s, val balanced accuracy 50.00%% (best at epoch 3 of 40; many 90.0 / medium 40.0 / few 10.0)\n' "$3" |
            fold -w "${COLUMNS:-80}" >&2;;
    *) echo "ltclip $*";;
esac
"""


@pytest.mark.slow
def test_demo_driver_tells_each_step_and_its_log_shows_progress_and_whole_run_lines(tmp_path):
    fake = tmp_path / "ltclip"
    fake.write_text(FAKE_LTCLIP)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    demo = Path(__file__).resolve().parent.parent / "scripts" / "demo.sh"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "MODEL", "PRETRAINED")}
    done = subprocess.run(["bash", str(demo), str(fake), "out"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    told = out.index("log: out/logs/pretrain-toy.log")
    assert told < out.index("ltclip datasets make-synthetic out/synthetic")  # said before the step's silence starts
    assert told < out.index("] epoch 3/3: loss 2.3")  # the pretraining's progress, read from its log
    assert "━" not in out
    assert "(log: out/logs/extract.log)" in out and "cache: features" in out
    runs = [line for line in out.splitlines() if line.startswith("run: ")]
    assert len(runs) == 7 and all(line.endswith("few 10.0)") for line in runs), out  # whole, not cut at 80 columns
