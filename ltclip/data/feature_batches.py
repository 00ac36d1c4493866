"""Batches of head inputs (pooled embeddings or token sequences) from a feature cache.

Inputs live in RAM when they fit under ``max_ram`` (default: half of the memory available);
otherwise token sequences are streamed from
the HDF5 file, a batch at a time, by a prefetching thread, so resident memory stays bounded by a
few batches whatever the cache size. The order always comes from the caller (the sampler).
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Iterator

import numpy as np
import torch

from ..errors import LtclipError
from ..store import FeatureCache

INPUT_KINDS = ("embeds", "tokens")


class FeatureInputs:
    """The rows of one cache file as model inputs; ``in_ram`` tells which path is used."""

    def __init__(self, cache: FeatureCache, kind: str, max_ram: int | None = None):
        if kind not in INPUT_KINDS:
            raise ValueError(f"input kind must be one of {INPUT_KINDS}")
        if kind == "tokens" and not cache.has_tokens:
            raise LtclipError(f"{cache.path} has no token sequences; re-extract with --tokens or use an embeds head")
        self.cache = cache
        self.kind = kind
        self.views = cache.views
        self.labels = cache.labels
        row_shape = (cache.views, cache.embed_dim) if kind == "embeds" else (cache.views, *cache.token_shape)
        self.row_shape = row_shape
        self.dtype = cache.embed_dtype if kind == "embeds" else cache.token_dtype  # as stored
        self.nbytes = cache.num_rows * int(np.prod(row_shape)) * self.dtype.itemsize
        self.max_ram = default_max_ram() if max_ram is None else max_ram
        self.in_ram = kind == "embeds" or self.max_ram is None or self.nbytes <= self.max_ram
        self._data = None
        if self.in_ram:
            self._data = cache.load_embeds() if kind == "embeds" else self._load_tokens()

    def _load_tokens(self) -> np.ndarray:
        out = np.empty((self.cache.num_rows, *self.row_shape), self.dtype)
        for start, block in self.cache.iter_token_blocks(4096):
            out[start : start + len(block)] = block
        return out

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """``[len(indices), V, ...]`` in the stored dtype (``self.dtype``), for any indices (any
        order, repeats allowed)."""
        if self._data is not None:
            return self._data[indices]
        return self.cache.read_tokens(indices)

    def batches(
        self, order: np.ndarray, batch_size: int, view_of: np.ndarray | None = None, prefetch: int = 2
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
        """``(x float32, y int64, rows)`` batches over ``order``.

        ``view_of[i]`` picks one stored view for position ``i`` (training on augmented views);
        without it every view is returned (``x`` keeps its view axis, for test-time averaging).
        Streamed inputs are read ``prefetch`` batches ahead in a background thread.
        """
        order = np.asarray(order, dtype=np.int64)
        starts = range(0, len(order), batch_size)

        def load(start: int):
            idx = order[start : start + batch_size]
            x = self.rows(idx)
            if view_of is not None:
                x = x[np.arange(len(idx)), view_of[start : start + batch_size]]
            # numpy's cast stays on this thread: torch's would take intra-op threads from the step
            return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(self.labels[idx]), idx

        if self.in_ram:
            for start in starts:
                yield load(start)
            return
        yield from _prefetched(load, starts, prefetch)


def _prefetched(load, starts, depth: int):
    """Run ``load`` over ``starts`` in a thread, at most ``depth`` results ahead; errors re-raised."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def worker():
        try:
            for start in starts:
                if stop.is_set():
                    return
                q.put(load(start))
            q.put(done)
        except BaseException as err:  # handed to the consumer
            q.put(err)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a worker waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


def default_max_ram() -> int | None:
    """Half of the memory available now (None where the OS does not say): above it, stream."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return None


def parse_size(text: str | None) -> int | None:
    """``"4G"``, ``"512M"``, ``"1.5GiB"`` or bytes → bytes; None/empty → None (no cap)."""
    if not text:
        return None
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in units else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise LtclipError(f"--max-ram {text!r}: expected a size like 8G or 512M") from None
    if value <= 0:
        raise LtclipError(f"--max-ram {text!r}: must be positive")
    return int(value * units[unit])
