"""Metrics against brute-force loops, hand-computed ECE cases and the real Places-LT profile."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import places_lt_train_counts, shared_files
from ltclip.core.errors import LtclipError
from ltclip.evaluation.metrics import average_views, ece, evaluate, shot_groups

REPO = Path(__file__).resolve().parents[1]


def brute_force(logits, labels, counts, bins=15):
    """Every metric of `evaluate`, one sample and one class at a time."""
    n, c = logits.shape
    z = logits.astype(np.float64).tolist()
    y = labels.tolist()
    preds, top5, nll, conf = [], [], [], []
    for row, t in zip(z, y):
        order = sorted(range(c), key=lambda j: (-row[j], j))
        preds.append(order[0])
        top5.append(t in order[:5])
        total = sum(math.exp(v) for v in row)
        nll.append(-math.log(math.exp(row[t]) / total))
        conf.append(math.exp(max(row)) / total)
    per_class, groups = [], []
    for k in range(c):
        idx = [i for i in range(n) if y[i] == k]
        per_class.append(100.0 * sum(preds[i] == k for i in idx) / len(idx) if idx else None)
        groups.append("many" if counts[k] > 100 else "few" if counts[k] < 20 else "medium")
    group_acc = {}
    for g in ("many", "medium", "few"):
        vals = [a for a, gg in zip(per_class, groups) if gg == g and a is not None]
        group_acc[g] = sum(vals) / len(vals) if vals else None
    f1s = []
    for k in sorted(set(y) | set(preds)):
        tp = sum(p == k and t == k for p, t in zip(preds, y))
        fp = sum(p == k and t != k for p, t in zip(preds, y))
        fn = sum(p != k and t == k for p, t in zip(preds, y))
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(100.0 * 2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    gap = 0.0
    for m in range(1, bins + 1):
        members = [i for i in range(n) if (m - 1) / bins < conf[i] <= m / bins]
        if members:
            acc = sum(preds[i] == y[i] for i in members) / len(members)
            gap += len(members) / n * abs(acc - sum(conf[i] for i in members) / len(members))
    errors = Counter((t, p) for t, p in zip(y, preds) if t != p)
    confusions = sorted(((t, p, m) for (t, p), m in errors.items()), key=lambda e: (-e[2], e[0], e[1]))
    present = [a for a in per_class if a is not None]
    return {
        "top1": 100.0 * sum(p == t for p, t in zip(preds, y)) / n,
        "top5": 100.0 * sum(top5) / n,
        **group_acc,
        "balanced_accuracy": sum(present) / len(present),
        "macro_f1": sum(f1s) / len(f1s),
        "nll": sum(nll) / n,
        "ece": 100.0 * gap,
        "per_class": per_class,
        "per_class_count": [y.count(k) for k in range(c)],
        "confusions": confusions[:10],
        "num_samples": n,
    }


def assert_metrics_equal(got, want):
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-4), key
        elif key == "per_class":
            assert [v is None for v in got[key]] == [v is None for v in value]
            known = [v for v in value if v is not None]
            assert [v for v in got[key] if v is not None] == pytest.approx(known)
        else:
            assert got[key] == value, key


def random_case(seed, n=300, c=12, absent=3, scale=2.0, integer=False):
    """Predictions with some skill; the last `absent` classes never appear in the labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c - absent, n)
    if integer:  # few distinct values: many ties
        logits = rng.integers(0, 3, (n, c)).astype(np.float32)
    else:
        logits = (rng.standard_normal((n, c)) * scale).astype(np.float32)
        logits[np.arange(n), labels] += rng.uniform(0, 3, n).astype(np.float32)
    counts = rng.choice([5, 19, 20, 60, 100, 101, 400], c)
    return logits, labels, counts


@pytest.mark.parametrize("seed", range(5))
def test_evaluate_matches_brute_force(seed):
    logits, labels, counts = random_case(seed)
    assert_metrics_equal(evaluate(logits, labels, counts), brute_force(logits, labels, counts))


@pytest.mark.parametrize("seed", range(3))
def test_evaluate_ties_rank_like_argmax(seed):
    logits, labels, counts = random_case(seed, integer=True)
    assert_metrics_equal(evaluate(logits, labels, counts), brute_force(logits, labels, counts))


def test_constant_logits_do_not_inflate_top5():
    labels = np.arange(100) % 10
    got = evaluate(np.zeros((100, 10), np.float32), labels, np.ones(10))
    assert got["top1"] == pytest.approx(10.0)  # always predicts class 0
    assert got["top5"] == pytest.approx(50.0)  # classes 0..4 rank in the top 5


def test_fewer_than_five_classes():
    logits, labels, counts = random_case(7, c=3, absent=0)
    got = evaluate(logits, labels, counts)
    assert got["top5"] == 100.0
    assert_metrics_equal(got, brute_force(logits, labels, counts))


def test_missing_group_is_none_and_torch_inputs_match():
    logits, labels, _ = random_case(3)
    counts = np.full(logits.shape[1], 500)
    got = evaluate(torch.from_numpy(logits), torch.from_numpy(labels), torch.from_numpy(counts))
    assert got["medium"] is None and got["few"] is None
    assert got["many"] == pytest.approx(got["balanced_accuracy"])
    assert got == evaluate(logits, labels, counts)


def test_evaluate_spans_row_blocks(monkeypatch):
    import ltclip.evaluation.metrics as metrics

    logits, labels, counts = random_case(11, n=250)
    whole = evaluate(logits, labels, counts)
    monkeypatch.setattr(metrics, "_ROW_BLOCK", 64)
    assert_metrics_equal(evaluate(logits, labels, counts), whole)


@pytest.mark.parametrize(
    "logits, labels, counts, message",
    [
        (np.zeros((4, 3)), np.array([0, 1, 2, 3]), np.ones(3), "labels must lie in"),
        (np.zeros((4, 3)), np.array([0, 1, 2]), np.ones(3), "labels must have shape"),
        (np.zeros((4, 3)), np.array([0, 1, 2, 0]), np.ones(4), "train_counts has 4 entries"),
        (np.full((4, 3), np.nan), np.array([0, 1, 2, 0]), np.ones(3), "NaN"),
        (np.zeros(3), np.array([0]), np.ones(3), "logits must have shape"),
        (np.zeros((2, 3)), np.array([0.0, 1.0]), np.ones(3), "labels must be integers"),
    ],
)
def test_evaluate_rejects_bad_input(logits, labels, counts, message):
    with pytest.raises(LtclipError, match=message):
        evaluate(logits, labels, counts)


def test_shot_group_boundaries():
    groups = shot_groups([101, 100, 20, 19, 0, 5000])
    assert groups.tolist() == ["many", "medium", "medium", "few", "few", "many"]
    assert shot_groups([10, 50], many_threshold=40, few_threshold=10).tolist() == ["medium", "many"]


@pytest.mark.parametrize(
    "manifest", [pytest.param(None, id="profile")] + [pytest.param(p, id="full") for p in shared_files("Places_LT_train.txt")]
)
def test_shot_groups_on_places_lt_profile(manifest):
    if manifest is None:  # the committed profile of the real file
        counts = places_lt_train_counts()
    else:
        lines = manifest.read_text().splitlines()
        labels = [int(line.split()[-1]) for line in lines if line]
        counts = np.bincount(labels)
    assert len(counts) == 365 and counts.max() == 4980 and counts.min() == 5
    assert Counter(shot_groups(counts).tolist()) == {"many": 131, "medium": 163, "few": 71}


def test_ece_hand_computed_cases():
    assert ece(np.full(10, 0.8), np.arange(10) % 2 == 0) == pytest.approx(30.0)
    calibrated_conf = np.repeat([0.5, 0.75, 0.9], [4, 4, 10])
    calibrated_hit = np.array([1, 1, 0, 0] + [1, 1, 1, 0] + [1] * 9 + [0])
    assert ece(calibrated_conf, calibrated_hit) == pytest.approx(0.0, abs=1e-9)
    # 10 samples at 0.95 all right (gap 0.05), 10 at 0.6 with 3 right (gap 0.3): (5 + 30) / 2
    two_bins = ece(np.repeat([0.95, 0.6], 10), np.array([1] * 10 + [1] * 3 + [0] * 7))
    assert two_bins == pytest.approx(17.5)
    # One bin: |overall accuracy - mean confidence|
    assert ece([0.2, 0.9, 1.0], [1, 1, 0], bins=1) == pytest.approx(100 * abs(2 / 3 - 0.7))
    assert ece([], []) == 0.0


def test_ece_rejects_mismatched_lengths():
    with pytest.raises(LtclipError, match="confidences"):
        ece([0.5, 0.6], [1])


def test_average_views():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_allclose(average_views(x), x.mean(axis=1))
    np.testing.assert_array_equal(average_views(torch.from_numpy(x), "first"), x[:, 0])
    with pytest.raises(LtclipError, match="unknown view mode"):
        average_views(x, "max")
    with pytest.raises(LtclipError, match="views"):
        average_views(x[0])


@pytest.mark.slow
def test_benchmark_quick_run(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_eval", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "eval.json").is_file()
    assert "| evaluate" in result.stdout
