"""``ltclip sweep``: batched heads equal the same points trained alone, the engine's parts, the
choice of the best point, grouping, failures, bad input and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import kill_at_random_moments, newest_mtime, write_cache
from ltclip.cli import app
from ltclip.config import OptimConfig
from ltclip.data.gaussian import gaussian_lt
from ltclip.engine import ParamGroups, fit
from ltclip.methods.losses import compute_loss
from ltclip.models.heads import HeadInputs, create_head
from ltclip.methods.second_stage.fit import TensorSource
from ltclip.sweep.batched import HeadStack, StackTask
from ltclip.sweep.grid import expand, plan_groups
from ltclip.sweep.report import choose_best

runner = CliRunner()
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
ENV.pop("WORLD_SIZE", None)
COUNTS = [110, 45, 25, 15, 8]  # 203 train rows: batch 64 leaves an 11-row last step
BASE = ["--batch-size", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep") / "features"
    _, splits = gaussian_lt(0, COUNTS, 12, 2.0, {"val": 20, "test": 20})
    for split, (x, y) in splits.items():
        write_cache(root, split, x, y, len(COUNTS))
    return root


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def weights(run: Path) -> dict:
    return torch.load(run / "model.pt", weights_only=True)["head"]["state_dict"]


def run_info(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def sweep_record(out: Path) -> dict:
    return json.loads((out / "sweep.json").read_text())


@pytest.mark.slow  # about 1.6-2.2 s on 2 cores
@pytest.mark.parametrize("optimizer, losses", [("adamw", "ce,balanced_softmax"), ("sgd", "logit_adjusted")])
def test_batched_points_equal_the_same_points_trained_alone(features, tmp_path, optimizer, losses):
    out = tmp_path / "sweep"
    extra = ["--optimizer", optimizer, "--weight-decay", "5e-3"] + (["--momentum", "0.8"] if optimizer == "sgd" else [])
    invoke("sweep", "--features", features, *BASE, *extra, "--warmup", "0.5", "--grid", "lr=0.01,0.2", "--grid", "epochs=2,5",
           "--grid", "head=linear,cosine", "--grid", f"loss={losses}", "--out", out)
    record = sweep_record(out)
    assert [g["batched"] for g in record["groups"].values()] == [True]  # all points in one pass
    for point in record["points"]:
        o = point["options"]
        alone = tmp_path / f"alone-{point['name']}"
        invoke("train-head", "--features", features, *BASE, *extra, "--warmup", "0.5", "--lr", o["lr"], "--epochs", o["epochs"],
               "--head", o["head"], "--loss", o["loss"], "--out", alone)
        run = out / "points" / point["name"]
        a, b = weights(alone), weights(run)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=f"{point['name']} {key}")
        best_alone, best_batched = run_info(alone)["best"], run_info(run)["best"]
        assert (best_batched["epoch"], best_batched["step"]) == (best_alone["epoch"], best_alone["step"])
        assert best_batched == pytest.approx(best_alone, rel=1e-5)
        assert point["val"] == best_batched["val_balanced_accuracy"]
        config = json.loads((run / "config.json").read_text())
        assert {**config, "out": str(alone)} == json.loads((alone / "config.json").read_text())


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(12, len(COUNTS))
        torch.manual_seed(0)
        self.b = nn.Linear(12, len(COUNTS))


def summed_task(model, x, y, epoch):
    counts = torch.tensor(COUNTS, dtype=torch.float32)
    return compute_loss("ce", model.a(x), y, counts) + compute_loss("ce", model.b(x), y, counts), None


def alone_task(model, x, y, epoch):
    return compute_loss("ce", model(x), y, torch.tensor(COUNTS, dtype=torch.float32)), None


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_fit_parts_train_with_their_own_settings_and_stop_at_their_end(optimizer):
    """Part ``a`` keeps receiving gradients after its 2 epochs: lr 0 must leave it exactly as it was."""
    _, splits = gaussian_lt(0, COUNTS, 12, 2.0, {})
    x, y = map(torch.from_numpy, splits["train"])
    shared = dict(batch_size=64, optimizer=optimizer, momentum=0.9, seed=0)
    parts = {"a": OptimConfig(**shared, lr=0.05, epochs=2, weight_decay=1e-2, schedule="cosine", warmup=0.5),
             "b": OptimConfig(**shared, lr=0.01, epochs=5, weight_decay=0.0, schedule="step")}
    model = TwoHeads()
    result = fit(model, summed_task, TensorSource(x, y), OptimConfig(**shared), num_classes=len(COUNTS),
                 groups=ParamGroups(parts=parts))
    assert result.epochs == 5
    for name, part in parts.items():
        torch.manual_seed(0)
        alone = nn.Linear(12, len(COUNTS))
        fit(alone, alone_task, TensorSource(x, y), part, num_classes=len(COUNTS))
        for key, value in alone.state_dict().items():
            torch.testing.assert_close(getattr(model, name).state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_head_stack_logits_equal_each_heads_own():
    heads = [create_head("linear", HeadInputs(5, 12)), create_head("linear", HeadInputs(5, 12), normalize=False),
             create_head("cosine", HeadInputs(5, 12), init_scale=7.0),
             create_head("cosine", HeadInputs(5, 12), learn_scale=False)]
    stack = HeadStack(heads, ["a", "b", "c", "d"], ["balanced_accuracy"] * 4, [1] * 4).double()
    x = torch.randn(9, 12, dtype=torch.float64)
    for k, logits in zip([3, 0, 2], stack(x, [3, 0, 2]).unbind(1)):
        torch.testing.assert_close(logits, heads[k](x), rtol=1e-12, atol=1e-12)


def test_stack_loss_equals_the_sum_of_each_heads_own_loss_and_drops_heads_past_their_epochs():
    """Softmax cross-entropies of offset logits share one call; the others (label smoothing, focal) are their own.
    The task computes losses in float32 (as the engine's task does); the reference is float64."""
    losses = [("ce", {}), ("focal", {"gamma": 2.0}), ("logit_adjusted", {"tau": 0.5}), ("ce", {"label_smoothing": 0.1}),
              ("balanced_softmax", {})]
    epochs = [3, 1, 2, 3, 1]
    heads = [create_head("cosine" if k == 2 else "linear", HeadInputs(5, 12)) for k in range(5)]
    stack = HeadStack(heads, list("abcde"), ["balanced_accuracy"] * 5, epochs).double()
    task = StackTask(losses, COUNTS, epochs)
    task.offsets = task.offsets.double()
    x, y = torch.randn(9, 12, dtype=torch.float64), torch.randint(0, 5, (9,))
    counts = torch.tensor(COUNTS, dtype=torch.float64)
    for epoch, active in [(0, [0, 1, 2, 3, 4]), (1, [0, 2, 3]), (2, [0, 3])]:
        loss, _ = task(stack, x, y, epoch)
        expected = sum(compute_loss(losses[k][0], heads[k](x), y, counts, epoch=epoch, total_epochs=epochs[k], **losses[k][1])
                       for k in active)
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
        grads = torch.autograd.grad(loss, [heads[k].classifier.weight for k in active])
        wanted = torch.autograd.grad(expected, [heads[k].classifier.weight for k in active])
        for g, w in zip(grads, wanted):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_sweep_keeps_the_point_with_the_best_val_metric(features, tmp_path):
    """lr 1e-7 leaves a head at its random start, lr 0.1 learns the classes: the best point is known.
    The kept run is the point's run: eval reads it and its config.json reruns it with train-head."""
    out = tmp_path / "sweep"
    invoke("sweep", "--features", features, *BASE, "--head", "linear", "--epochs", "6", "--grid", "lr=1e-7,0.1",
           "--grid", "loss=ce,balanced_softmax", "--metric", "nll", "--out", out)
    record = sweep_record(out)
    assert record["higher_is_better"] is False
    vals = {p["name"]: run_info(out / "points" / p["name"])["best"]["val_nll"] for p in record["points"]}
    assert {p["name"]: p["val"] for p in record["points"]} == vals
    assert record["best"]["point"] == min(vals, key=vals.get)
    assert record["best"]["options"]["lr"] == 0.1
    best = out / "best"
    assert run_info(best)["best"] == run_info(out / "points" / record["best"]["point"])["best"]
    invoke("eval", best, "--split", "val", "--json", tmp_path / "eval.json")
    assert json.loads((best / "config.json").read_text())["out"] == str(best)
    rerun = tmp_path / "rerun"
    invoke("train-head", "--config", best / "config.json", "--out", rerun)
    for key, value in weights(best).items():
        torch.testing.assert_close(weights(rerun)[key], value)


def test_choose_best_takes_the_first_of_equal_scores_and_skips_failures():
    points = [{"name": "a", "state": "done", "val": 3.0}, {"name": "b", "state": "failed", "val": None},
              {"name": "c", "state": "done", "val": 5.0}, {"name": "d", "state": "done", "val": 5.0}]
    assert choose_best({"higher_is_better": True, "points": points})["name"] == "c"
    assert choose_best({"higher_is_better": False, "points": points})["name"] == "a"
    assert choose_best({"higher_is_better": True, "points": points[1:2]}) is None


def test_points_that_cannot_share_batches_train_in_their_own_groups(features, tmp_path):
    base = {"features": str(features), "batch_size": 64, "device": "cpu"}
    grid = [("head", ["linear", "mlp"]), ("sampler", ["instance", "progressive"]), ("epochs", [2, 3])]
    points = expand(base, grid, tmp_path)
    groups = [[p.options for p in g] for g in plan_groups(points)]
    linear = lambda s, e: {"head": "linear", "sampler": s, "epochs": e}  # noqa: E731
    assert [linear("instance", 2), linear("instance", 3)] in groups  # the sampler ignores the run's length
    assert [linear("progressive", 2)] in groups and [linear("progressive", 3)] in groups  # its schedule does not
    assert sum(1 for g in groups if g[0]["head"] == "mlp") == 4  # not a stackable head: each alone
    clipped = expand({**base, "grad_clip": 1.0}, [("lr", [0.1, 0.2])], tmp_path)
    assert len(plan_groups(clipped)) == 2  # clipping takes one norm over every head


def test_a_diverging_point_fails_and_the_others_finish(features, tmp_path):
    out = tmp_path / "sweep"
    invoke("sweep", "--features", features, *BASE, "--head", "linear", "--head-opt", "normalize=false", "--optimizer", "sgd",
           "--epochs", "2", "--grid", "lr=0.1,1e30,0.01", "--out", out)
    record = sweep_record(out)
    assert [p["state"] for p in record["points"]] == ["done", "failed", "done"]
    assert "loss became" in record["points"][1]["error"]
    assert record["groups"]["g00"]["batched"] is False and "trained one by one" in record["groups"]["g00"]["note"]
    assert record["best"]["point"] in (record["points"][0]["name"], record["points"][2]["name"])


@pytest.mark.parametrize("args, message", [
    (["--grid", "lrr=0.1"], "--grid 'lrr=0.1': expected KEY=V1,V2 with KEY a train-head option"),
    (["--grid", "lr=0.1,fast"], "--grid 'lr=0.1,fast': Invalid value for '--lr'"),
    (["--grid", "loss=ce,focall"], "--grid loss 'focall': unknown (did you mean focal?)"),
    (["--grid", "epochs=2", "--grid", "epochs=3"], "--grid epochs: given twice"),
    (["--grid", "lr=0.1", "--from", "x"], "--from x: no such run folder"),
    (["--grid", "lr=0.1", "--from", "x", "--two-stage", "crt"], "--from x: no such run folder"),
    (["--grid", "two_stage=crt,lwz", "--from", "x"], "--grid two_stage 'lwz': unknown (did you mean lws?)"),
    (["--grid", "lr=0.1", "--metric", "acc"], "--metric 'acc': choose one of top1, balanced_accuracy"),
    (["--grid", "lr=0.1", "--lrr", "3"], "train-head option: No such option: --lrr"),
    ([], "--grid KEY=V1,V2 is required"),
])
def test_bad_sweep_options_are_one_line_errors(features, tmp_path, args, message):
    result = runner.invoke(app, ["sweep", "--features", str(features), "--out", str(tmp_path / "s"), *args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output


def test_a_second_stage_sweep_trains_each_point_as_train_head_from_would(features, tmp_path):
    """cRT's and LWS's lr on one stage-1 run: each point equals the same second stage trained alone,
    the best is the point with the highest val metric, and best/ reruns as a second stage."""
    stage1 = tmp_path / "stage1"
    invoke("train-head", "--features", features, *BASE, "--head", "linear", "--loss", "ce", "--epochs", "3", "--out", stage1)
    out = tmp_path / "sweep"
    invoke("sweep", "--from", stage1, "--epochs", "2", "--grid", "two_stage=crt,lws", "--grid", "lr=0.1,1.0", "--out", out)
    record = sweep_record(out)
    assert len(record["points"]) == 4 and all(p["state"] == "done" for p in record["points"])
    assert all(not g["batched"] for g in record["groups"].values())
    for point in record["points"]:
        o = point["options"]
        alone = tmp_path / f"alone-{point['name']}"
        invoke("train-head", "--from", stage1, "--epochs", "2", "--two-stage", o["two_stage"], "--lr", o["lr"], "--out", alone)
        a, b = torch.load(alone / "model.pt", weights_only=True), torch.load(out / "points" / point["name"] / "model.pt", weights_only=True)
        assert (a["two_stage"]["name"], a["two_stage"]["config"]) == (b["two_stage"]["name"], b["two_stage"]["config"])
        for key, value in a["two_stage"]["state_dict"].items():
            assert torch.equal(value, b["two_stage"]["state_dict"][key]), (point["name"], key)
        assert point["val"] == run_info(alone)["best"]["val_balanced_accuracy"] and point["best_epoch"] is None
    best = max(record["points"], key=lambda p: p["val"])
    assert record["best"]["point"] == best["name"]
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["from_run"] == str(stage1) and config["two_stage"] == best["options"]["two_stage"]
    assert config["out"] == str(out / "best")
    invoke("train-head", "--config", out / "best" / "config.json", "--out", tmp_path / "rerun")
    kept, rerun = (torch.load(d / "model.pt", weights_only=True)["two_stage"]["state_dict"] for d in (out / "best", tmp_path / "rerun"))
    assert all(torch.equal(v, rerun[k]) for k, v in kept.items())


def test_a_sweep_folder_is_never_overwritten_and_resume_needs_the_same_options(features, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--features", features, *BASE, "--head", "linear", "--epochs", "1", "--grid", "lr=0.1,0.2", "--out", out]
    invoke(*args)
    before = (out / "sweep.json").read_text()
    again = runner.invoke(app, [str(a) for a in args])
    assert again.exit_code == 2 and "already holds a sweep; pass --resume" in again.output
    other = runner.invoke(app, [str(a) for a in args[:-4]] + ["--grid", "lr=0.1,0.3", "--out", str(out), "--resume"])
    assert other.exit_code == 2 and "the grid differ from the interrupted sweep's" in other.output
    invoke(*args, "--resume")  # a finished sweep: nothing to train
    assert (out / "sweep.json").read_text() == before


@pytest.mark.slow
def test_a_killed_sweep_resumes_and_ends_as_an_uninterrupted_one(features, tmp_path):
    args = ["sweep", "--features", str(features), *BASE, "--checkpoint-every", "1", "--grid", "lr=0.05,0.2",
            "--grid", "epochs=6,12", "--grid", "head=cosine,mlp"]
    reference = tmp_path / "reference"
    invoke(*args, "--out", reference)
    killed = tmp_path / "killed"
    marks = lambda: [*killed.glob("groups/*/last.pt"), *killed.glob("points/*/last.pt"), killed / "sweep.json"]  # noqa: E731
    landed = kill_at_random_moments(
        lambda: [sys.executable, "-m", "ltclip", *args, "--out", str(killed)] + (["--resume"] if (killed / "sweep.json").exists() else []),
        lambda: newest_mtime(*marks()), kills=4, seed=0, max_delay=1.5, env=ENV, timeout=300,
    )
    invoke(*args, "--out", killed, "--resume")
    print(f"\nsweep: {landed} of 4 kills landed before the sweep finished")
    assert landed >= 3
    assert sweep_record(killed) == sweep_record(reference)
    for point in sweep_record(reference)["points"]:
        a, b = weights(reference / "points" / point["name"]), weights(killed / "points" / point["name"])
        assert all(torch.equal(a[k], b[k]) for k in a), point["name"]
    assert all(torch.equal(v, weights(killed / "best")[k]) for k, v in weights(reference / "best").items())
