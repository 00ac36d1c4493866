"""Artifacts a hostile user hands ltclip: a resume on changed inputs or options, damaged run files,
a model.pt of another run, a --pretrained file that is no checkpoint, NaN rows and malformed caches.

Each refusal is ONE line ``error: ...`` (exit code 2, no traceback) naming the file or option and the
fix, and a refused resume leaves the interrupted run's checkpoint and log as they were. The table in
docs/reliability.md lists each case with the test that holds it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import TINY_MODEL, write_cache, write_token_cache
from test_bad_inputs import ENV, LINEAR, fails, gaussian_cache, ok, one_error_line

PACKAGE = Path(__file__).resolve().parent.parent / "ltclip"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def interrupted_run(tmp_path, *options) -> tuple[Path, Path]:
    """A gaussian cache and a linear run on it left as a killed run leaves it: last.pt and the log, no run.json."""
    features = gaussian_cache(tmp_path / "features")
    run = tmp_path / "run"
    ok("train-head", "--features", features, "--out", run, *LINEAR, *options)
    (run / "run.json").unlink()
    (run / "model.pt").unlink()
    return features, run


def snapshot(run: Path) -> dict:
    """The bytes of what a refused resume must keep."""
    return {name: (run / name).read_bytes() for name in ("last.pt", "train_log.jsonl", "config.json")}


def resume_fails(features: Path, run: Path, *options, fragments) -> str:
    before = snapshot(run)
    line = fails("train-head", "--features", features, "--out", run, *LINEAR, *options, "--resume", fragments=fragments)
    assert snapshot(run) == before and not (run / "run.json").exists()
    return line


# ============================================================================ resume


def test_resume_on_a_re_extracted_train_cache_is_refused(tmp_path):
    features, run = interrupted_run(tmp_path)
    gaussian_cache(features, seed=1)  # re-extracted: same shapes, other numbers
    resume_fails(features, run, fragments=[f"--resume: {features}/train.h5 changed since the interrupted run started",
                                           "restore it, or start a new run in another --out"])


def test_resume_with_other_options_names_each_flag_old_and_new(tmp_path):
    features, run = interrupted_run(tmp_path, "--lr", "0.001")
    line = resume_fails(features, run, "--lr", "0.01", "--head-opt", "normalize=false", fragments=[])
    assert line == ("error: --resume: options differ from the interrupted run: --head-opt (defaults) → normalize=false, "
                    "--lr 0.001 → 0.01; resume with the same options")


@pytest.mark.parametrize("damage", ["garbage", "not an object", "empty"])
def test_resume_with_a_damaged_config_json(tmp_path, damage):
    features, run = interrupted_run(tmp_path)
    config = run / "config.json"
    config.write_text({"garbage": '{"features": ', "not an object": "[1, 2]", "empty": ""}[damage])
    resume_fails(features, run, fragments=[f"--resume: {config} is missing or damaged", "the run's options are lost",
                                           "restore the file, or start the run again in another --out"])


def test_a_torn_last_log_line_is_dropped_and_the_resume_continues(tmp_path, caplog):
    features, run = interrupted_run(tmp_path)
    log = run / "train_log.jsonl"
    kept = log.read_text()
    log.write_text(kept + '{"epoch": 1, "lo')  # killed mid-write
    ok("train-head", "--features", features, "--out", run, *LINEAR, "--resume")
    assert f"{log}: dropped its last line, torn when the run was killed while writing it" in caplog.messages
    assert (run / "run.json").is_file() and log.read_text() == kept


def test_a_damaged_log_line_before_the_last_is_refused(tmp_path):
    features, run = interrupted_run(tmp_path)
    log = run / "train_log.jsonl"
    log.write_text("garbage\n" + log.read_text())
    resume_fails(features, run, fragments=[f"--resume: {log} line 1 is damaged (not a log record)", "delete that line"])


def test_resume_checks_the_inputs_a_stage_hands_start_run(tmp_path):
    """finetune hands its split files' content hashes (``inputs``): a changed one refuses the resume."""
    from ltclip.core.distributed import DistContext
    from ltclip.core.errors import LtclipError
    from ltclip.stages.common import start_run

    run, cfg = tmp_path / "run", {"out": str(tmp_path / "run"), "optim": {"lr": 0.1}}
    start_run(run, False, cfg, DistContext(), inputs={"splits/train.txt": "a" * 64})
    (run / "last.pt").write_bytes(b"checkpoint")
    start_run(run, True, cfg, DistContext(), inputs={"splits/train.txt": "a" * 64})
    with pytest.raises(LtclipError, match=r"^--resume: splits/train.txt changed since the interrupted run started "
                                          r"\(fingerprint aaaaaaaaaaaa, now bbbbbbbbbbbb\)"):
        start_run(run, True, cfg, DistContext(), inputs={"splits/train.txt": "b" * 64})


@pytest.mark.slow
def test_sigkill_then_re_extract_then_resume_is_refused(tmp_path):
    features = gaussian_cache(tmp_path / "features")
    run = tmp_path / "run"
    args = [sys.executable, "-m", "ltclip", "train-head", "--features", features, "--out", run, "--head", "linear",
            "--epochs", "100000", "--checkpoint-every", "1", "--device", "cpu"]
    proc = subprocess.Popen(list(map(str, args)), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (run / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (run / "last.pt").exists()
    gaussian_cache(features, seed=1)
    before = (run / "last.pt").read_bytes()
    done = subprocess.run(list(map(str, args + ["--resume"])), env=ENV, capture_output=True, text=True, timeout=120)
    one_error_line(done.stderr, done.returncode, f"--resume: {features}/train.h5 changed since the interrupted run started")
    assert (run / "last.pt").read_bytes() == before and not (run / "run.json").exists()


# ============================================================================ finished runs


def test_a_model_pt_of_another_head_or_class_count_is_refused(tmp_path):
    features = gaussian_cache(tmp_path / "features")
    ok("train-head", "--features", features, "--out", tmp_path / "linear", *LINEAR)
    ok("train-head", "--features", features, "--out", tmp_path / "mlp", "--head", "mlp", "--epochs", "1", "--device", "cpu")
    (tmp_path / "linear" / "model.pt").write_bytes((tmp_path / "mlp" / "model.pt").read_bytes())
    fails("eval", tmp_path / "linear", fragments=[f"{tmp_path}/linear/model.pt is not the model", "head 'mlp' vs 'linear'",
                                                 "restore the run's own model.pt or train it again"])
    four = tmp_path / "four"
    for split, per_class in (("train", [8, 6, 4, 2]), ("test", [2] * 4)):
        y = np.repeat(np.arange(4), per_class)
        write_cache(four, split, np.random.default_rng(0).standard_normal((len(y), 8)).astype(np.float32), y, 4)
    ok("train-head", "--features", four, "--out", tmp_path / "four-run", *LINEAR)
    (tmp_path / "mlp" / "model.pt").write_bytes((tmp_path / "four-run" / "model.pt").read_bytes())
    fails("eval", tmp_path / "mlp", fragments=["num_classes 4 vs 3"])


@pytest.mark.parametrize("field, value", [("num_classes", "3"), ("class_counts", {"a": 1}), ("class_counts", [1, 2]),
                                          ("inputs", []), ("method", None)])
def test_a_run_json_field_of_the_wrong_type(tmp_path, field, value):
    features = gaussian_cache(tmp_path / "features")
    run = tmp_path / "run"
    ok("train-head", "--features", features, "--out", run, *LINEAR)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, field: value}))
    fails("eval", run, fragments=[f"{run}/run.json: field {field} is", "the run is damaged: train it again"])


# ============================================================================ --pretrained FILE


class _Payload:
    """A pickle that runs code when loaded without weights_only: it would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch's note on the hostile pickle
@pytest.mark.parametrize("kind", ["text", "random bytes", "pickle with code", "foreign tensors"])
def test_pretrained_that_is_not_a_checkpoint(synthetic_root, tmp_path, kind):
    path = tmp_path / "weights.pt"
    marker = tmp_path / "code-ran"
    if kind == "text":
        path.write_text("these are not weights\n")
    elif kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "pickle with code":
        path.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    else:
        torch.save({"visual.proj": torch.ones(3)}, path)
    fails("extract", "--dataset", "synthetic", "--data-root", synthetic_root, "--model", TINY_MODEL, "--pretrained", path,
          "--device", "cpu", "--out", tmp_path / "features",
          fragments=[f"--pretrained {path}: not an open_clip checkpoint of {TINY_MODEL}", "pass a state dict"])
    assert not marker.exists()


def test_every_load_in_the_package_is_weights_only():
    """A future ``torch.load`` without ``weights_only=True``, an unrestricted unpickling load or a numpy
    load of pickles fails the suite (an unpickler subclass must restrict ``find_class``)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        name = path.relative_to(PACKAGE).as_posix()
        calls = list(re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text))
        found += [f"{name}: {c.group(0)}" for c in calls if "weights_only=True" not in c.group(0)]
        found += [f"{name}: {m.group(0)}" for m in re.finditer(r"pickle\.loads?\(|allow_pickle\s*=\s*True|dill\.load|joblib\.load", text)]
        if re.search(r"\(pickle\.Unpickler\)", text) and "def find_class" not in text:
            found.append(f"{name}: a pickle.Unpickler without find_class")
    assert found == []
    assert len(re.findall(r"torch\.load\(", (PACKAGE / "artifacts" / "runs.py").read_text())) >= 1  # the scan sees calls


# ============================================================================ caches


def test_a_nan_row_in_the_cache_is_named(tmp_path):
    features = gaussian_cache(tmp_path / "features")
    with h5py.File(features / "train.h5", "r+") as h5:
        h5["embeds"][17, 3] = np.nan
    fails("train-head", "--features", features, "--out", tmp_path / "run", *LINEAR,
          fragments=[f"{features}/train.h5 row 17: its features hold NaN or Inf", "re-extract the cache"])
    assert not (tmp_path / "run" / "last.pt").exists()


def test_an_inf_token_row_of_a_streamed_cache_is_named(tmp_path):
    features = write_token_cache(tmp_path / "features")
    with h5py.File(features / "train.h5", "r+") as h5:
        h5["tokens"][200, 1, 2] = np.inf
    fails("train-head", "--features", features, "--out", tmp_path / "run", "--head", "decoder", "--head-opt", "depth=1",
          "--epochs", "1", "--device", "cpu", "--max-ram", "1K",
          fragments=[f"{features}/train.h5 row 200: its features hold NaN or Inf"])


@pytest.mark.parametrize("attr, value, fragment", [
    ("num_classes", "abc", "has num_classes 'abc', expected a positive integer; set the num_classes attribute"),
    ("num_classes", None, "has num_classes (absent), expected a positive integer"),
    ("schema_version", "one", "has schema_version 'one', expected an integer >= 1"),
    ("num_rows", "many", "attribute num_rows=many but embeds has shape"),
    ("labels", "out of range", "label 7 of row 0 is outside [0, 3)"),
    ("labels", "short", "labels must be integers of shape (35,)"),
])
def test_malformed_cache_attributes_are_one_line(tmp_path, attr, value, fragment):
    features = gaussian_cache(tmp_path / "features")
    path = features / "train.h5"
    with h5py.File(path, "r+") as h5:
        if attr == "labels":
            labels = h5["labels"][()]
            del h5["labels"]
            h5["labels"] = np.r_[7, labels[1:]] if value == "out of range" else labels[:-1]
        elif value is None:
            del h5.attrs[attr]
        else:
            h5.attrs[attr] = value
    for args in (["train-head", "--features", features, "--out", tmp_path / "run", *LINEAR], ["cache", "info", features]):
        fails(*args, fragments=[str(path), fragment])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", [None, 5])
def test_a_prompt_head_on_a_cache_without_a_usable_model_attribute(tmp_path, value):
    features = gaussian_cache(tmp_path / "features")
    for split in ("train", "val", "test"):
        with h5py.File(features / f"{split}.h5", "r+") as h5:
            h5.attrs["pretrained"] = "none"
            if value is None:
                del h5.attrs["model"]
            else:
                h5.attrs["model"] = value
    fragment = "records no model/pretrained to rebuild the text tower from" if value is None else "--model '5': unknown open_clip model"
    fails("train-head", "--features", features, "--out", tmp_path / "run", "--head", "prompt", "--epochs", "1", "--device", "cpu",
          fragments=["--head prompt", f"{features}/train.h5", fragment])
    assert not (tmp_path / "run").exists()
