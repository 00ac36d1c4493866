"""`ltclip eval`: runs and baselines, test-time views, retrieval mix, reports, bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import write_cache
from ltclip.cli import app
from ltclip.config import TrainHeadConfig, from_flat
from ltclip.evaluation.metrics import evaluate
from ltclip.evaluation.retrieval import knn_logits, normalise
from ltclip.stages.train_head import run_train_head
from ltclip.artifacts.store import save_text_embeddings

runner = CliRunner()
C, D = 6, 8


def make_features(folder, seed=0, dataset="gaussian", test_views=1):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((C, D)) * 2
    counts = [40, 30, 20, 10, 5, 3]
    for split, sizes in (("train", counts), ("val", [6] * C), ("test", [8] * C)):
        y = np.repeat(np.arange(C), sizes)
        views = test_views if split == "test" else 1
        x = means[y][:, None] + rng.standard_normal((len(y), views, D))
        write_cache(folder, split, x[:, 0] if views == 1 else x, y, C, dataset=dataset)
    text = normalise(means + 0.5 * rng.standard_normal((C, D)))
    save_text_embeddings(folder / "text.h5", text, [f"class {i}" for i in range(C)], ["a photo of a {}."], {"dataset": dataset})
    return means


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    make_features(root / "features", test_views=3)
    run_train_head(head_config(features=str(root / "features"), out=str(root / "run"), head="linear",
                               loss="balanced_softmax", epochs=3, lr=1e-2, device="cpu"))
    return root


def head_config(**options) -> TrainHeadConfig:
    return from_flat(TrainHeadConfig, options, owner="test")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_run_metrics_average_test_views_and_land_in_eval_json(setup):
    from ltclip.artifacts.feature_batches import FeatureInputs
    from ltclip.artifacts.runs import load_run
    from ltclip.artifacts.store import FeatureCache

    result = invoke("eval", setup / "run", "--json", setup / "out.json")
    assert result.exit_code == 0, result.output
    saved = json.loads((setup / "run" / "eval.json").read_text())
    for key in ("top1", "top5", "many", "medium", "few", "balanced_accuracy", "macro_f1", "ece", "nll", "per_class", "run_dir"):
        assert key in saved
    run = load_run(setup / "run")
    with FeatureCache(setup / "features" / "test.h5") as cache:
        per_view = run.model.predict(FeatureInputs(cache, "embeds"))
        labels, counts = cache.labels, [40, 30, 20, 10, 5, 3]
    assert per_view.shape[1] == 3
    expected = evaluate(per_view.mean(1), labels, counts)
    assert saved["top1"] == pytest.approx(expected["top1"]) and saved["nll"] == pytest.approx(expected["nll"])
    assert invoke("eval", setup / "run", "--views", "first", "--json", setup / "first.json").exit_code == 0
    assert json.loads((setup / "first.json").read_text())["results"][0]["top1"] == pytest.approx(evaluate(per_view[:, 0], labels, counts)["top1"])


def test_zero_shot_knn_and_ncm_baselines_match_numpy(setup):
    from ltclip.artifacts.store import FeatureCache, load_text_embeddings

    result = invoke("eval", "--zero-shot", "--knn", "3", "--ncm", "--features", setup / "features", "--json", setup / "b.json", "--backend", "torch")
    assert result.exit_code == 0, result.output
    rows = {r["kind"]: r for r in json.loads((setup / "b.json").read_text())["results"]}
    with FeatureCache(setup / "features" / "test.h5") as test, FeatureCache(setup / "features" / "train.h5") as train:
        x = test.load_embeds().astype(np.float64)
        y = test.labels
        db, db_y = train.load_embeds()[:, 0].astype(np.float64), train.labels
    text = load_text_embeddings(setup / "features" / "text.h5").embeds
    unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
    zs_pred = np.argmax((unit @ text.T).mean(1), axis=1)  # mean of per-view logits
    assert rows["zero-shot"]["top1"] == pytest.approx(100 * np.mean(zs_pred == y))
    q = unit.mean(1)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    dbn = db / np.linalg.norm(db, axis=1, keepdims=True)
    means = np.stack([dbn[db_y == c].mean(0) for c in range(C)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    assert rows["ncm"]["top1"] == pytest.approx(100 * np.mean(np.argmax(q @ means.T, 1) == y))
    nn = np.argsort(-(q @ dbn.T), axis=1)[:, :3]  # brute-force neighbours, similarity-weighted votes
    votes = np.zeros((len(q), C))
    for i in range(len(q)):
        for j in nn[i]:
            votes[i, db_y[j]] += np.exp((q[i] @ dbn[j] - (q[i] @ dbn[nn[i, 0]])) / 0.07)
    assert rows["knn"]["top1"] == pytest.approx(100 * np.mean(np.argmax(votes, 1) == y))


def test_retrieval_mix_limits(setup):
    assert invoke("eval", setup / "run", "--json", setup / "base.json").exit_code == 0
    assert invoke("eval", setup / "run", "--retrieval-mix", "0", "--json", setup / "m0.json").exit_code == 0
    assert invoke("eval", setup / "run", "--retrieval-mix", "1", "--retrieval-k", "3", "--json", setup / "m1.json").exit_code == 0
    assert invoke("eval", "--knn", "3", "--features", setup / "features", "--json", setup / "k.json").exit_code == 0
    m0, m1 = (json.loads((setup / f).read_text())["results"][0] for f in ("m0.json", "m1.json"))
    knn = json.loads((setup / "k.json").read_text())["results"][0]
    base = json.loads((setup / "base.json").read_text())["results"][0]
    assert m0["top1"] == pytest.approx(base["top1"]) and m0["nll"] == pytest.approx(base["nll"])
    assert m1["top1"] == pytest.approx(knn["top1"]) and "kNN mix 1" in m1["name"]


def test_report_numbers_equal_eval_json(setup):
    result = invoke("eval", setup / "run", "--zero-shot", "--features", setup / "features", "--report", setup / "table.md",
                    "--csv", setup / "t.csv", "--plot", setup / "p.png", "--json", setup / "t.json")
    assert result.exit_code == 0, result.output
    saved = json.loads((setup / "run" / "eval.json").read_text())
    table = (setup / "table.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("|") and "---" not in line]
    assert lines[1].startswith("| zero-shot")  # zero-shot row first
    run_row = [c.strip().strip("*") for c in lines[2].strip("|").split("|")]
    for cell, key in zip(run_row[1:5], ("many", "medium", "few", "top1")):
        assert cell == ("—" if saved[key] is None else f"{saved[key]:.1f}")
    assert (setup / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"top1", (setup / "t.csv").read_text().splitlines()[0])


def test_changed_cache_is_refused_naming_both(setup, tmp_path):
    import shutil

    features = tmp_path / "features"
    make_features(features, seed=0)
    run_train_head(head_config(features=str(features), out=str(tmp_path / "run"), head="linear", epochs=1, device="cpu"))
    shutil.rmtree(features)
    make_features(features, seed=1)  # same shapes, different numbers
    result = invoke("eval", tmp_path / "run")
    assert result.exit_code == 2 and "fingerprint" in result.output and str(features / "train.h5") in result.output
    assert not (tmp_path / "run" / "eval.json").exists()


def test_missing_split_mixed_datasets_and_nothing_to_do(setup, tmp_path, monkeypatch):
    result = invoke("eval", setup / "run", "--split", "holdout")
    assert result.exit_code == 2 and "no 'holdout' split" in result.output
    make_features(tmp_path / "other", dataset="other")
    run_train_head(head_config(features=str(tmp_path / "other"), out=str(tmp_path / "run2"), head="linear", epochs=1, device="cpu"))
    result = invoke("eval", setup / "run", tmp_path / "run2")
    assert result.exit_code == 2 and "--allow-mixed" in result.output
    assert invoke("eval", setup / "run", tmp_path / "run2", "--allow-mixed").exit_code == 0
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")  # no runs/ here (the session's folder may hold other tests' runs)
    result = invoke("eval")
    assert result.exit_code == 2 and "nothing to evaluate" in result.output
    result = invoke("eval", "--zero-shot")
    assert result.exit_code == 2 and "--features" in result.output
