"""The examples run as written: default output folders, the workspace file, eval of runs/ (explicit options win)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from conftest import TINY_MODEL
from ltclip.cli import app
from ltclip.artifacts.workspace import default_features_dir, default_run_dir, slug

runner = CliRunner()


def ok(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_default_names():
    assert default_features_dir("inat18", "ViT-B-16", "openai") == Path("features/inat18-ViT-B-16-openai")
    assert default_features_dir("places_lt", "local-dir:/models/my clip", "none") == Path("features/places_lt-my-clip-none")
    assert slug("a/b:c d") == "a-b-c-d"


def test_run_folders_are_never_overwritten_and_resume_finds_the_newest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_run_dir("linear-ce-instance", resume=False) == Path("runs/linear-ce-instance")
    for name in ("linear-ce-instance", "linear-ce-instance-2"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "run.json").write_text("{}")
    assert default_run_dir("linear-ce-instance", resume=False) == Path("runs/linear-ce-instance-3")
    (tmp_path / "runs" / "linear-ce-instance-3").mkdir()  # an interrupted run: no run.json
    assert default_run_dir("linear-ce-instance", resume=False) == Path("runs/linear-ce-instance-3")
    assert default_run_dir("linear-ce-instance", resume=True) == Path("runs/linear-ce-instance-3")


def test_extract_train_head_and_eval_run_without_out_or_features(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = ok("extract", "--dataset", "synthetic", "--data-root", synthetic_root, "--model", TINY_MODEL, "--pretrained", "none",
                "--device", "cpu", "--workers", "0")
    cache = Path(f"features/synthetic-{TINY_MODEL}-none")
    assert f"--out: {cache} (default)" in result.output and (cache / "train.h5").is_file()
    assert f'features = "{cache}"' in Path("ltclip.toml").read_text()
    result = ok("train-head", "--head", "linear", "--loss", "balanced_softmax", "--epochs", "1", "--device", "cpu")
    assert f"--features: {cache}, named by ./ltclip.toml" in result.output.splitlines()[0]
    assert "--out: runs/linear-balanced_softmax-instance (default)" in result.output
    result = ok("train-head", "--head", "linear", "--loss", "balanced_softmax", "--epochs", "1", "--device", "cpu")
    assert "--out: runs/linear-balanced_softmax-instance-2 (default)" in result.output
    result = ok("train-head", "--from", "runs/linear-balanced_softmax-instance", "--two-stage", "crt", "--epochs", "1")
    assert "--out: runs/linear-balanced_softmax-instance-crt (default)" in result.output
    explicit = tmp_path / "mine"
    ok("train-head", "--features", cache, "--out", explicit, "--head", "linear", "--epochs", "1", "--device", "cpu")
    assert (explicit / "run.json").is_file()  # an explicit option wins
    result = ok("eval")
    assert "the 3 finished runs under runs/" in result.output
    assert sum(line.startswith("| linear") for line in result.output.splitlines()) == 3
    result = ok("eval", "--zero-shot")
    assert "zero-shot CLIP" in result.output and f"--features: {cache}, named by ./ltclip.toml" in result.output


def test_without_a_workspace_file_train_head_says_what_it_needs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train-head", "--head", "linear"])
    assert result.exit_code == 2 and "--features DIR is required (no ./ltclip.toml" in result.output
    result = runner.invoke(app, ["eval"])
    assert result.exit_code == 2 and "no finished run under runs/" in result.output
    (tmp_path / "ltclip.toml").write_text("features = [\n")
    result = runner.invoke(app, ["train-head", "--head", "linear"])
    assert result.exit_code == 2 and "ltclip.toml: cannot parse" in result.output
