"""Batches of head inputs (pooled embeddings or token sequences) from a feature cache.

Inputs live in RAM when they fit under ``max_ram`` (default: half of the memory available), held
in the cache's stored format (int8 / fp8 / pooled / PCA tokens stay that small in RAM); otherwise
token rows are streamed from the HDF5 file by a prefetching thread, so resident memory stays
bounded by a few batches whatever the cache size. Stored rows are decoded on ``device``: on the
CPU in the loading thread, on a GPU after a transfer of the stored (small) rows. The order always
comes from the caller (the sampler; :class:`~ltclip.data.samplers.BlockShuffledSampler` for slow disks).
"""

from __future__ import annotations

import math
import os
import queue
import threading
from typing import Iterator

import numpy as np
import torch

from ..core.errors import LtclipError
from .store import EncodedTokens, FeatureCache

INPUT_KINDS = ("embeds", "tokens", "pooled")


class FeatureInputs:
    """The rows of one cache file as model inputs; ``in_ram`` tells which path is used.

    ``dtype`` is the stored dtype and ``nbytes`` the stored size (values and scales) of all rows;
    ``row_shape`` is one row as the head sees it, ``(V, D)``, ``(V, W)`` (``pooled``) or ``(V, T', W)``.
    """

    def __init__(self, cache: FeatureCache, kind: str, max_ram: int | None = None, device: str | torch.device | None = None):
        if kind not in INPUT_KINDS:
            raise ValueError(f"input kind must be one of {INPUT_KINDS}")
        if kind == "tokens" and not cache.has_tokens:
            raise LtclipError(f"{cache.path} has no token sequences; re-extract with --tokens or use an embeds head")
        if kind == "pooled" and not cache.has_pooled:
            raise LtclipError(f"{cache.path} has no pooled features (input=pooled reads the ViT's feature before the "
                              "projection); re-extract with --pooled")
        self.cache = cache
        self.kind = kind
        self.views = cache.views
        self.labels = cache.labels
        self.device = torch.device("cpu" if device is None else device)
        self.codec = cache.codec if kind == "tokens" else None
        self.plain = self.codec is None or self.codec.format.is_plain  # decoding is a cast to float32
        vector = {"embeds": (cache.embed_dim, cache.embed_dtype), "pooled": (cache.pooled_dim, cache.pooled_dtype)}
        if kind in vector:  # one vector per view, always held in RAM
            width, self.dtype = vector[kind]
            self.row_shape = (cache.views, width)
            row_bytes = cache.views * width * self.dtype.itemsize
        else:
            self.row_shape, self.dtype = (cache.views, *cache.token_shape), cache.token_dtype  # as stored
            row_bytes = cache.token_row_bytes
        self.nbytes = cache.num_rows * row_bytes
        self.max_ram = default_max_ram() if max_ram is None else max_ram
        self.in_ram = kind in vector or self.max_ram is None or self.nbytes <= self.max_ram
        self._data: EncodedTokens | None = None
        if self.in_ram:
            loaders = {"embeds": cache.load_embeds, "pooled": cache.load_pooled}
            self._data = EncodedTokens(loaders[kind](), None) if kind in vector else self._load_tokens()
            check_finite(cache.path, self._data)

    def _load_tokens(self) -> EncodedTokens:
        """Every stored token row (and its scales), read in slices of 4,096 rows."""
        names = ("tokens", "token_scales") if self.codec.format.scale != "none" else ("tokens",)
        n = self.cache.num_rows
        empty = [self.cache.read_rows(name, 0, 0) for name in names]
        arrays = [np.empty((n, *e.shape[1:]), e.dtype) for e in empty]
        for start in range(0, n, 4096):
            stop = min(start + 4096, n)
            for name, out in zip(names, arrays):
                out[start:stop] = self.cache.read_rows(name, start, stop)
        return EncodedTokens(arrays[0], arrays[1] if len(arrays) > 1 else None)

    def stored_rows(self, indices: np.ndarray) -> EncodedTokens:
        """Rows ``indices`` (any order, repeats allowed) as stored, ``[len(indices), V, ...]``."""
        if self._data is not None:
            values, scales = self._data
            return EncodedTokens(values[indices], None if scales is None else scales[indices])
        return self.cache.read_token_parts(indices)

    def decode(self, rows: EncodedTokens) -> torch.Tensor:
        """float32 inputs from stored rows, on the device the rows are on (numpy rows: the CPU).

        Plain rows are cast with numpy on the CPU (on the loading thread; torch's cast would take
        intra-op threads from the step); others are decoded by the cache's codec with torch.
        """
        values, scales = rows
        if isinstance(values, np.ndarray):
            if self.plain:
                return torch.from_numpy(values.astype(np.float32))
            values, scales = torch.from_numpy(values), None if scales is None else torch.from_numpy(scales)
        return values.float() if self.plain else self.codec.decode(values, scales)

    def rows(self, indices: np.ndarray) -> torch.Tensor:
        """``[len(indices), V, ...]`` float32 inputs on the CPU, for any indices."""
        return self.decode(self.stored_rows(indices))

    def batches(
        self, order: np.ndarray, batch_size: int, view_of: np.ndarray | None = None, prefetch: int = 2,
        read_ahead: int = 1,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
        """``(x float32, y int64, rows)`` batches over ``order``; ``x`` is on ``device``.

        ``view_of[i]`` picks one stored view for position ``i`` (training on augmented views);
        without it every view is returned (``x`` keeps its view axis, for test-time averaging).
        A background thread loads ``prefetch`` batches ahead (streamed inputs, or in-RAM ones that
        need decoding; ``prefetch=0``: all in this thread, the same batches). Streamed rows of
        ``read_ahead`` batches are read together (one read per contiguous run of their rows: with
        a :class:`~ltclip.data.samplers.BlockShuffledSampler`'s order, a few long reads).
        """
        order = np.asarray(order, dtype=np.int64)
        if batch_size < 1 or read_ahead < 1 or prefetch < 0:
            raise ValueError("batch_size and read_ahead must be >= 1 and prefetch >= 0")
        chunk = batch_size * read_ahead
        on_cpu = self.device.type == "cpu"

        def load(start: int):
            """The batches of positions ``[start, start + chunk)``: decoded on the CPU, else as stored."""
            idx = order[start : start + chunk]
            stored = self.stored_rows(idx)
            if not self.in_ram:  # rows held in RAM were checked once, when loaded
                check_finite(self.cache.path, stored, idx)
            if view_of is not None:
                pick = (np.arange(len(idx)), view_of[start : start + chunk])
                stored = EncodedTokens(stored.values[pick], None if stored.scales is None else stored.scales[pick])
            out = []
            for lo in range(0, len(idx), batch_size):
                part = EncodedTokens(stored.values[lo : lo + batch_size],
                                     None if stored.scales is None else stored.scales[lo : lo + batch_size])
                rows = idx[lo : lo + batch_size]
                out.append((self.decode(part) if on_cpu else _tensors(part, self.device.type == "cuda"),
                            torch.from_numpy(self.labels[rows]), rows))
            return out

        def finish(batch):
            x, y, rows = batch
            if not on_cpu:  # the stored rows cross to the device, and are decoded there
                x = self.decode(EncodedTokens(*(None if a is None else a.to(self.device, non_blocking=True) for a in x)))
            return x, y, rows

        starts = range(0, len(order), chunk)
        threaded = prefetch > 0 and (not self.in_ram or not self.plain)
        chunks = _prefetched(load, starts, max(1, math.ceil(prefetch / read_ahead))) if threaded else map(load, starts)
        for loaded in chunks:
            for batch in loaded:
                yield finish(batch)


def check_finite(path, stored: EncodedTokens, rows: np.ndarray | None = None, block: int = 65536) -> None:
    """Refuse stored rows holding NaN or Inf, naming the cache file and the first such row
    (``rows``: the rows' indices in the file; default their positions). Checked in blocks of rows."""
    for array in stored:
        if array is None or not np.issubdtype(array.dtype, np.floating):
            continue
        for start in range(0, len(array), block):
            part = array[start : start + block]
            finite = np.isfinite(part.reshape(len(part), -1)).all(axis=1)
            if not finite.all():
                at = start + int(np.argmin(finite))
                raise LtclipError(f"{path} row {int(rows[at]) if rows is not None else at}: its features hold NaN or Inf; "
                                  "re-extract the cache (or remove that row)")


def _tensors(rows: EncodedTokens, pin: bool) -> EncodedTokens:
    """Stored rows as tensors, in page-locked memory with ``pin`` (an asynchronous copy to a GPU)."""
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return EncodedTokens(*(None if a is None else as_tensor(a).pin_memory() if pin else as_tensor(a) for a in rows))


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


def format_size(nbytes: float) -> str:
    """Bytes as ``"812 B"``, ``"1.3 KiB"``, ``"206 MiB"``, ``"4.9 GiB"`` (what :func:`parse_size` reads)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:,.0f} {unit}"
    return f"{nbytes:.0f} B"
