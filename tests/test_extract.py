"""`ltclip extract`: cache contents equal open_clip's outputs; resume after SIGKILL; torchrun; bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_MODEL
from ltclip.cli import app
from ltclip.data.registry import load_dataset
from ltclip.models.backbone import load_backbone
from ltclip.artifacts.store import FeatureCache

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint


def extract_args(root, out, checkpoint, *extra):
    return ["extract", "--data-root", str(root), "--model", TINY_MODEL, "--pretrained", str(checkpoint),
            "--out", str(out), "--workers", "0", "--batch-size", "16", "--block-size", "24", "--device", "cpu", *extra]


def invoke(*args):
    result = runner.invoke(app, list(args))
    return result


def read_arrays(folder: Path) -> dict:
    out = {}
    for split in ("train", "val", "test"):
        with h5py.File(folder / f"{split}.h5", "r") as f:
            for name in ("embeds", "tokens", "labels"):
                if name in f:
                    out[f"{split}/{name}"] = f[name][()]
    return out


@pytest.fixture(scope="module")
def cache(synthetic_root, checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "feat"
    result = invoke(*extract_args(synthetic_root, out, checkpoint))
    assert result.exit_code == 0, result.output
    return out


def test_embeds_equal_open_clip_encode_image(cache, synthetic_root, checkpoint):
    backbone = load_backbone(TINY_MODEL, str(checkpoint))
    ds = load_dataset("synthetic", synthetic_root)
    with FeatureCache(cache / "test.h5") as c:
        embeds = c.load_embeds()[:, 0]
        assert c.paths == ds.split("test").keys
        np.testing.assert_array_equal(c.labels, ds.split("test").labels)
    images = torch.stack([backbone.preprocess(ds.open_image("test", i)) for i in range(len(ds.split("test")))])
    with torch.inference_mode():
        reference = backbone.model.encode_image(images).numpy()
    np.testing.assert_allclose(embeds.astype(np.float32), reference, rtol=2e-3, atol=2e-3)  # stored as float16


def test_tokens_cls_after_final_norm_and_projection_equals_embeds(cache, checkpoint):
    v = load_backbone(TINY_MODEL, str(checkpoint)).model.visual
    with FeatureCache(cache / "val.h5") as c:
        tokens = torch.from_numpy(c.read_tokens(np.arange(c.num_rows))[:, 0].astype(np.float32))
        embeds = c.load_embeds()[:, 0].astype(np.float32)
    with torch.inference_mode():
        from_cls = (v.ln_post(tokens)[:, 0] @ v.proj).numpy()
    np.testing.assert_allclose(from_cls, embeds, rtol=1e-2, atol=1e-2)


def test_text_embeddings_and_provenance(cache, checkpoint):
    from ltclip.artifacts.store import load_text_embeddings

    text = load_text_embeddings(cache / "text.h5")
    assert text.embeds.shape == (10, 32) and len(text.templates) >= 3
    np.testing.assert_allclose(np.linalg.norm(text.embeds, axis=1), 1, atol=1e-5)
    with FeatureCache(cache / "train.h5") as c:
        assert c.attrs["model"] == TINY_MODEL and c.attrs["split"] == "train"
        assert len(c.attrs["checkpoint_sha256"]) == 64 and len(c.attrs["manifest_sha256"]) == 64
        assert "bicubic" in c.attrs["preprocess"]


def test_rerun_does_nothing_and_mismatch_is_refused(cache, synthetic_root, checkpoint, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in cache.glob("*.h5")}
    result = invoke(*extract_args(synthetic_root, cache, checkpoint))
    assert result.exit_code == 0 and "up to date" in result.output
    assert before == {p: p.stat().st_mtime_ns for p in cache.glob("*.h5")}
    other = tmp_path / "other.pt"
    sd = torch.load(checkpoint)
    sd["visual.proj"] = sd["visual.proj"] * 2
    torch.save(sd, other)
    result = invoke(*extract_args(synthetic_root, cache, other))
    assert result.exit_code == 2
    assert "checkpoint_sha256" in result.output and "Traceback" not in result.output
    assert before == {p: p.stat().st_mtime_ns for p in cache.glob("*.h5")}  # nothing touched


def test_cache_info_reports_every_file(cache):
    import json

    result = invoke("cache", "info", str(cache), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert {f["file"] for f in info["files"]} == {"train.h5", "val.h5", "test.h5", "text.h5"}
    assert all(f["complete"] for f in info["files"]) and info["provenance"]["model"] == TINY_MODEL


def test_views_are_a_dimension_and_train_views_are_seeded(synthetic_root, checkpoint, tmp_path):
    args = ("--splits", "train,test", "--test-views", "fivecrop", "--train-views", "2", "--no-tokens")
    for out in ("a", "b"):
        result = invoke(*extract_args(synthetic_root, tmp_path / out, checkpoint, *args))
        assert result.exit_code == 0, result.output
    a, b = read_arrays_subset(tmp_path / "a"), read_arrays_subset(tmp_path / "b")
    assert a["train"].shape[1] == 2 and a["test"].shape[1] == 5
    np.testing.assert_array_equal(a["train"], b["train"])  # same seed, same augmented views
    assert not np.array_equal(a["train"][:, 0], a["train"][:, 1])


def read_arrays_subset(folder):
    out = {}
    for split in ("train", "test"):
        with FeatureCache(folder / f"{split}.h5") as c:
            out[split] = c.load_embeds()
            assert not c.has_tokens
    return out


@pytest.mark.parametrize(
    "args, message",
    [
        (("--splits", "train,holdout"), "no split 'holdout'"),
        (("--precision", "fp16"), "fp16 needs a CUDA device"),
        (("--test-views", "sevencrop"), "--test-views"),
        (("--bad-images", "ignore"), "--bad-images"),
    ],
)
def test_bad_options_are_one_line_errors(synthetic_root, checkpoint, tmp_path, args, message):
    result = invoke(*extract_args(synthetic_root, tmp_path / "o", checkpoint, *args))
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_bad_image_fails_or_is_skipped(synthetic_root, checkpoint, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    victim = root / load_dataset("synthetic", root).split("val").keys[3]
    victim.write_bytes(b"not a png")
    result = invoke(*extract_args(root, tmp_path / "fail", checkpoint, "--splits", "val"))
    assert result.exit_code == 2 and victim.name in result.output and "--bad-images skip" in result.output
    result = invoke(*extract_args(root, tmp_path / "skip", checkpoint, "--splits", "val", "--bad-images", "skip"))
    assert result.exit_code == 0, result.output
    with FeatureCache(tmp_path / "skip" / "val.h5") as c:
        embeds = c.load_embeds()
    assert not embeds[3].any() and embeds[2].any()


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(synthetic_root, checkpoint, cache, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ltclip", *extract_args(synthetic_root, out, checkpoint, "--block-size", "4", "--batch-size", "4")]
    killed_midway = 0
    rng = np.random.default_rng(0)
    for attempt in range(4):
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while not (out / "train.h5").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(float(rng.uniform(0.0, 0.4)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed_midway += 1
        proc.wait()
        for split in ("train", "val", "test"):  # whatever the moment of the kill, every file still opens
            if (out / f"{split}.h5").exists():
                FeatureCache(out / f"{split}.h5", allow_incomplete=True).close()
    assert killed_midway >= 1
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ref, got = read_arrays(cache), read_arrays(out)
    assert ref.keys() == got.keys()
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(synthetic_root, checkpoint, cache, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ltclip",
           *extract_args(synthetic_root, out, checkpoint)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:  # never leave ranks behind, whatever happened
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-2000:]
    assert sorted(p.name for p in out.glob("*.h5")) == ["test.h5", "text.h5", "train.h5", "val.h5"]  # shards joined
    ref, got = read_arrays(cache), read_arrays(out)
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)


def test_templates_file_reaches_the_text_embeddings(synthetic_root, checkpoint, tmp_path):
    from ltclip.artifacts.store import load_text_embeddings

    templates = tmp_path / "templates.txt"
    templates.write_text("a blurry sketch of a {}.\na {} on a canvas.\n")
    result = invoke(*extract_args(synthetic_root, tmp_path / "feat", checkpoint, "--splits", "val", "--templates", str(templates)))
    assert result.exit_code == 0, result.output
    text = load_text_embeddings(tmp_path / "feat" / "text.h5")
    assert text.templates == ["a blurry sketch of a {}.", "a {} on a canvas."]
    info = invoke("cache", "info", str(tmp_path / "feat"))
    assert info.exit_code == 0 and "val.h5" in info.output and TINY_MODEL in info.output
