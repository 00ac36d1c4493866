"""Outputs never replace inputs, and one writer per folder: what a hostile (or hurried) user tries.

Every refusal is ONE line ``error: ...`` with exit code 2, before any work, and the file that would
have been replaced is byte-identical afterwards. Two commands writing one folder: exactly one
writes, the other is refused naming the first's pid, and a lock left by a SIGKILLed process is
taken over. The table in docs/reliability.md lists each case with its test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL, write_cache
from ltclip.core.distributed import DistContext
from ltclip.core.errors import LtclipError
from ltclip.core.lock import LOCK_FILE, folder_lock

from test_bad_inputs import ENV, _in_tmp, invoke, ok, one_error_line  # noqa: F401  (_in_tmp: the autouse fixture)

LINEAR = ["--head", "linear", "--epochs", "1", "--device", "cpu"]
ROWS = {"train": [30, 12, 5], "val": [4, 4, 4], "test": [4, 4, 4]}


def fails(*args, fragments=()) -> str:
    result = invoke(*args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return one_error_line(result.output, result.exit_code, *fragments)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_hashes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def gaussian_cache(folder: Path, rows=ROWS, dim: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for split, counts in rows.items():
        y = np.repeat(np.arange(len(counts)), counts)
        write_cache(folder, split, (rng.standard_normal((len(y), dim)) + 2 * np.eye(len(counts), dim)[y]).astype(np.float32),
                    y, len(counts))
    return folder


@pytest.fixture()
def run_on_cache(tmp_path):
    """A finished linear run on a gaussian cache: (cache folder, run folder)."""
    features = gaussian_cache(tmp_path / "features")
    ok("train-head", "--features", features, "--out", tmp_path / "run", *LINEAR)
    return features, tmp_path / "run"


# ============================================================================ eval's report files


@pytest.mark.parametrize("option, target, replaced", [
    ("--json", "run/model.pt", "model.pt of the run"),
    ("--report", "run/run.json", "run.json of the run"),
    ("--csv", "run/config.json", "config.json of the run"),
    ("--report", "features/test.h5", "test.h5 of the feature cache"),
    ("--plot", "features/train.h5", "train.h5 of the feature cache"),
])
def test_eval_report_naming_an_input_file_is_refused(run_on_cache, tmp_path, option, target, replaced):
    _, run = run_on_cache
    before = {"run": folder_hashes(run), "features": folder_hashes(tmp_path / "features")}
    fails("eval", run, option, tmp_path / target,
          fragments=[f"{option} {tmp_path / target}: would replace {replaced}", "an input of this command; write it elsewhere"])
    assert {"run": folder_hashes(run), "features": folder_hashes(tmp_path / "features")} == before
    assert not (run / "eval.json").exists()  # refused before anything was evaluated


def test_eval_report_through_a_symlink_to_an_input_is_refused(run_on_cache, tmp_path):
    _, run = run_on_cache
    before = sha(run / "model.pt")
    (tmp_path / "results.json").symlink_to(run / "model.pt")
    fails("eval", run, "--json", tmp_path / "results.json",
          fragments=[f"(a link to {(run / 'model.pt').resolve()}): would replace model.pt of the run"])
    assert sha(run / "model.pt") == before and (tmp_path / "results.json").is_symlink()


def test_eval_two_reports_naming_one_file_are_refused(run_on_cache, tmp_path):
    _, run = run_on_cache
    (tmp_path / "x").write_text("keep me\n")
    fails("eval", run, "--report", tmp_path / "x", "--json", tmp_path / "x",
          fragments=[f"--report and --json both name {tmp_path / 'x'}; give each its own file"])
    fails("eval", run, "--plot", tmp_path / "p.png", "--report", tmp_path / "p_per_class.png",
          fragments=["--report and --plot's per-class figure both name"])
    fails("eval", run, "--json", run / "eval.json",
          fragments=[f"the eval file of {run} and --json both name {run / 'eval.json'}"])
    assert (tmp_path / "x").read_text() == "keep me\n" and not (run / "eval.json").exists()


def test_eval_report_inside_a_run_may_be_new_but_never_replace(run_on_cache, tmp_path):
    _, run = run_on_cache
    ok("eval", run, "--report", run / "report.md")  # a new file beside the run's own files replaces nothing
    fails("eval", run, "--report", run / "report.md", fragments=["would replace report.md of the run"])


def test_read_only_outputs_are_refused_and_kept(run_on_cache, tmp_path):
    features, run = run_on_cache
    (tmp_path / "frozen.json").write_text("keep me\n")
    (tmp_path / "frozen.json").chmod(0o444)
    fails("eval", run, "--json", tmp_path / "frozen.json", fragments=[f"--json {tmp_path / 'frozen.json'}: the file is read-only"])
    assert (tmp_path / "frozen.json").read_text() == "keep me\n"
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    (shelf / "old.md").write_text("keep me\n")
    shelf.chmod(0o555)
    try:
        fails("eval", run, "--report", shelf / "r.md", fragments=[f"the folder {shelf} is read-only"])
        fails("train-head", "--features", features, "--out", shelf, *LINEAR, fragments=[f"--out {shelf}: the folder is read-only"])
    finally:
        shelf.chmod(0o755)
    assert sorted(p.name for p in shelf.iterdir()) == ["old.md"] and not (run / "eval.json").exists()


@pytest.mark.slow
def test_eval_of_a_finetuned_run_keeps_the_dataset_files(synthetic_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    run = tmp_path / "ft"
    ok("finetune", "--dataset", "synthetic", "--data-root", data, "--model", TINY_MODEL, "--pretrained", "none", "--tune", "frozen",
       "--head", "linear", "--epochs", "1", "--batch-size", "64", "--workers", "0", "--device", "cpu", "--out", run)
    before = folder_hashes(data)
    image = next(p for p in sorted(data.rglob("*.png")))
    fails("eval", run, "--plot", data / "train.txt", fragments=[f"--plot {data / 'train.txt'}: would replace the train split file"])
    fails("eval", run, "--report", image, fragments=[f"would replace {image.relative_to(data).as_posix()} of the data root {data}"])
    assert folder_hashes(data) == before and not (run / "eval.json").exists()
    ok("eval", run, "--split", "val", "--report", data / "report.md")  # reports may sit beside the images
    fails("finetune", "--dataset", "synthetic", "--data-root", data, "--model", TINY_MODEL, "--pretrained", "none",
          "--out", data / "train", fragments=[f"--out {data / 'train'}: holds images of the data root"])


# ============================================================================ output folders


def test_train_head_out_inside_its_cache_or_on_another_kind_is_refused(run_on_cache, tmp_path):
    features, run = run_on_cache
    before = folder_hashes(features)
    fails("train-head", "--features", features, "--out", features, *LINEAR,
          fragments=[f"--out {features}: lies in the feature cache {features}, an input of this command"])
    fails("train-head", "--features", features, "--out", features / "runs" / "x", *LINEAR, fragments=["lies in the feature cache"])
    other = gaussian_cache(tmp_path / "other")
    fails("train-head", "--features", features, "--out", other, *LINEAR,
          fragments=[f"--out {other}: holds a feature cache, not a head run; choose another --out"])
    fails("train-head", "--from", run, "--two-stage", "crt", "--epochs", "1", "--out", run / "second",
          fragments=[f"--out {run / 'second'}: lies in the run {run}"])
    assert folder_hashes(features) == before and not (features / "runs").exists() and not (run / "second").exists()


def test_sweep_and_runs_do_not_mix(run_on_cache, synthetic_root, tmp_path):
    features, run = run_on_cache
    before = folder_hashes(run)
    fails("sweep", "--features", features, "--epochs", "1", "--device", "cpu", "--grid", "lr=0.01,0.1", "--out", run,
          fragments=[f"--out {run}: holds a finished head run, not a sweep; choose another --out"])
    assert folder_hashes(run) == before
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text("{}\n")
    fails("train-head", "--features", features, "--out", sweep, *LINEAR, fragments=[f"--out {sweep}: holds a sweep, not a head run"])
    fails("extract", "--dataset", "synthetic", "--data-root", synthetic_root, "--out", run, fragments=[f"--out {run}: holds a finished head run, not a feature cache"])
    assert folder_hashes(run) == before and (sweep / "sweep.json").read_text() == "{}\n"


@pytest.mark.slow
def test_extract_rerun_with_another_block_size_and_into_the_data_root(synthetic_root, tmp_path):
    args = ["extract", "--dataset", "synthetic", "--data-root", synthetic_root, "--model", TINY_MODEL, "--pretrained", "none",
            "--device", "cpu", "--workers", "0", "--splits", "train", "--no-tokens"]
    cache = tmp_path / "cache"
    ok(*args, "--block-size", "16", "--out", cache)
    before = folder_hashes(cache)
    fails(*args, "--block-size", "8", "--out", cache,
          fragments=[f"--block-size 8: the cache {cache} was written with --block-size 16 (extract.json); pass --block-size 16"])
    assert folder_hashes(cache) == before
    ok(*args, "--block-size", "16", "--out", cache)  # the same options: up to date
    data = list(synthetic_root.iterdir())
    fails(*args, "--out", synthetic_root, fragments=[f"--out {synthetic_root}: is the data root {synthetic_root}"])
    assert list(synthetic_root.iterdir()) == data


# ============================================================================ one writer per folder


def test_lock_is_released_on_error_and_on_ctrl_c_and_ranks_other_than_0_do_not_take_it(tmp_path):
    folder = tmp_path / "out"
    for stop in (LtclipError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(stop)):
            with folder_lock(folder, "train-head"):
                assert (folder / LOCK_FILE).is_file()
                raise stop
        assert not folder.exists()  # made by the lock, left empty: removed with it
    with folder_lock(folder, "train-head"):
        with pytest.raises(LtclipError, match=f"--out {folder} is being written by pid {os.getpid()} \\(ltclip train-head, started "):
            with folder_lock(folder, "sweep"):
                pass
        with folder_lock(folder, "train-head", DistContext(rank=1, world_size=1)):  # a torchrun rank > 0
            pass
        assert (folder / LOCK_FILE).is_file()
    assert not folder.exists()


def test_a_refused_train_head_leaves_no_folder_and_no_lock(run_on_cache, tmp_path):
    features, run = run_on_cache
    (tmp_path / "empty").mkdir()  # a folder, but no cache: refused by the stage itself
    fails("train-head", "--features", tmp_path / "empty", "--out", tmp_path / "new", *LINEAR, fragments=["no train.h5"])
    assert not (tmp_path / "new").exists()
    fails("train-head", "--features", features, "--out", run, *LINEAR, fragments=["already holds a run"])
    assert not (run / LOCK_FILE).exists()


def ltclip(*args) -> list[str]:
    return [sys.executable, "-m", "ltclip", *map(str, args)]


def race(first: list[str], second: list[str], timeout: float = 300) -> tuple[subprocess.Popen, ...]:
    """Start two real processes 0.3 s apart; wait for both."""
    procs = [subprocess.Popen(first, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    time.sleep(0.3)
    procs.append(subprocess.Popen(second, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        proc.out, proc.err = proc.communicate(timeout=timeout)
    return tuple(procs)


def winner_and_loser(procs, out: Path):
    assert sorted(p.returncode for p in procs) == [0, 2], [(p.returncode, p.err[-2000:]) for p in procs]
    winner, loser = sorted(procs, key=lambda p: p.returncode)
    one_error_line(loser.err, loser.returncode, f"--out {out} is being written by pid {winner.pid} (ltclip ",
                   "wait for it or choose another --out")
    return winner, loser


@pytest.mark.slow
def test_two_train_heads_into_one_folder_one_writes_the_other_is_refused(tmp_path):
    features = gaussian_cache(tmp_path / "features", {"train": [1500, 600, 250], "val": [40] * 3}, dim=32)
    out = tmp_path / "run"
    args = ["train-head", "--features", features, "--out", out, "--epochs", "15", "--batch-size", "32", "--device", "cpu"]
    procs = race(ltclip(*args, "--head", "linear"), ltclip(*args, "--head", "cosine"))
    winner, _ = winner_and_loser(procs, out)
    head = "linear" if winner is procs[0] else "cosine"
    config, info = json.loads((out / "config.json").read_text()), json.loads((out / "run.json").read_text())
    payload = torch.load(out / "model.pt", weights_only=True)
    assert config["method"]["head"] == info["method"]["head"] == payload["head"]["name"] == head  # one run's files
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log]
    assert steps == sorted(set(steps)) and log[-1]["epoch"] == info["epochs"] - 1  # one run's log, not two interleaved
    assert not (out / LOCK_FILE).exists()


@pytest.mark.slow
def test_two_sweeps_into_one_folder_one_writes_the_other_is_refused(tmp_path):
    features = gaussian_cache(tmp_path / "features", {"train": [2000, 800, 300], "val": [40] * 3}, dim=32)
    out = tmp_path / "sweep"
    args = ["sweep", "--features", features, "--out", out, "--head", "linear", "--epochs", "10", "--batch-size", "32", "--device", "cpu"]
    procs = race(ltclip(*args, "--grid", "lr=0.01,0.02"), ltclip(*args, "--grid", "lr=0.3,0.5"))
    winner, _ = winner_and_loser(procs, out)
    lrs = [0.01, 0.02] if winner is procs[0] else [0.3, 0.5]
    record = json.loads((out / "sweep.json").read_text())
    assert [p["options"]["lr"] for p in record["points"]] == lrs and all(p["state"] == "done" for p in record["points"])
    assert sorted(p.name for p in (out / "points").iterdir()) == sorted(p["name"] for p in record["points"])
    assert not (out / LOCK_FILE).exists() and not (out / "best" / LOCK_FILE).exists()


HOLD = """
import sys, time
from ltclip.core.lock import folder_lock
with folder_lock(sys.argv[1], "train-head"):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.mark.slow
def test_a_lock_left_by_a_sigkilled_process_is_taken_over(run_on_cache, tmp_path):
    features, _ = run_on_cache
    out = tmp_path / "run2"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        fails("train-head", "--features", features, "--out", out, *LINEAR,
              fragments=[f"--out {out} is being written by pid {holder.pid} (ltclip train-head, started "])
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid  # left behind by the killed holder
    ok("train-head", "--features", features, "--out", out, *LINEAR)
    assert (out / "run.json").is_file() and not (out / LOCK_FILE).exists()
