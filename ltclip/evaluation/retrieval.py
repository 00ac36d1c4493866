"""kNN and nearest-class-mean classification on L2-normalised embeddings (cosine = inner product).

Exact top-k search uses faiss when it is installed (a GPU index when faiss has GPU support
and sees a GPU) and otherwise a pure-torch ``topk(q @ db.T)`` in memory-bounded query batches;
both return the same neighbours. Inputs may be numpy arrays or torch tensors; results are numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..config.values import SEARCH_BACKENDS as BACKENDS
from ..core.errors import LtclipError
from .metrics import as_numpy

# Mixing weight of the uniform distribution in kNN probabilities, so their log is finite.
KNN_EPS = 1e-6
# Largest similarity block the torch backend materialises at once (bytes).
_TORCH_BLOCK_BYTES = 256 * 2**20
# faiss GPU indexes only support k up to this value.
_FAISS_GPU_MAX_K = 2048


def _float32(x: Any) -> np.ndarray:
    return np.ascontiguousarray(as_numpy(x, np.float32))


def normalise(x: Any) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm (float32); all-zero rows stay zero."""
    v = _float32(x)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(norms, np.finfo(np.float32).tiny)


def _faiss():
    """The faiss module, or None when it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _faiss_search(faiss, q: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatIP(db.shape[1])
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 and k <= _FAISS_GPU_MAX_K:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(db)
    sims, idx = index.search(q, k)
    return sims, idx.astype(np.int64, copy=False)


def _torch_search(q: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dbt = torch.from_numpy(db).to(device)
    batch = max(1, _TORCH_BLOCK_BYTES // (4 * db.shape[0]))
    sims = np.empty((len(q), k), np.float32)
    idx = np.empty((len(q), k), np.int64)
    with torch.no_grad():
        for start in range(0, len(q), batch):
            s, i = torch.topk(torch.from_numpy(q[start : start + batch]).to(device) @ dbt.T, k, dim=1)
            sims[start : start + batch], idx[start : start + batch] = s.cpu().numpy(), i.cpu().numpy()
    return sims, idx


def search(queries: Any, database: Any, k: int, *, backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k: (similarities [N, k] float32, database indices [N, k] int64),
    best first. Pass normalised vectors (see :func:`normalise`) for cosine similarity.

    ``backend``: "faiss" (IndexFlatIP; on all GPUs when faiss has GPU support and k <= 2048),
    "torch" (``topk(q @ db.T)`` on CUDA when available, else CPU), or "auto" (faiss if installed).
    """
    if backend not in BACKENDS:
        raise LtclipError(f"unknown search backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    q, db = _float32(queries), _float32(database)
    if q.ndim != 2 or db.ndim != 2 or q.shape[1] != db.shape[1]:
        raise LtclipError(
            f"queries {q.shape} and database {db.shape} must both be [rows, dim] with the same dim; "
            "use embeddings from the same model"
        )
    if not 1 <= k <= len(db):
        raise LtclipError(f"k={k} must be between 1 and the database size {len(db)}; choose a smaller k")
    faiss = _faiss() if backend != "torch" else None
    if backend == "faiss" and faiss is None:
        raise LtclipError(
            "backend 'faiss' needs faiss: pip install 'ltclip[cpu]' (or 'ltclip[gpu]'), "
            "or use backend 'torch'"
        )
    if faiss is not None:
        return _faiss_search(faiss, q, db, k)
    return _torch_search(q, db, k)


def _labels(labels: Any, rows: int, num_classes: int) -> np.ndarray:
    y = as_numpy(labels)
    if not np.issubdtype(y.dtype, np.integer):
        raise LtclipError(f"labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64, copy=False)
    if y.shape != (rows,):
        raise LtclipError(f"expected {rows} labels (one per embedding), got shape {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise LtclipError(f"labels must lie in [0, {num_classes}); found {y.min()}..{y.max()}")
    return y


def knn_logits(
    queries: Any,
    db_embeds: Any,
    db_labels: Any,
    num_classes: int,
    k: int = 10,
    temperature: float = 0.07,
    backend: str = "auto",
) -> np.ndarray:
    """kNN class log-probabilities [N, C] from similarity-weighted neighbour votes.

    Queries and database are L2-normalised here (raw cached embeddings are fine). Each of the
    k nearest neighbours adds exp(cosine / temperature) to its class; the votes are normalised
    per query, mixed with the uniform distribution at weight ``KNN_EPS`` (so classes without a
    vote get a finite log-probability), and returned as logs. These are proper log-probabilities,
    directly comparable with log-softmax of model logits (see :func:`retrieval_mix`).
    """
    if temperature <= 0:
        raise LtclipError(f"temperature must be > 0, got {temperature}")
    db = normalise(db_embeds)
    y = _labels(db_labels, len(db), num_classes)
    sims, idx = search(normalise(queries), db, k, backend=backend)
    # Shifting by the best similarity leaves the normalised votes unchanged and cannot overflow.
    w = np.exp((sims - sims[:, :1]) / temperature)
    votes = np.zeros((len(sims), num_classes), np.float32)
    np.add.at(votes, (np.arange(len(sims))[:, None], y[idx]), w)
    votes /= votes.sum(axis=1, keepdims=True)
    return np.log((1.0 - KNN_EPS) * votes + KNN_EPS / num_classes)


def class_means(embeds: Any, labels: Any, num_classes: int) -> np.ndarray:
    """Per-class mean of the normalised embeddings, renormalised: [C, D] float32.

    A class without samples gets the zero vector, i.e. cosine 0 with every query in
    :func:`ncm_logits` (it still outranks classes whose similarity is negative).
    """
    x = normalise(embeds)
    y = _labels(labels, len(x), num_classes)
    sums = torch.zeros(num_classes, x.shape[1], dtype=torch.float64)
    sums.index_add_(0, torch.from_numpy(y), torch.from_numpy(x).double())
    return normalise(sums.numpy())


def ncm_logits(queries: Any, means: Any) -> np.ndarray:
    """Nearest-class-mean logits [N, C]: cosine similarity of each query to each class mean."""
    q, m = normalise(queries), normalise(means)
    if q.shape[-1] != m.shape[-1]:
        raise LtclipError(
            f"queries have dim {q.shape[-1]} but class means have dim {m.shape[-1]}; use the same model"
        )
    return q @ m.T


def retrieval_mix(model_logits: Any, knn_log_probs: Any, alpha: float) -> np.ndarray:
    """Log of the mixture (1 - alpha) * softmax(model_logits) + alpha * exp(knn_log_probs).

    Mixing probabilities (not logits) keeps the result a proper distribution for any alpha
    in [0, 1]: alpha 0 gives the model's log-softmax, alpha 1 the kNN log-probabilities.
    """
    if not 0.0 <= alpha <= 1.0:
        raise LtclipError(f"alpha must be in [0, 1], got {alpha}")
    z = as_numpy(model_logits, np.float32)
    knn = as_numpy(knn_log_probs, np.float32)
    if z.shape != knn.shape:
        raise LtclipError(f"model logits {z.shape} and kNN log-probabilities {knn.shape} differ in shape")
    z = z - z.max(axis=-1, keepdims=True)
    log_softmax = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    with np.errstate(divide="ignore"):  # log(0) = -inf is exact at alpha 0 or 1
        return np.logaddexp(np.float32(np.log1p(-alpha)) + log_softmax, np.float32(np.log(alpha)) + knn)
