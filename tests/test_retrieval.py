"""kNN, NCM and retrieval mixing against numpy brute force and hand-computed examples."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

import ltclip.evaluation.retrieval as retrieval
from ltclip.core.errors import LtclipError
from ltclip.evaluation.retrieval import KNN_EPS, class_means, knn_logits, ncm_logits, normalise, retrieval_mix, search

try:
    import faiss  # noqa: F401

    BACKENDS = ["faiss", "torch"]
except ImportError:
    BACKENDS = ["torch"]


def embeddings(seed, n, d=16):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def brute_neighbours(q, db, k):
    sims = q.astype(np.float64) @ db.astype(np.float64).T
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, idx, axis=1), idx


def test_normalise():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(normalise(x), [[0.6, 0.8], [0.0, 0.0]])
    np.testing.assert_allclose(normalise(torch.tensor(x)), normalise(x))
    assert normalise(x).dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(normalise(embeddings(0, 50)), axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(3))
def test_search_matches_brute_force(backend, seed):
    q, db = normalise(embeddings(seed, 40)), normalise(embeddings(seed + 100, 300))
    sims, idx = search(q, db, 7, backend=backend)
    want_sims, want_idx = brute_neighbours(q, db, 7)
    assert sims.shape == idx.shape == (40, 7) and sims.dtype == np.float32 and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)


@pytest.mark.skipif("faiss" not in BACKENDS, reason="faiss is not installed")
def test_faiss_and_torch_agree():
    q, db = normalise(embeddings(5, 500, 64)), normalise(embeddings(6, 5000, 64))
    sims_f, idx_f = search(q, db, 10, backend="faiss")
    sims_t, idx_t = search(q, db, 10, backend="torch")
    np.testing.assert_array_equal(idx_f, idx_t)
    np.testing.assert_allclose(sims_f, sims_t, atol=1e-5)


def test_torch_backend_across_query_batches(monkeypatch):
    q, db = embeddings(1, 37), embeddings(2, 100)
    monkeypatch.setattr(retrieval, "_TORCH_BLOCK_BYTES", 4 * 100 * 5)  # 5 queries per batch
    np.testing.assert_array_equal(search(q, db, 3, backend="torch")[1], brute_neighbours(q, db, 3)[1])


def test_missing_faiss(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    q, db = embeddings(3, 10), embeddings(4, 50)
    with pytest.raises(LtclipError, match=r"pip install 'ltclip\[cpu\]'"):
        search(q, db, 3, backend="faiss")
    np.testing.assert_array_equal(search(q, db, 3)[1], brute_neighbours(q, db, 3)[1])  # auto → torch


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 51}, "between 1 and the database size 50"),
        ({"k": 0}, "between 1"),
        ({"backend": "annoy"}, "unknown search backend"),
        ({"database": embeddings(0, 50, 8)}, "same dim"),
    ],
)
def test_search_rejects_bad_input(kwargs, message):
    args = {"queries": embeddings(1, 5), "database": embeddings(0, 50), "k": 3, **kwargs}
    with pytest.raises(LtclipError, match=message):
        search(**args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_logits_hand_computed(backend):
    db = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    labels = np.array([0, 1, 1, 2])
    # Query [2, 0] normalises to [1, 0]: similarities 1, 0, -1, 0.6 → neighbours 0 (class 0),
    # 3 (class 2), 1 (class 1) with weights e^(1/0.5), e^(0.6/0.5), e^(0/0.5); class 3 gets none.
    got = knn_logits(np.array([[2.0, 0.0]]), db, labels, num_classes=4, k=3, temperature=0.5, backend=backend)
    votes = np.array([math.exp(2.0), math.exp(0.0), math.exp(1.2), 0.0])
    want = np.log((1 - KNN_EPS) * votes / votes.sum() + KNN_EPS / 4)
    np.testing.assert_allclose(got, want[None], rtol=1e-5)
    assert got[0, 3] == pytest.approx(math.log(KNN_EPS / 4), rel=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_knn_logits_match_brute_force(seed):
    q, db = embeddings(seed, 30), embeddings(seed + 10, 200)
    labels = np.random.default_rng(seed).integers(0, 6, 200)
    got = knn_logits(q, db, labels, num_classes=7, k=5, temperature=0.1)
    qn, dbn = q / np.linalg.norm(q, axis=1, keepdims=True), db / np.linalg.norm(db, axis=1, keepdims=True)
    sims, idx = brute_neighbours(qn, dbn, 5)
    for i in range(len(q)):
        votes = np.zeros(7)
        for s, j in zip(sims[i], idx[i]):
            votes[labels[j]] += math.exp(s / 0.1)
        want = np.log((1 - KNN_EPS) * votes / votes.sum() + KNN_EPS / 7)
        np.testing.assert_allclose(got[i], want, rtol=1e-4)
    np.testing.assert_allclose(np.exp(got).sum(axis=1), 1.0, rtol=1e-5)


def test_knn_logits_tiny_temperature_stays_finite():
    q, db = embeddings(0, 10), embeddings(1, 100)
    got = knn_logits(q, db, np.arange(100) % 4, num_classes=4, temperature=1e-4)
    assert np.isfinite(got).all()


def test_knn_logits_reject_bad_labels():
    with pytest.raises(LtclipError, match="labels must lie"):
        knn_logits(embeddings(0, 3), embeddings(1, 10), np.arange(10), num_classes=5)
    with pytest.raises(LtclipError, match="integers"):
        knn_logits(embeddings(0, 3), embeddings(1, 10), np.zeros(10), num_classes=5)
    with pytest.raises(LtclipError, match="expected 10 labels"):
        knn_logits(embeddings(0, 3), embeddings(1, 10), np.arange(9), num_classes=10)


def test_class_means_and_ncm_match_brute_force():
    x = embeddings(0, 120)
    labels = np.random.default_rng(0).integers(0, 4, 120)  # class 4 has no samples
    means = class_means(torch.from_numpy(x), labels, num_classes=5)
    for c in range(4):
        rows = x[labels == c] / np.linalg.norm(x[labels == c], axis=1, keepdims=True)
        mean = rows.mean(axis=0)
        np.testing.assert_allclose(means[c], mean / np.linalg.norm(mean), atol=1e-6)
    np.testing.assert_array_equal(means[4], 0.0)

    q = embeddings(1, 25)
    logits = ncm_logits(q, means)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    np.testing.assert_allclose(logits, qn @ means.T, atol=1e-6)
    np.testing.assert_array_equal(logits[:, 4], 0.0)
    nearest = np.argsort(-(qn @ means.T), axis=1, kind="stable")[:, 0]
    np.testing.assert_array_equal(logits.argmax(axis=1), nearest)


def test_retrieval_mix():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((6, 5)).astype(np.float32)
    knn = knn_logits(embeddings(0, 6), embeddings(1, 40), np.arange(40) % 5, num_classes=5, k=4)
    softmax = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(retrieval_mix(z, knn, 0.0), np.log(softmax), atol=1e-5)
    np.testing.assert_allclose(retrieval_mix(z, knn, 1.0), knn, atol=1e-5)
    mixed = retrieval_mix(torch.from_numpy(z), knn, 0.3)
    np.testing.assert_allclose(mixed, np.log(0.7 * softmax + 0.3 * np.exp(knn)), atol=1e-5)
    np.testing.assert_allclose(np.exp(mixed).sum(axis=1), 1.0, rtol=1e-5)
    with pytest.raises(LtclipError, match="alpha"):
        retrieval_mix(z, knn, 1.5)
    with pytest.raises(LtclipError, match="shape"):
        retrieval_mix(z[:, :4], knn, 0.5)
