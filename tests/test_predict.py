"""`ltclip predict` and `ltclip.load`: every run kind (head on embeddings, decoder head on int8 tokens, second
stage, finetuned, zero-shot) predicts on image files what `ltclip eval` scores on the same split; the Python
API round trip; the CSV/JSONL outputs; bad inputs as one-line errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_MODEL
from test_bad_inputs import invoke, ok
from ltclip.data.registry import load_dataset

MARGIN = 1e-2  # images whose top two logits lie closer than this may swap under float16/int8 rounding


def one_error_line(result, *fragments: str) -> str:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.output.rstrip().endswith(errors[0]), result.output
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


def test_images(root: Path) -> list[Path]:
    dataset = load_dataset("synthetic", root)
    return [Path(dataset.data_root) / key for key in dataset.split("test").keys]


test_images.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def world(synthetic_root, tiny_checkpoint, tmp_path_factory) -> dict:
    """A cache of the tiny model (int8 tokens, text embeddings) and a linear, a decoder and a second-stage run on it."""
    base = tmp_path_factory.mktemp("predict")
    cache = base / "cache"
    ok("extract", "--data-root", synthetic_root, "--model", TINY_MODEL, "--pretrained", tiny_checkpoint, "--splits", "train,test",
       "--token-dtype", "int8", "--workers", "0", "--batch-size", "32", "--device", "cpu", "--out", cache)
    runs = {"linear": base / "linear", "decoder": base / "decoder", "lws": base / "lws"}
    ok("train-head", "--features", cache, "--out", runs["linear"], "--head", "linear", "--epochs", "3", "--device", "cpu")
    ok("train-head", "--features", cache, "--out", runs["decoder"], "--head", "decoder", "--head-opt", "depth=1",
       "--head-opt", "heads=2", "--epochs", "1", "--batch-size", "32", "--device", "cpu")
    ok("train-head", "--from", runs["linear"], "--two-stage", "lws", "--epochs", "2", "--out", runs["lws"], "--device", "cpu")
    listing = base / "test.txt"
    listing.write_text("".join(f"{p}\n" for p in test_images(synthetic_root)))
    return {"cache": cache, "runs": runs, "list": listing, "base": base}


def cli_predictions(*args, out: Path) -> list[dict]:
    ok("predict", *args, "--workers", "0", "--device", "cpu", "--out", out)
    return [json.loads(line) for line in out.read_text().splitlines()]


def cache_logits(run: Path, cache: Path) -> np.ndarray:
    """What `ltclip eval RUN` scores: the run's logits on the cache's test split, views averaged."""
    from ltclip.artifacts.feature_batches import FeatureInputs
    from ltclip.artifacts.runs import load_run
    from ltclip.artifacts.store import FeatureCache
    from ltclip.evaluation.metrics import average_views

    model = load_run(run).model
    with FeatureCache(cache / "test.h5") as test:
        return average_views(model.predict(FeatureInputs(test, model.head.input)), "mean")


def assert_same_top_class(rows: list[dict], logits: np.ndarray, classnames: list[str], images: list[Path],
                          margin: float = MARGIN) -> None:
    """Row i predicts the argmax of ``logits[i]`` for every image whose top two logits are apart by ``margin``."""
    assert [r["path"] for r in rows] == [str(p) for p in images]
    top2 = np.sort(logits, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > margin
    assert clear.mean() > 0.8  # the check is not vacuous
    predicted = np.array([classnames.index(r["top"][0]["class"]) for r in rows])
    np.testing.assert_array_equal(predicted[clear], logits.argmax(1)[clear])


@pytest.mark.slow  # three runs trained on a cache: ~15 s
@pytest.mark.parametrize("kind", ["linear", "decoder", "lws"])
def test_a_cache_trained_run_predicts_on_images_what_eval_scores_on_the_cache(world, synthetic_root, kind, tmp_path):
    from ltclip.artifacts.store import FeatureCache

    run = world["runs"][kind]
    rows = cli_predictions(run, "--list", world["list"], "--top-k", "3", out=tmp_path / "p.jsonl")
    with FeatureCache(world["cache"] / "test.h5") as test:
        classnames = list(test.classnames)
    logits = cache_logits(run, world["cache"])
    assert_same_top_class(rows, logits, classnames, test_images(synthetic_root))
    import ltclip

    api = ltclip.load(run, device="cpu").logits(test_images(synthetic_root)[:16])
    np.testing.assert_allclose(api, logits[:16], rtol=1e-4, atol=1e-4)  # measured: equal to the bit on a CPU


@pytest.mark.slow  # extract + zero-shot: ~4 s
def test_zero_shot_on_images_is_evals_zero_shot_on_the_cache(world, synthetic_root, tmp_path):
    from ltclip.artifacts.store import FeatureCache, load_text_embeddings
    from ltclip.evaluation.retrieval import normalise

    rows = cli_predictions("--zero-shot", "--features", world["cache"], "--list", world["list"], out=tmp_path / "z.jsonl")
    text = load_text_embeddings(world["cache"] / "text.h5")
    with FeatureCache(world["cache"] / "test.h5") as test:
        logits = 100.0 * normalise(test.load_embeds()[:, 0].astype(np.float32)) @ text.embeds.T
        classnames = list(test.classnames)
    assert_same_top_class(rows, logits, classnames, test_images(synthetic_root))
    assert invoke("predict", world["runs"]["linear"], "--zero-shot", "--features", world["cache"], world["list"]).exit_code == 2


@pytest.mark.slow  # a LoRA finetune, a cache of its encoder and a head on it: ~4 s
def test_a_finetuned_run_predicts_what_eval_scores_on_its_images(synthetic_root, tmp_path):
    from ltclip.artifacts.runs import load_run
    from ltclip.config import EvalConfig
    from ltclip.stages.image_eval import image_run_logits

    run = tmp_path / "lora"
    ok("finetune", "--dataset", "synthetic", "--data-root", synthetic_root, "--model", TINY_MODEL, "--pretrained", "none",
       "--tune", "lora", "--head", "linear", "--epochs", "2", "--batch-size", "32", "--lr", "1e-2", "--workers", "0",
       "--device", "cpu", "--out", run)
    images = test_images(synthetic_root)
    for views in ("center", "flip"):
        rows = cli_predictions(run, *images, "--test-views", views, out=tmp_path / f"{views}.jsonl")
        expected, _ = image_run_logits(load_run(run), EvalConfig(test_views=views, workers=0), "cpu")
        classnames = load_dataset("synthetic", synthetic_root).classnames
        assert_same_top_class(rows, expected, list(classnames), images, margin=1e-5)  # float32 both ways
    import ltclip

    np.testing.assert_allclose(ltclip.load(run, device="cpu").logits(images[:8], test_views="flip"), expected[:8], rtol=1e-4, atol=1e-4)
    cache, head = tmp_path / "cache", tmp_path / "head"  # a head trained on a cache of the finetuned encoder
    ok("extract", "--data-root", synthetic_root, "--from-run", run, "--splits", "train,test", "--no-tokens", "--workers", "0",
       "--device", "cpu", "--out", cache)
    ok("train-head", "--features", cache, "--out", head, "--head", "linear", "--epochs", "2", "--device", "cpu")
    np.testing.assert_allclose(ltclip.load(head, device="cpu").logits(images), cache_logits(head, cache), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_load_gives_a_classifier_whose_parts_agree(world, synthetic_root):
    import ltclip

    clf = ltclip.load(world["runs"]["linear"], device="cpu")
    paths = test_images(synthetic_root)[:6]
    pils = [Image.open(p).convert("RGB") for p in paths]
    by_path, by_pil = clf.predict(paths, top_k=2), clf.predict(pils, top_k=2)
    assert [p.top for p in by_path] == [p.top for p in by_pil] and by_pil[0].image == "image 0"
    assert by_path[0].image == str(paths[0]) and by_path[0].label == by_path[0].top[0][0]
    assert len(clf.classnames) == 10 and all(len(p.top) == 2 and p.top[0][1] >= p.top[1][1] for p in by_path)
    assert not clf.model.training and clf.to("cpu") is clf and clf.device == torch.device("cpu")
    with torch.no_grad():
        direct = clf.model(torch.stack([clf.transform(im) for im in pils])).numpy()
    np.testing.assert_allclose(direct, clf.logits(paths), rtol=1e-5, atol=1e-5)
    assert "load" in ltclip.__all__


@pytest.mark.slow
def test_csv_jsonl_and_table_outputs(world, synthetic_root, tmp_path, monkeypatch):
    run, images = world["runs"]["linear"], test_images(synthetic_root)[:5]
    ok("predict", run, *images, "--top-k", "2", "--workers", "0", "--device", "cpu", "--out", tmp_path / "p.csv")
    rows = list(csv.reader((tmp_path / "p.csv").open()))
    assert rows[0] == ["path", "class_1", "prob_1", "class_2", "prob_2"] and len(rows) == 6
    assert [r[0] for r in rows[1:]] == [str(p) for p in images]
    assert all(float(r[2]) >= float(r[4]) and float(r[2]) + float(r[4]) <= 1 + 1e-6 for r in rows[1:])
    jsonl = cli_predictions(run, *images, "--top-k", "2", out=tmp_path / "p.jsonl")
    assert [[t["class"] for t in r["top"]] for r in jsonl] == [[r[1], r[3]] for r in rows[1:]]
    folder = tmp_path / "imgs" / "nested"
    folder.mkdir(parents=True)
    for p in images[:2]:
        shutil.copy(p, folder / p.name)
    searched = []  # a folder of a million images is searched once, not once to check and once to predict
    rglob = Path.rglob
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: searched.append(self) or rglob(self, pattern))
    table = ok("predict", run, tmp_path / "imgs", "--workers", "0", "--device", "cpu").output
    assert searched == [tmp_path / "imgs"]
    assert images[0].name in table and images[1].name in table and images[2].name not in table


@pytest.mark.slow
def test_bad_inputs_are_one_line_errors(world, synthetic_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run, image = world["runs"]["linear"], test_images(synthetic_root)[0]
    (tmp_path / "empty").mkdir()
    one_error_line(invoke("predict", run, tmp_path / "empty"), "no images found", "empty")
    one_error_line(invoke("predict", run), "no images named", "--list FILE")
    one_error_line(invoke("predict", run, image, "--top-k", "0"), "--top-k 0")
    one_error_line(invoke("predict", run, tmp_path / "missing.png"), "missing.png: no such file or folder")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    out = tmp_path / "p.csv"
    one_error_line(invoke("predict", run, image, bad, "--workers", "0", "--out", out), "bad.jpg: cannot read image",
                   "--bad-images skip")
    assert not out.exists()
    ok("predict", run, image, bad, "--workers", "0", "--bad-images", "skip", "--out", out)
    assert [r[0] for r in list(csv.reader(out.open()))[1:]] == [str(image)]
    listing = tmp_path / "images.csv"
    listing.write_text(f"{image}\n")
    one_error_line(invoke("predict", run, "--list", listing, "--out", listing), "--out", "would replace the --list file")
    assert listing.read_text() == f"{image}\n"
    copy = tmp_path / "copy.png"
    shutil.copy(image, copy)
    one_error_line(invoke("predict", run, copy, "--out", tmp_path / "p.txt"), "--out", ".csv or .jsonl")
    one_error_line(invoke("predict", run, copy, "--features", world["cache"]), "--features", "--zero-shot")


@pytest.mark.slow  # an extract of the train split: ~3 s
def test_a_cache_whose_weights_changed_is_refused(synthetic_root, tiny_checkpoint, tmp_path):
    weights = tmp_path / "weights.pt"
    shutil.copy(tiny_checkpoint, weights)
    cache = tmp_path / "cache"
    ok("extract", "--data-root", synthetic_root, "--model", TINY_MODEL, "--pretrained", weights, "--splits", "train",
       "--no-tokens", "--workers", "0", "--device", "cpu", "--out", cache)
    state = torch.load(weights)
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, weights)  # other weights, same path
    out = tmp_path / "p.csv"
    one_error_line(invoke("predict", "--zero-shot", "--features", cache, test_images(synthetic_root)[0], "--out", out),
                   "train.h5 was extracted with another encoder", "checkpoint_sha256", "re-extract")
    assert not out.exists()
