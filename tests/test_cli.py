"""The command line itself: start-up without torch, datasets commands, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import shared_files, write_places_lt_standin
from ltclip import __version__
from ltclip.cli import app
from ltclip.recipes.catalog import KINDS

runner = CliRunner()


def test_help_version_and_argument_errors_do_not_import_torch():
    code = (
        "import sys; from ltclip.cli import app; from typer.testing import CliRunner; r = CliRunner();"
        "outs = [r.invoke(app, a) for a in (['--help'], ['--version'], ['extract', '--help'], ['train-head', '--bogus'])];"
        "print([o.exit_code for o in outs]); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[0, 0, 0, 2]" and out[1] == "False"


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"ltclip {__version__}"


def test_datasets_list_json():
    result = runner.invoke(app, ["datasets", "list", "--json"])
    assert result.exit_code == 0
    names = {d["name"]: d for d in json.loads(result.output)}
    assert names["places_lt"]["classes"] == 365 and names["inat18"]["sizes"]["train"] == 437_513


@pytest.mark.parametrize(
    "manifests", [pytest.param(None, id="standin")] + [pytest.param(p.parent, id="full") for p in shared_files("Places_LT_train.txt")]
)
def test_datasets_info_on_real_places_lt(manifests, tmp_path):
    """The real Places-LT profile: the real split files, or a stand-in train list with the committed counts."""
    manifests = manifests or write_places_lt_standin(tmp_path / "manifests").parent
    args = ["datasets", "info", "places_lt", "--manifest-dir", str(manifests), "--data-root", str(tmp_path)]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert (info["many"], info["medium"], info["few"]) == (131, 163, 71)
    assert (info["max_per_class"], info["min_per_class"]) == (4980, 5)
    shifted = json.loads(runner.invoke(app, [*args, "--json", "--many", "200", "--few", "10"]).output)
    assert shifted["many"] < 131 and shifted["few"] < 71 and shifted["many"] + shifted["medium"] + shifted["few"] == 365
    table = runner.invoke(app, args)
    assert table.exit_code == 0 and "4,980 / 5" in table.output


def test_make_synthetic_then_check(tmp_path):
    out = tmp_path / "syn"
    result = runner.invoke(app, ["datasets", "make-synthetic", str(out), "--classes", "4", "--max-per-class", "10", "--imbalance", "5",
                                 "--val-per-class", "2", "--test-per-class", "2", "--size", "16", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["train_counts"] == [10, 6, 3, 2]
    result = runner.invoke(app, ["datasets", "check", "synthetic", "--data-root", str(out)])
    assert result.exit_code == 0 and "all 37 images" in result.output
    victim = out / (out / "test.txt").read_text().split()[0]
    victim.write_bytes(b"\x89PNG broken")
    result = runner.invoke(app, ["datasets", "check", "synthetic", "--data-root", str(out)])
    assert result.exit_code == 1 and victim.name in result.output and "1 of 37 images" in result.output


@pytest.mark.parametrize(
    "lines, message",
    [("a.png 0\nb.png 7\n", "label 7 >= number of classes"), ("a.png 0\nb.png zero\n", "not an integer")],
)
def test_bad_manifest_is_a_one_line_error_with_exit_2(tmp_path, lines, message):
    (tmp_path / "train.txt").write_text(lines)
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    result = runner.invoke(app, ["datasets", "info", "custom", "--data-root", str(tmp_path), "--train-list", "train.txt",
                                 "--classnames", str(tmp_path / "names.txt")])
    assert result.exit_code == 2
    assert message in result.output and "train.txt:2" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_list_reads_the_registries(monkeypatch):
    from ltclip.methods.losses import list_losses

    monkeypatch.delenv("COLUMNS", raising=False)
    result = runner.invoke(app, ["list", "losses"])
    assert result.exit_code == 0 and max(map(len, result.output.splitlines())) <= 80  # not a terminal: 80 columns
    names = [line.split()[0] for line in result.output.strip().splitlines()[2:] if not line.startswith(" ")]  # below the header
    assert names == list_losses()
    assert "gamma=2.0" in result.output
    result = runner.invoke(app, ["list", "heads"])
    assert "decoder" in result.output and "depth=3" in result.output


@pytest.mark.parametrize("kind", [*KINDS, "recipes"])
def test_list_is_a_table_that_fits_80_columns(kind, monkeypatch):
    """Every `ltclip list` kind: a header row, lines of at most 80 characters, docstring markup as plain text."""
    monkeypatch.setenv("COLUMNS", "80")
    result = runner.invoke(app, ["list", kind])
    assert result.exit_code == 0, result.output
    lines = result.output.rstrip("\n").splitlines()
    assert lines[0].split()[:3] == ["name", "what", "it"] and lines[0].split()[-1] == "options" and set(lines[1]) == {"─"}
    assert max(map(len, lines)) <= 80 and len(lines) > 3
    assert "``" not in result.output and ":func:" not in result.output and "\x1b[" not in result.output


def test_eval_of_a_missing_folder_answers_before_torch_is_imported(tmp_path):
    """A mistyped run folder is one line at once: eval's config is checked before any stage (and torch) loads."""
    import subprocess
    import sys

    code = ("import sys\nfrom ltclip.cli import app\ntry:\n    app(['eval', 'runs/typo'])\nexcept SystemExit as e:\n"
            "    print(e.code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.stdout.split() == ["2", "False"], done
    assert done.stderr.strip() == "error: runs/typo: no such folder; name run folders from `ltclip train-head` or " \
                                  "`ltclip finetune` (`ls runs/`)"
