"""`ltclip finetune`: the frozen protocol equals train-head on a float32 cache of the same images; every
tuning mode trains, saves, reloads and evaluates; extract --from-run; torchrun; option errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import TINY_MODEL
from ltclip.cli import app
from ltclip.data.registry import load_dataset
from ltclip.models.backbone import load_backbone
from ltclip.models.tuning import TUNING
from ltclip.artifacts.store import FeatureCache

runner = CliRunner()
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def ok(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def data_args(root: Path) -> list[str]:
    return ["--dataset", "synthetic", "--data-root", str(root), "--model", TINY_MODEL, "--pretrained", "none"]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def float32_cache(root: Path, folder: Path) -> Path:
    """train/val caches of the tiny model's float32 outputs (the model's own preprocessing), written with h5py."""
    backbone = load_backbone(TINY_MODEL, "none")
    dataset = load_dataset("synthetic", root)
    folder.mkdir()
    for split in ("train", "val"):
        rows = dataset.split(split)
        x = torch.stack([backbone.preprocess(dataset.open_image(split, i)) for i in range(len(rows))])
        with torch.no_grad():
            embeds, tokens = backbone.encode(x, tokens=True)
        with h5py.File(folder / f"{split}.h5", "w") as f:
            f["embeds"], f["tokens"] = embeds.numpy(), tokens.numpy()
            f["labels"] = rows.labels.astype(np.int32)
            f.attrs["schema_version"], f.attrs["num_classes"] = 1, dataset.num_classes
    return folder


COMMON = ["--head", "decoder", "--head-opt", "depth=1", "--head-opt", "heads=2", "--loss", "balanced_softmax", "--epochs", "3",
          "--batch-size", "16", "--optimizer", "adamw", "--lr", "2e-3", "--weight-decay", "1e-4", "--warmup", "0", "--decay-1d",
          "--schedule-unit", "step", "--select", "last", "--device", "cpu"]  # both commands' values given: their defaults differ


def test_frozen_protocol_equals_train_head_on_a_float32_cache(synthetic_root, tmp_path):
    cache = float32_cache(synthetic_root, tmp_path / "features")
    with FeatureCache(cache / "train.h5") as c:
        assert c.token_dtype == np.float32
    assert_cache_run_equals_frozen_finetune(cache, synthetic_root, tmp_path, COMMON)


def assert_cache_run_equals_frozen_finetune(cache: Path, root: Path, tmp_path: Path, options) -> None:
    """train-head on ``cache`` and finetune --tune frozen --no-augment on the images, both with
    ``options``: the same steps, losses (rel 1e-5), val scores and head weights (rtol 1e-4)."""
    head_run, tuned_run = tmp_path / "head", tmp_path / "tuned"
    ok("train-head", "--features", cache, "--out", head_run, *options)
    ok("finetune", *data_args(root), "--tune", "frozen", "--no-augment", "--eval-resize", "0",  # 0: validate on the cache's view
       "--workers", "0", "--out", tuned_run, *options)
    a, b = records(head_run), records(tuned_run)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
        assert rb["val_balanced_accuracy"] == pytest.approx(ra["val_balanced_accuracy"])
    ha = torch.load(head_run / "model.pt", weights_only=True)["head"]["state_dict"]
    hb = torch.load(tuned_run / "model.pt", weights_only=True)["head"]["state_dict"]
    assert set(ha) == set(hb)
    for key in ha:
        torch.testing.assert_close(hb[key], ha[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("mode", TUNING.names())
def test_every_tuning_mode_trains_saves_reloads_and_evaluates(synthetic_root, tmp_path, mode):
    run = tmp_path / mode
    ok("finetune", *data_args(synthetic_root), "--tune", mode, "--head", "linear", "--loss", "ce", "--epochs", "3",
       "--batch-size", "32", "--lr", "5e-3", "--workers", "0", "--device", "cpu", "--out", run)
    log = records(run)
    assert log[-1]["loss"] < log[0]["loss"], log
    info = json.loads((run / "run.json").read_text())
    assert info["kind"] == "finetune" and info["method"]["tune"] == mode
    payload = torch.load(run / "model.pt", weights_only=True)
    base = sum(p.numel() for p in load_backbone(TINY_MODEL, "none").model.visual.parameters())
    stored = sum(v.numel() for v in payload["encoder"]["state_dict"].values())
    assert stored == info["encoder_trainable"] and (stored == 0) == (mode == "frozen")
    assert stored < base or mode in ("full", "last-k")  # only what trains is stored, never the whole base model
    ok("eval", run, "--split", "val", "--json", tmp_path / "e.json")
    evaluated = json.loads((tmp_path / "e.json").read_text())
    # the reloaded run predicts exactly what the trained model did on val when it was selected, through
    # the view the run recorded: LIFT's Resize(resolution × 8/7) + CenterCrop, 36 at the tiny model's 32
    assert evaluated["results"][0]["balanced_accuracy"] == pytest.approx(info["best"]["val_balanced_accuracy"])
    assert json.loads((run / "config.json").read_text())["eval_resize"] == 32 * 8 // 7
    if mode == "adaptformer":  # a run saved before the modes took LIFT's definitions (no class count recorded)
        del payload["encoder"]["num_classes"]
        torch.save(payload, run / "model.pt")
        result = runner.invoke(app, ["eval", str(run), "--split", "val"])
        assert result.exit_code != 0 and "before it took LIFT's definitions" in result.output
        assert "retrain it" in result.output.strip().splitlines()[-1]


def assert_forward_batches_of_images_times_views(run: Path, images: int) -> None:
    """--batch-size counts a finetuned run's images, each forwarded with its views (5 with fivecrop): the
    forward passes stay that small, and the scores do not depend on it."""
    from ltclip.artifacts.runs import load_run
    from ltclip.config import EvalConfig
    from ltclip.stages.image_eval import IMAGE_BATCH, image_run_logits

    loaded = load_run(run)
    sizes = []
    loaded.model.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    small, _ = image_run_logits(loaded, EvalConfig(test_views="fivecrop", workers=0, batch_size=8), "cpu")
    assert sizes == [8 * 5] * (images // 8) + ([images % 8 * 5] if images % 8 else [])
    sizes.clear()
    default, _ = image_run_logits(loaded, EvalConfig(test_views="fivecrop", workers=0), "cpu")
    assert sizes == [min(images, IMAGE_BATCH) * 5] + sizes[1:] and IMAGE_BATCH == 128  # LIFT's test batch
    np.testing.assert_allclose(small, default, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # a finetune, four evaluations of its images and an extract: ~1.7 s
def test_test_time_views_and_extract_from_a_finetuned_run(synthetic_root, tmp_path):
    run = tmp_path / "lora"
    ok("finetune", *data_args(synthetic_root), "--tune", "lora", "--head", "linear", "--epochs", "2", "--batch-size", "32",
       "--lr", "1e-2", "--workers", "0", "--device", "cpu", "--out", run)
    ok("eval", run, "--test-views", "flip")
    flip = json.loads((run / "eval.json").read_text())
    assert flip["num_samples"] == len(load_dataset("synthetic", synthetic_root).split("test"))
    assert_forward_batches_of_images_times_views(run, len(load_dataset("synthetic", synthetic_root).split("test")))
    feats = tmp_path / "feats"
    result = runner.invoke(app, ["extract", "--dataset", "synthetic", "--data-root", str(synthetic_root), "--from-run", str(run),
                                 "--model", "ViT-B-32", "--out", str(feats)])
    assert result.exit_code == 2 and "--model: the encoder comes from --from-run" in result.output
    ok("extract", "--dataset", "synthetic", "--data-root", synthetic_root, "--from-run", run, "--splits", "test", "--device", "cpu",
       "--workers", "0", "--out", feats)
    from ltclip.artifacts.runs import load_run

    model = load_run(run).model
    dataset = load_dataset("synthetic", synthetic_root)
    x = torch.stack([model.preprocess(dataset.open_image("test", i)) for i in range(8)])
    with torch.no_grad():
        expected = model.encode(x)[0].numpy()
    with FeatureCache(feats / "test.h5") as cache:
        np.testing.assert_allclose(cache.load_embeds()[:8, 0].astype(np.float32), expected, rtol=2e-3, atol=2e-3)
        assert len(cache.attrs["finetuned_run_sha256"]) == 64
    from ltclip.config import EvalConfig
    from ltclip.stages.image_eval import image_run_logits

    zero, _ = image_run_logits(load_run(run), EvalConfig(workers=0, eval_resize=0), "cpu")  # 0: the model's preprocessing,
    with torch.no_grad():  # not the run's recorded --eval-resize
        np.testing.assert_allclose(zero[:8], model.eval()(x).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # ~1.7 s
def test_prompt_head_finetunes_on_the_backbones_text_tower_and_reloads(synthetic_root, tmp_path):
    from test_text_prompts import naive_features

    from ltclip.artifacts.runs import load_run

    run = tmp_path / "prompt"
    ok("finetune", *data_args(synthetic_root), "--tune", "lora", "--head", "prompt", "--head-opt", "classes_per_step=4",
       "--head-opt", "chunk=3", "--loss", "ce", "--epochs", "3", "--batch-size", "32", "--lr", "1e-2", "--workers", "0",
       "--device", "cpu", "--out", run)
    assert records(run)[-1]["loss"] < records(run)[0]["loss"]
    dataset = load_dataset("synthetic", synthetic_root)
    payload = torch.load(run / "model.pt", weights_only=True)
    assert payload["head"]["text_encoder"]["classnames"] == dataset.classnames
    assert list(payload["head"]["state_dict"]) == ["classifier.ctx"]
    assert payload["encoder"]["state_dict"] and all(k.startswith("visual.") for k in payload["encoder"]["state_dict"])
    model = load_run(run).model
    x = torch.stack([model.preprocess(dataset.open_image("test", i)) for i in range(8)])
    base = load_backbone(TINY_MODEL, "none")  # the text tower never trains: the base model's is the run's
    tokens = base.tokenizer([f"a photo of a {name}." for name in dataset.classnames])
    with torch.no_grad():
        z = F.normalize(model.encode(x)[0], dim=-1)
        text = naive_features(base, tokens, payload["head"]["state_dict"]["classifier.ctx"], 4)
        torch.testing.assert_close(model(x), base.model.logit_scale.exp() * z @ text.T, atol=1e-4, rtol=0)
        assert torch.equal(load_run(run).model(x), model(x))
    ok("eval", run, "--split", "val", "--json", tmp_path / "e.json")
    evaluated = json.loads((tmp_path / "e.json").read_text())["results"][0]
    info = json.loads((run / "run.json").read_text())
    assert evaluated["balanced_accuracy"] == pytest.approx(info["best"]["val_balanced_accuracy"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tune", "frozen", "--backbone-lr", "1e-4"], "--backbone-lr: --tune frozen trains nothing"),
        (["--tune", "lorra"], "--tune 'lorra': unknown (did you mean lora?)"),
        (["--tune", "lora", "--tune-opt", "rnk=4"], "--tune-opt"),
        (["--normalize", "clip"], "--normalize 'clip': choose one of model, imagenet"),
        (["--two-stage", "crt"], "No such option"),
    ],
)
def test_bad_options_are_one_line_errors(synthetic_root, tmp_path, args, message):
    result = runner.invoke(app, ["finetune", *data_args(synthetic_root), "--out", str(tmp_path / "r"), "--device", "cpu", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_torchrun_two_processes_finetune_the_same_model_as_one(synthetic_root, tmp_path):
    args = ["finetune", *data_args(synthetic_root), "--tune", "lora", "--head", "decoder", "--head-opt", "depth=1", "--head-opt",
            "heads=2", "--epochs", "2", "--batch-size", "16", "--optimizer", "sgd", "--lr", "0.05", "--workers", "0",
            "--device", "cpu"]
    # SGD, not Adam: Adam turns the float noise of a zero gradient (an attention key bias has one) into full-size steps
    one, two = tmp_path / "one", tmp_path / "two"
    ok(*args, "--out", one)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ltclip", *args, "--out", str(two)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    a, b = (torch.load(r / "model.pt", weights_only=True) for r in (one, two))
    for part in ("head", "encoder"):
        for key, value in a[part]["state_dict"].items():
            torch.testing.assert_close(b[part]["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=f"{part}.{key}")
    for ra, rb in zip(records(one), records(two), strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4)


def test_list_tuning_counts_trainable_parameters_on_a_model():
    result = ok("list", "tuning", "--model", TINY_MODEL)
    rows = result.output.strip().splitlines()[2:]  # below the header and its rule; a row's first line names it
    counts = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in rows if line[:1].strip()}
    blocks = sum(p.numel() for p in load_backbone(TINY_MODEL, "none").model.visual.transformer.resblocks.parameters())
    assert set(counts) == set(TUNING.names()) and counts["frozen"] == 0 and counts["full"] == blocks  # LIFT: blocks only
    assert runner.invoke(app, ["list", "losses", "--model", TINY_MODEL]).exit_code == 2


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["lift", "lift+"])
def test_lift_recipes_resume_after_sigkill_as_an_uninterrupted_run_and_evaluate_with_their_views(synthetic_root, tmp_path, recipe):
    """LIFT's and LIFT+'s recipes (AdaptFormer, the pooled cosine head, per-epoch cosine, the last
    epoch's weights; LIFT+'s MDA crops) on the toy set: SIGKILL + --resume equals an uninterrupted run."""
    from test_training_runs import kill_at_random_steps

    args = ["finetune", *data_args(synthetic_root), "--recipe", recipe, "--epochs", "4", "--batch-size", "16", "--workers", "0",
            "--device", "cpu", "--checkpoint-every", "1"]
    reference = tmp_path / "reference"
    ok(*args, "--out", reference)
    killed = tmp_path / "killed"
    assert kill_at_random_steps(args, killed, kills=3, seed=2) >= 2
    a, b = (torch.load(r / "model.pt", weights_only=True) for r in (reference, killed))
    for part in ("head", "encoder"):
        assert all(torch.equal(v, b[part]["state_dict"][k]) for k, v in a[part]["state_dict"].items()), part
    assert records(reference) == records(killed)
    assert not (reference / "best.pt").exists()  # --select last: the last epoch's weights
    views = ["--split", "val", "--test-views", "fivecrop", "--eval-resize", "36", "--workers", "0"]  # the tables' views, at 32 px
    scores = [json.loads(ok("eval", run, *views, "--json", tmp_path / f"{run.name}.json") and (tmp_path / f"{run.name}.json").read_text())
              for run in (reference, killed)]
    assert scores[0]["results"][0]["top1"] == scores[1]["results"][0]["top1"]


def lift_head_model(root: Path, *opts: str):
    """``new_encoder_classifier`` for a cosine head on the pooled feature with ``opts`` (tiny model, frozen)."""
    from ltclip.recipes.resolve import finetune_config
    from ltclip.stages.finetune import new_encoder_classifier

    cfg = finetune_config({"out": "o", "dataset": "synthetic", "data_root": str(root), "model": TINY_MODEL,
                           "pretrained": "none", "head": "cosine", "head_opts": ("input=pooled", *opts),
                           "device": "cpu", "workers": 0, "batch_size": 16})
    return new_encoder_classifier(cfg, load_dataset("synthetic", root), torch.device("cpu"))


def test_lift_text_start_is_the_single_template_mapped_back_through_the_projection(synthetic_root):
    backbone, model = lift_head_model(synthetic_root, "init=text", "templates=single", "init_scale=25", "learn_scale=false")
    dataset = load_dataset("synthetic", synthetic_root)
    with torch.no_grad():
        text = backbone.model.encode_text(backbone.tokenizer([f"a photo of a {c}." for c in dataset.classnames]))
        text = text / text.norm(dim=1, keepdim=True)
        rows = text @ backbone.model.visual.proj.T
        rows = rows / rows.norm(dim=1, keepdim=True)
    torch.testing.assert_close(model.head.classifier.weight.detach(), rows, rtol=1e-5, atol=1e-5)
    assert model.head.input == "pooled" and model.head.classifier.weight.shape == (dataset.num_classes, 64)
    assert not model.backbone.visual.proj.requires_grad
    x = torch.stack([backbone.preprocess(dataset.open_image("val", i)) for i in range(4)])
    with torch.no_grad():
        pooled = F.normalize(backbone.encode_pooled(x), dim=-1)
        torch.testing.assert_close(model(x), 25.0 * pooled @ rows.T, rtol=1e-4, atol=1e-4)


def test_class_mean_start_is_the_frozen_encoders_per_class_mean(synthetic_root):
    backbone, model = lift_head_model(synthetic_root, "init=class_mean")
    dataset = load_dataset("synthetic", synthetic_root)
    rows = dataset.split("train")
    x = torch.stack([backbone.preprocess(dataset.open_image("train", i)) for i in range(len(rows))])
    with torch.no_grad():
        feats = backbone.encode_pooled(x)
    labels = torch.as_tensor(rows.labels)
    means = torch.stack([feats[labels == c].mean(0) for c in range(dataset.num_classes)])
    torch.testing.assert_close(model.head.classifier.weight.detach(), F.normalize(means, dim=-1), rtol=1e-4, atol=1e-5)


def test_lift_recipe_head_finetunes_saves_and_reloads(synthetic_root, tmp_path):
    from ltclip.artifacts.runs import load_run

    run = tmp_path / "lift"
    ok("finetune", *data_args(synthetic_root), "--recipe", "lift", "--tune", "frozen", "--epochs", "2", "--batch-size",
       "32", "--workers", "0", "--device", "cpu", "--out", run)
    payload = torch.load(run / "model.pt", weights_only=True)
    config = payload["head"]["config"]
    assert (config["input"], config["init"], config["templates"], config["init_scale"], config["learn_scale"]) == (
        "pooled", "text", "single", 25.0, False)
    model = load_run(run).model
    dataset = load_dataset("synthetic", synthetic_root)
    x = torch.stack([model.preprocess(dataset.open_image("test", i)) for i in range(4)])
    with torch.no_grad():
        w = payload["head"]["state_dict"]["classifier.weight"]
        expected = 25.0 * F.normalize(model.encode_pooled(x), dim=-1) @ F.normalize(w, dim=-1).T
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
