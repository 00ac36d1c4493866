"""Row labels of `ltclip eval`: what each run is (stage, tuning, recipe, sweep point, second stage), never
one label twice in a report; and `eval` of a sweep folder through its best run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_cache
from ltclip.cli import app
from ltclip.data.gaussian import gaussian_lt
from ltclip.artifacts.workspace import sweep_point
from ltclip.evaluation.report import RunFacts, run_label, run_labels

runner = CliRunner()
METHOD = {"head": "linear", "head_opts": {}, "loss": "balanced_softmax", "loss_opts": {}, "sampler": "instance",
          "two_stage": None, "posthoc_la": None}
CONFIG = {"out": "runs/x", "features": "features/f", "method": {"head": "linear", "head_opts": {}, "loss": "balanced_softmax"},
          "optim": {"lr": 0.1, "epochs": 10}}


def head_run(**method) -> RunFacts:
    return RunFacts({"kind": "head", "method": {**METHOD, **method}}, json.loads(json.dumps(CONFIG)))


def finetune_run(tune: str) -> RunFacts:
    return RunFacts({"kind": "finetune", "method": {**METHOD, "tune": tune, "tune_opts": {}}},
                    {**CONFIG, "tuning": {"tune": tune, "tune_opts": {}}})


def second_stage_run(method: str, tau=None) -> RunFacts:
    return RunFacts({"kind": "second_stage", "method": {**METHOD, "two_stage": method, "two_stage_opts": {}, "posthoc_la": tau}},
                    {"out": "runs/y", "from_run": "runs/x", "two_stage": method})


def distinct(labels: dict[str, str]) -> list[str]:
    values = list(labels.values())
    assert len(set(values)) == len(values), values
    return values


def test_the_stage_and_tuning_mode_name_a_finetuned_run():
    labels = distinct(run_labels({"runs/a": head_run(), "runs/b": finetune_run("lora"), "runs/c": finetune_run("bitfit")}))
    assert labels == ["linear · balanced_softmax · instance", "finetune lora · linear · balanced_softmax · instance",
                      "finetune bitfit · linear · balanced_softmax · instance"]


def test_second_stages_and_post_hoc_la_are_named():
    labels = distinct(run_labels({"runs/a": head_run(), "runs/b": second_stage_run("lws"), "runs/c": second_stage_run("crt"),
                                  "runs/d": second_stage_run("crt", tau=1.0)}))
    assert labels[1:] == ["linear · balanced_softmax · instance → lws", "linear · balanced_softmax · instance → crt",
                          "linear · balanced_softmax · instance → crt + LA τ=1"]


def test_a_recorded_recipe_is_named():
    run = head_run()
    labels = distinct(run_labels({"runs/a": run, "runs/b": run._replace(config={**run.config, "recipe": "imbalance-vlm"})}))
    assert labels[1] == "linear · balanced_softmax · instance (imbalance-vlm recipe)"
    lift = head_run(head="cosine", head_opts={"input": "pooled", "init_scale": 25.0})
    lift = lift._replace(config={**lift.config, "recipe": "lift"})
    assert run_label(lift) == "cosine · balanced_softmax · instance (lift recipe)"  # the recipe names its options


def test_only_options_off_their_defaults_are_named():
    """linear's normalize=True is its default: not shown; normalize=False is (and every option without defaults)."""
    from ltclip.stages.evaluate import _option_defaults

    run = head_run(head_opts={"normalize": True}, loss="ldam", loss_opts={"s": 1.0, "max_m": _option_defaults("loss", "ldam")["max_m"]})
    assert run_label(run, _option_defaults) == "linear · ldam(s=1.0) · instance"
    assert run_label(run) == "linear(normalize=True) · ldam(s=1.0, max_m=0.5) · instance"
    assert run_label(head_run(head_opts={"normalize": False}), _option_defaults) == "linear(normalize=False) · balanced_softmax · instance"


def test_runs_that_differ_in_one_option_are_told_apart_by_it():
    slow, fast = head_run(), head_run()
    fast.config["optim"]["lr"] = 0.5
    labels = distinct(run_labels({"runs/a": slow, "runs/b": fast, "runs/c": head_run(loss="ce")}))
    assert labels == ["linear · balanced_softmax · instance (lr=0.1)", "linear · balanced_softmax · instance (lr=0.5)",
                      "linear · ce · instance"]


def test_identical_runs_are_told_apart_by_their_folders():
    labels = distinct(run_labels({"runs/first": head_run(), "runs/second": head_run()}))
    assert labels == ["linear · balanced_softmax · instance (first)", "linear · balanced_softmax · instance (second)"]
    labels = distinct(run_labels({"a/run": head_run(), "b/run": head_run()}))  # one folder name: the paths
    assert labels == ["linear · balanced_softmax · instance (a/run)", "linear · balanced_softmax · instance (b/run)"]


def test_sweep_points_and_the_best_run_show_their_grid_values(tmp_path):
    sweep = tmp_path / "sweep"
    record = {"grid": [["lr", [0.1, 0.5]], ["epochs", [2]]], "best": {"point": "01-lr=0.5-epochs=2"},
              "points": [{"name": "00-lr=0.1-epochs=2", "options": {"lr": 0.1, "epochs": 2}},
                         {"name": "01-lr=0.5-epochs=2", "options": {"lr": 0.5, "epochs": 2}}]}
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps(record))
    folders = [sweep / "points" / p["name"] for p in record["points"]] + [sweep / "best"]
    assert [sweep_point(f) for f in folders] == [({"lr": 0.1, "epochs": 2}, False), ({"lr": 0.5, "epochs": 2}, False),
                                                 ({"lr": 0.5, "epochs": 2}, True)]
    assert sweep_point(tmp_path / "runs" / "best") is None and sweep_point(sweep / "points" / "gone") is None
    runs = {str(f): head_run()._replace(grid_values=sweep_point(f)[0], sweep_best=sweep_point(f)[1]) for f in folders}
    assert distinct(run_labels(runs)) == ["linear · balanced_softmax · instance [lr=0.1, epochs=2]",
                                          "linear · balanced_softmax · instance [lr=0.5, epochs=2]",
                                          "linear · balanced_softmax · instance [sweep best: lr=0.5, epochs=2]"]
    on_loss = {"loss": "balanced_softmax", "lr": 0.5}  # a grid value the label names already is not repeated
    assert run_label(head_run()._replace(grid_values=on_loss)) == "linear · balanced_softmax · instance [lr=0.5]"
    assert run_label(head_run()._replace(grid_values={"loss": "ce"})) == "linear · balanced_softmax · instance [sweep point]"
    assert run_label(head_run()._replace(grid_values={"loss": "ce"}, sweep_best=True)).endswith(" [sweep best]")


# ----------------------------------------------------------------------------- through the CLI


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """A small Gaussian cache in ``tmp_path/features``, the working folder."""
    monkeypatch.chdir(tmp_path)
    _, splits = gaussian_lt(0, [60, 30, 15, 8], 8, 2.0, {"val": 10, "test": 10})
    for split, (x, y) in splits.items():
        write_cache(tmp_path / "features", split, x, y, 4)
    return tmp_path


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


TRAIN = ("--features", "features", "--head", "linear", "--epochs", "2", "--batch-size", "32", "--device", "cpu")


def report_rows(path: Path) -> list[str]:
    return [r["name"] for r in json.loads(path.read_text())["results"]]


@pytest.mark.slow
def test_eval_of_two_train_head_runs_labels_each_row_once(workspace):
    invoke("train-head", *TRAIN, "--lr", "0.1", "--out", "runs/a")
    invoke("train-head", *TRAIN, "--lr", "0.1", "--out", "runs/b")
    invoke("train-head", *TRAIN, "--lr", "0.3", "--out", "runs/c")
    invoke("eval", "runs/a", "runs/b", "runs/c", "--device", "cpu", "--json", "report.json")
    assert report_rows(workspace / "report.json") == [
        "linear · ce · instance (lr=0.1, a)", "linear · ce · instance (lr=0.1, b)", "linear · ce · instance (lr=0.3)"]


@pytest.mark.slow
def test_eval_of_a_sweep_goes_through_its_best_run(workspace):
    invoke("train-head", *TRAIN, "--out", "runs/single")
    invoke("sweep", *TRAIN, "--grid", "lr=0.01,0.3", "--out", "runs/sweep")
    best = json.loads((workspace / "runs/sweep/sweep.json").read_text())["best"]
    result = runner.invoke(app, ["eval", "runs/sweep", "--device", "cpu", "--json", "sweep.json"])
    assert result.exit_code == 0, result.output
    told = [line for line in result.stderr.splitlines() if "runs/sweep/best" in line]
    assert len(told) == 1 and "sweep" in told[0]
    assert report_rows(workspace / "sweep.json") == [f"linear · ce · instance [sweep best: lr={best['options']['lr']}]"]
    assert (workspace / "runs/sweep/best/eval.json").is_file() and not (workspace / "runs/sweep/eval.json").exists()
    invoke("eval", "--device", "cpu", "--json", "all.json")  # no run named: the finished runs and sweeps
    assert [Path(r["run_dir"]).as_posix() for r in json.loads((workspace / "all.json").read_text())["results"]] == [
        "runs/single", "runs/sweep/best"]


def test_eval_of_an_unfinished_sweep_is_one_line(workspace):
    (workspace / "runs/sweep").mkdir(parents=True)
    (workspace / "runs/sweep/sweep.json").write_text("{}")
    result = runner.invoke(app, ["eval", "runs/sweep", "--device", "cpu"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "runs/sweep: a sweep without a best run yet" in result.output and len(result.output.strip().splitlines()) == 1
