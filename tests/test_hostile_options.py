"""Hostile option values, config files and signals, command by command.

Every option's valid range is declared once, on its config field (``option(..., minimum=1)``), and
checked with the other options before any model or data is loaded: a bad value is ONE line
``error: --flag VALUE: must be ...`` with exit code 2, no traceback and nothing created in --out.
The table in docs/reliability.md lists each case with the test that holds it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TINY_MODEL, write_token_cache
from ltclip.cli import app
from ltclip.config import (DataConfig, EvalConfig, ExportConfig, ExtractConfig, FinetuneConfig, OptimConfig, PredictConfig,
                           ReproduceConfig, SecondStageConfig, TrainHeadConfig, TuningConfig, from_flat)
from ltclip.config.fields import numeric_fields
from ltclip.core.errors import LtclipError
from ltclip.stages.toy_clip import ToyClipSettings

runner = CliRunner()


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Commands read and write ./ltclip.toml and default folders in the working directory: keep them in tmp."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_token_cache(tmp_path_factory.mktemp("hostile") / "features")


def refused(args: list, *fragments: str) -> str:
    """``args`` (with ``{out}`` and ``{cache}`` filled in by the caller) end in one ``error:`` line, exit 2."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "Usage:" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.output.rstrip().endswith(errors[0]), result.output
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


HEAD = ["train-head", "--head", "linear", "--device", "cpu"]
CASES = [  # (command and options, what the one error line says)
    (["--weight-decay", "nan"], "--weight-decay nan: must be a finite number >= 0"),
    (["--lr", "inf"], "--lr inf: must be a finite number > 0"),
    (["--lr", "0"], "--lr 0: must be > 0"),
    (["--momentum", "5"], "--momentum 5: must be in [0, 1)"),
    (["--momentum", "-0.1"], "--momentum -0.1: must be in [0, 1)"),
    (["--select", "bogus"], "--select 'bogus': choose one of top1, balanced_accuracy"),
    (["--epochs", "3", "--steps", "5"], "--epochs 3 and --steps 5: two ways to say one thing; give one of them"),
    (["--warmup", "1", "--warmup-steps", "2"], "--warmup 1 and --warmup-steps 2: two ways to say one thing; give one of them"),
    (["--steps", "5", "--warmup-steps", "10"], "--warmup-steps 10: longer than the run's --steps 5; give at most 5"),
    (["--epochs", "2", "--warmup", "3"], "--warmup 3: longer than the run's --epochs 2; give at most 2"),
    (["--batch-size", "0"], "--batch-size 0: must be an integer >= 1"),
    (["--epochs", "0"], "--epochs 0: must be an integer >= 1"),
    (["--steps", "-4"], "--steps -4: must be an integer >= 1"),
    (["--accum", "0"], "--accum 0: must be an integer >= 1"),
    (["--grad-clip", "-1"], "--grad-clip -1: must be >= 0"),
    (["--eval-every", "-1"], "--eval-every -1: must be an integer >= 0"),
    (["--seed", "-1"], "--seed -1: must be an integer >= 0"),
    (["--read-blocks", "-2"], "--read-blocks -2: must be an integer >= 0"),
    (["--shuffle-pool", "0"], "--shuffle-pool 0: must be an integer >= 1"),
    (["--min-steps", "-1"], "--min-steps -1: must be an integer >= 0"),
    (["--val-split", "holdout"], "no holdout.h5; run `ltclip extract --splits holdout` first"),  # was: no validation, silently
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_a_bad_train_head_option_is_one_line_before_anything_is_written(cache, tmp_path, args, message):
    out = tmp_path / "run"
    refused([*HEAD, "--features", cache, "--out", out, *args], message)
    assert not out.exists()


OTHER_CASES = [
    (["eval", "--zero-shot", "--batch-size", "0"], "--batch-size 0: must be an integer >= 1"),
    (["eval", "--knn", "-1"], "--knn -1: must be an integer >= 0"),
    (["eval", "--zero-shot", "--retrieval-mix", "1.5"], "--retrieval-mix 1.5: must be in [0, 1]"),
    (["eval", "--zero-shot", "--retrieval-k", "0"], "--retrieval-k 0: must be an integer >= 1"),
    (["eval", "--knn", "3", "--temperature", "0"], "--temperature 0: must be > 0"),
    (["eval", "--knn", "3", "--temperature", "nan"], "--temperature nan: must be a finite number > 0"),
    (["eval", "--zero-shot", "--workers", "-1"], "--workers -1: must be an integer >= 0"),
    (["eval", "--zero-shot", "--eval-resize", "-1"], "--eval-resize -1: must be an integer >= 0"),
    (["extract", "--batch-size", "0"], "--batch-size 0: must be an integer >= 1"),
    (["extract", "--block-size", "0"], "--block-size 0: must be an integer >= 1"),
    (["extract", "--workers", "-1"], "--workers -1: must be an integer >= 0"),
    (["extract", "--token-pool", "0"], "--token-pool 0: must be an integer >= 1"),
    (["extract", "--imbalance", "0.5"], "--imbalance 0.5: must be >= 1"),
    (["finetune", "--momentum", "1"], "--momentum 1: must be in [0, 1)"),
    (["finetune", "--backbone-lr", "0"], "--backbone-lr 0: must be > 0"),
    (["finetune", "--eval-resize", "-3"], "--eval-resize -3: must be an integer >= 0"),
    (["finetune", "--select", "bogus"], "--select 'bogus': choose one of"),
]


@pytest.mark.parametrize("args, message", OTHER_CASES, ids=[" ".join(a) for a, _ in OTHER_CASES])
def test_a_bad_option_of_eval_extract_or_finetune_is_one_line(cache, tmp_path, args, message):
    out = tmp_path / "out"
    where = ["--features", cache, "--report", out] if args[0] == "eval" else ["--out", out]
    refused([*args, *where], message)
    assert not out.exists()


def test_check_warmup_needs_the_rows(cache, tmp_path):
    """A warm-up in steps against a length in epochs is checked once the cache's rows are known, before the first step."""
    from ltclip.engine.plan import check_warmup

    out = tmp_path / "run"
    refused([*HEAD, "--features", cache, "--out", out, "--epochs", "1", "--warmup-steps", "1000"],
            "--warmup-steps 1000: longer than the run's 1 optimizer steps (1 epoch(s) of 1); give at most 1")
    assert not out.exists()  # refused before the run folder is made
    check_warmup(OptimConfig(epochs=2, warmup_steps=8), per_epoch=4)  # exactly the run: fine
    check_warmup(OptimConfig(steps=1, warmup=0.5), per_epoch=4)  # a warm-up in epochs may outlast --steps


def test_a_bad_grid_value_of_a_sweep_is_refused_before_any_point_trains(cache, tmp_path):
    out = tmp_path / "sweep"
    refused(["sweep", "--features", cache, "--head", "linear", "--device", "cpu", "--grid", "lr=0.1,0", "--out", out],
            "--lr 0: must be > 0")
    assert not out.exists()


CONFIG_FILES = [  # (name, bytes, what the one error line says)
    ("tab.yaml", b"lr: 0.1\n\tmomentum: 0.5\n", "--config tab.yaml:2:1: cannot parse (found character '\\t' that cannot start any token)"),
    ("bad.toml", b"lr = 0.1\nmomentum = \n", "--config bad.toml:2:12: cannot parse (Invalid value)"),
    ("utf16.yaml", "momentum: 0.5\n".encode("utf-16"), "--config utf16.yaml: not UTF-8 text (byte 0: invalid start byte); save it as UTF-8"),
    ("keys.yaml", b"epohcs: 3\n", "--config keys.yaml: unknown key(s) epohcs; valid:"),
    ("range.yaml", b"momentum: 5\n", "--momentum 5: must be in [0, 1)"),
]


@pytest.mark.parametrize("name, text, message", CONFIG_FILES, ids=[c[0] for c in CONFIG_FILES])
def test_a_bad_config_file_is_one_line_with_its_position(cache, tmp_path, name, text, message):
    (tmp_path / name).write_bytes(text)
    out = tmp_path / "run"
    refused([*HEAD, "--config", name, "--features", cache, "--out", out], message)
    assert not out.exists()


def test_a_utf8_config_file_with_a_byte_order_mark_is_read(tmp_path):
    from ltclip.config import load_config_file

    (tmp_path / "bom.yaml").write_bytes("momentum: 0.5\n".encode("utf-8-sig"))
    assert load_config_file(tmp_path / "bom.yaml") == {"momentum": 0.5}


@pytest.mark.parametrize("args", [HEAD, ["eval", "--zero-shot"]], ids=["train-head", "eval"])
def test_a_workspace_file_naming_a_missing_cache_says_so_and_how_to_fix(tmp_path, args):
    (tmp_path / "ltclip.toml").write_text('features = "nowhere"\n')
    line = refused([*args, "--out", tmp_path / "run"] if args is HEAD else args,
                   "./ltclip.toml names the feature cache nowhere, which does not exist; pass --features DIR, "
                   "or rerun `ltclip extract`")
    assert "--features nowhere" not in line and not (tmp_path / "run").exists()


# ============================================================================ the contract: every numeric field

CONFIG_CLASSES = (DataConfig, OptimConfig, TuningConfig, ExtractConfig, TrainHeadConfig, SecondStageConfig, FinetuneConfig,
                  EvalConfig, ReproduceConfig, PredictConfig, ExportConfig, ToyClipSettings)
NUMERIC = [(cls, name, kind, spec) for cls in CONFIG_CLASSES for name, (kind, spec) in numeric_fields(cls).items()]


def build(cls, **values):
    """A config of ``cls`` through :func:`from_flat` (as every command, --config file and saved config is built)."""
    required = {f: "x" for f in ("out", "features", "from_run", "dataset", "data_root") if f not in values}
    names = {f.name for f in dataclasses.fields(cls)}
    flat = {k: v for k, v in required.items() if k in names}
    return from_flat(cls, {**flat, **values}, owner=cls.__name__)


@pytest.mark.parametrize("cls, name, kind, spec", NUMERIC, ids=[f"{c.__name__}.{n}" for c, n, _, _ in NUMERIC])
def test_every_numeric_option_refuses_a_non_finite_value_naming_its_flag(cls, name, kind, spec):
    """A field added without a range still gets this check: a float field refuses nan and inf, an int one inf."""
    flag = spec.flag or "--" + name.replace("_", "-")
    build(cls)  # the defaults pass
    for value in ([math.nan, math.inf, -math.inf] if kind is float else [math.inf, 2.5]):
        with pytest.raises(LtclipError) as err:
            build(cls, **{name: value})
        message = str(err.value)
        assert message.startswith(f"{flag} ") and ("finite number" in message or "integer" in message), message


def test_every_numeric_training_option_states_its_range():
    """The ranges are declared on the fields: each numeric option of the stage configs has one."""
    missing = [f"{c.__name__}.{n}" for c, n, _, spec in NUMERIC if spec.range_text() is None]
    assert not missing


# ============================================================================ signals and how to continue


@pytest.mark.slow
def test_sigterm_during_train_head_says_how_to_continue_and_keeps_the_checkpoint(tmp_path):
    from test_bad_inputs import STAGE1, finish, ok, start, wait_for_change
    from conftest import newest_mtime

    features = write_token_cache(tmp_path / "features")
    out = tmp_path / "run"
    proc = start(["train-head", "--features", features, "--out", out, *STAGE1])
    wait_for_change(proc, lambda: newest_mtime(out / "last.pt"))
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = finish(proc)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and stderr.count("terminated") == 1, stderr
    assert stderr.rstrip().splitlines()[-1] == "terminated; rerun the same command with --resume to continue from the last checkpoint"
    assert (out / "last.pt").is_file() and not (out / "run.json").exists()
    ok("train-head", "--features", features, "--out", out, *STAGE1, "--resume")
    assert (out / "run.json").is_file()


@pytest.mark.slow
def test_sigterm_to_extract_and_its_dataloader_workers_ends_in_one_line(synthetic_root, tmp_path):
    from test_bad_inputs import finish, run_process, start, wait_for_change
    from conftest import newest_mtime

    args = ["extract", "--dataset", "synthetic", "--data-root", synthetic_root, "--model", TINY_MODEL, "--pretrained", "none",
            "--device", "cpu", "--workers", "2", "--batch-size", "2", "--block-size", "2", "--splits", "train",
            "--train-views", "10", "--out", tmp_path / "cache"]
    proc = start(args, cwd=tmp_path)
    wait_for_change(proc, lambda: newest_mtime(tmp_path / "cache" / "train.h5"))
    os.killpg(proc.pid, signal.SIGTERM)  # the main process and its workers, as a scheduler stops a job
    _, stderr = finish(proc)
    # 143, or (rarely, as with Ctrl-C) killed by a repeated signal after the message while the
    # interpreter shuts down: a shell reports both as 143
    assert proc.returncode in (128 + signal.SIGTERM, -signal.SIGTERM), stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.rstrip().splitlines()[-1] == "terminated; rerun the same command to resume (what was finished is kept)"
    assert run_process(args, cwd=tmp_path).returncode == 0  # the same command finishes the cache


def test_the_sigterm_handler_is_restored_after_a_command(cache, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    refused([*HEAD, "--features", cache, "--out", tmp_path / "run", "--lr", "0"])
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_sweep_stopped_before_its_first_checkpoint_continues_with_resume(cache, tmp_path, monkeypatch):
    import ltclip.sweep.run as sweep_run

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "sweep"
    args = ["sweep", "--features", str(cache), "--head", "linear", "--device", "cpu", "--epochs", "1", "--batch-size", "64",
            "--grid", "lr=0.1,0.2", "--out", str(out)]
    monkeypatch.setattr(sweep_run, "train_group", stop)
    monkeypatch.setattr(sweep_run, "_train_alone", stop)
    result = runner.invoke(app, args)
    assert result.exit_code == 130, result.output
    assert result.output.rstrip().splitlines()[-1] == ("interrupted; rerun the same command with --resume to continue the sweep "
                                                       "(finished points are kept)")
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    again = runner.invoke(app, [*args, "--resume"])  # what the message says works
    assert again.exit_code == 0, again.output
    assert (out / "best" / "run.json").is_file()


@pytest.mark.slow
def test_finetune_refuses_a_val_split_the_dataset_lacks_and_a_warmup_beyond_the_run(synthetic_root, tmp_path):
    data = ["finetune", "--dataset", "synthetic", "--data-root", synthetic_root, "--model", TINY_MODEL, "--pretrained", "none",
            "--workers", "0", "--device", "cpu"]
    refused([*data, "--val-split", "holdout", "--out", tmp_path / "a"], "--val-split holdout: synthetic has no such split; choose one of")
    refused([*data, "--epochs", "1", "--warmup-steps", "1000", "--out", tmp_path / "b"], "--warmup-steps 1000: longer than the run's")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
