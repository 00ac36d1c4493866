"""Writing feature caches: :class:`FeatureWriter` (block by block, resumable, optionally one shard
of a multi-process run) and :func:`write_arrays` (a whole cache from in-memory arrays).

The crash-safety protocol is described in ``docs/artifacts.md``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import torch

from ...core.errors import LtclipError
from ._h5 import (
    ABSENT,
    FEATURES_KIND,
    IO_ERRORS,
    STATUS_KEYS,
    atomic_h5,
    file_attrs,
    header,
    identity_attrs,
    open_h5,
    preallocated,
    read_strings,
    same,
    show,
    strings,
    sync,
    write_error,
)
from .tokens import BASIS_DATASETS, STORED_DTYPES, EncodedTokens, TokenCodec, TokenFormat


# ----------------------------------------------------------------------------- shard layout


def shard_path(path: str | os.PathLike, rank: int) -> Path:
    """Where rank ``rank`` writes its part of ``path`` (``train.h5`` -> ``train.rank3.h5``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def shard_range(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous, unpadded rows ``[start, stop)`` of ``rank``: sizes differ by at most one."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    base, extra = divmod(num_rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


# ----------------------------------------------------------------------------- writer


class FeatureWriter:
    """Writes one feature cache block by block; a killed run resumes where its finished blocks end.

    Create or resume with :meth:`open`; rows ``block_range(b)`` of block ``b`` are written by
    ``write_block(b, ...)``, in any order; :meth:`finalise` marks the file complete.
    """

    def __init__(self, h5: h5py.File, path: Path, *, block_size: int, row_start: int, codec: TokenCodec | None):
        self._h5 = h5
        self._ds = {name: h5[name] for name in ("embeds", "pooled", "tokens", "token_scales", "done") if name in h5}
        self.path = path
        self.block_size = block_size
        self.row_start = row_start  # this file's first row in the whole split (shards: > 0)
        self.num_rows = self._ds["embeds"].shape[0]
        self.num_blocks = self._ds["done"].shape[0]
        self.views = int(h5.attrs["views"])
        self.has_tokens = "tokens" in self._ds
        self.has_pooled = "pooled" in self._ds
        self.codec = codec

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        num_rows: int,
        embed_dim: int,
        block_size: int,
        attrs: dict,
        labels: Sequence[int] | np.ndarray,
        classnames: Sequence[str],
        paths: Sequence[str] | None = None,
        token_shape: tuple[int, int] | None = None,
        token_format: TokenFormat = TokenFormat(),
        token_basis: tuple[np.ndarray, np.ndarray] | None = None,
        views: int = 1,
        shard: tuple[int, int] | None = None,
        pooled_dim: int | None = None,
    ) -> "FeatureWriter":
        """Create the cache at ``path`` (or resume it if it exists with the same identity).

        ``num_rows``, ``labels`` and ``paths`` describe the whole split. With ``shard=(rank,
        world_size)`` the writer covers only that rank's :func:`shard_range`, in the file
        :func:`shard_path` ``(path, rank)``; :func:`join_shards` assembles the shards.
        ``token_shape`` is the model's ``(T, W)`` to store token sequences, in ``token_format`` (a
        PCA format with its ``token_basis``, ``(mean, components)``). ``pooled_dim`` is the ViT's width W
        to also store the pre-projection pooled feature ``pooled`` (N, [V,] W). ``attrs`` identify the features
        (model, pretrained, preprocess, dataset, split, ...); a resumed file must match them.
        """
        path = Path(path)
        labels = np.asarray(labels)
        _check_arguments(num_rows, block_size, views, embed_dim, labels, paths, len(classnames))
        expected = {
            **header(FEATURES_KIND, len(classnames)),
            "num_rows": num_rows,
            "views": views,
            "block_size": block_size,
        }
        row_start = 0
        if shard is not None:
            path = shard_path(path, shard[0])
            row_start, row_stop = shard_range(num_rows, *shard)
            if row_stop == row_start:
                raise ValueError(f"{shard[1]} processes for {num_rows} rows leave one empty")
            expected.update(
                num_rows=row_stop - row_start, row_start=row_start, row_stop=row_stop,
                total_rows=num_rows,
            )
            labels = labels[row_start:row_stop]
            paths = None if paths is None else list(paths[row_start:row_stop])
        expected.update(identity_attrs(attrs))

        rows = expected["num_rows"]
        lead = (rows,) if views == 1 else (rows, views)
        shapes = {"embeds": (lead + (embed_dim,), np.float16)}
        if pooled_dim is not None:
            if pooled_dim < 1:
                raise ValueError("pooled_dim must be positive")
            shapes["pooled"] = (lead + (int(pooled_dim),), np.float16)
        contents = {
            "labels": labels.astype(np.int32),
            "classnames": list(classnames),
            "paths": None if paths is None else list(paths),
        }
        codec = None
        if token_shape is not None:
            codec = _add_tokens(expected, shapes, contents, lead, token_shape, token_format, token_basis)
        if not path.exists():
            _create(path, expected, shapes, contents, math.ceil(rows / block_size))
        h5 = open_h5(path, "r+")
        try:
            _check_resume(path, h5, expected, shapes, contents)
        except BaseException:
            h5.close()
            raise
        return cls(h5, path, block_size=block_size, row_start=row_start, codec=codec)

    def pending_blocks(self) -> list[int]:
        """The blocks not yet recorded as written, in increasing order."""
        return np.flatnonzero(self._ds["done"][()] == 0).tolist()

    def block_range(self, block: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of ``block`` in this file (add ``row_start`` for split rows)."""
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} is outside [0, {self.num_blocks})")
        start = block * self.block_size
        return start, min(start + self.block_size, self.num_rows)

    def write_block(self, block: int, embeds, tokens=None, pooled=None) -> None:
        """Write the rows of ``block`` (``embeds`` (n, D) or (n, V, D); ``tokens`` the model's
        (n, [V,] T, W), encoded here, or rows already encoded in the file's format as
        :class:`EncodedTokens`; ``pooled`` (n, [V,] W) for a file that stores it), then record the
        block as done. Rows of other blocks are untouched."""
        start, stop = self.block_range(block)
        if (tokens is None) == self.has_tokens:
            raise ValueError(f"{self.path} {'needs' if tokens is None else 'has no'} tokens")
        if (pooled is None) == self.has_pooled:
            raise ValueError(f"{self.path} {'needs' if pooled is None else 'has no'} pooled features")
        arrays = {"embeds": self.as_rows("embeds", embeds, stop - start)}
        if pooled is not None:
            arrays["pooled"] = self.as_rows("pooled", pooled, stop - start)
        if tokens is not None:
            if not isinstance(tokens, EncodedTokens):
                tokens = self._encode(tokens)
            arrays["tokens"] = self.as_rows("tokens", tokens.values, stop - start)
            if "token_scales" in self._ds:
                arrays["token_scales"] = self.as_rows("token_scales", tokens.scales, stop - start)
        for name, array in arrays.items():
            if not np.isfinite(array).all():
                raise LtclipError(
                    f"non-finite {name} for rows {start}..{stop - 1} of {self.path} (NaN from the "
                    "model or float16 overflow); check the model and its inputs"
                )
        try:
            for name, array in arrays.items():
                self._ds[name].write_direct(array, dest_sel=np.s_[start:stop])
            sync(self._h5)
            self._ds["done"].write_direct(np.ones(1, np.uint8), dest_sel=np.s_[block:block + 1])
            self._h5.flush()
        except IO_ERRORS as err:
            self._abandon()
            raise write_error(self.path, err) from None

    def _encode(self, tokens) -> EncodedTokens:
        array = np.asarray(tokens)
        if array.shape[-2:] != self.codec.seq_shape:
            raise ValueError(f"tokens must end in the model's {self.codec.seq_shape}, got {array.shape}")
        return self.codec.encode(torch.from_numpy(np.ascontiguousarray(array)))

    def as_rows(self, name: str, value, n: int) -> np.ndarray:
        """``value`` as ``n`` rows of dataset ``name`` (``embeds``, ``pooled``, ``tokens``, ``token_scales``): a
        C-contiguous array of its dtype and row shape; a views axis of 1 may be given or left out."""
        array = np.asarray(value)
        shape = (n,) + self._ds[name].shape[1:]
        with_views = (n, self.views) + shape[1 + (self.views > 1) :]
        if array.shape not in (shape, with_views):
            raise ValueError(f"{name} for {n} rows must have shape {shape}, got {array.shape}")
        return np.ascontiguousarray(array.reshape(shape), dtype=self._ds[name].dtype)

    def finalise(self) -> None:
        """Record the file as complete (every block must be written)."""
        if self._h5.attrs["complete"]:
            return
        missing = self.pending_blocks()
        if missing:
            raise RuntimeError(f"cannot finalise {self.path}: blocks {missing[:10]} not written")
        try:
            self._h5.attrs.modify("rows_completed", self.num_rows)
            self._h5.attrs.modify("complete", True)
            sync(self._h5)
        except IO_ERRORS as err:
            self._abandon()
            raise write_error(self.path, err) from None

    def _abandon(self) -> None:
        """Drop the file after a failed write; what was recorded as done stays valid."""
        try:
            self._h5.close()
        except IO_ERRORS:
            pass

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> "FeatureWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_arguments(num_rows: int, block_size: int, views: int, embed_dim: int, labels: np.ndarray,
                     paths: Sequence[str] | None, num_classes: int) -> None:
    if num_rows < 1 or block_size < 1 or views < 1 or embed_dim < 1:
        raise ValueError("num_rows, block_size, views and embed_dim must be positive")
    if labels.shape != (num_rows,) or (paths is not None and len(paths) != num_rows):
        raise ValueError(f"labels and paths must have num_rows={num_rows} entries")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")


def _add_tokens(attrs: dict, shapes: dict, contents: dict, lead: tuple, token_shape, token_format: TokenFormat,
                token_basis) -> TokenCodec:
    """Add what stored tokens bring to a new file (format attributes, datasets, PCA basis); their codec."""
    token_shape = tuple(int(n) for n in token_shape)
    token_format.check(token_shape)
    codec = TokenCodec(token_format, token_shape, token_basis)
    attrs.update(token_format.attrs(token_shape))
    shapes["tokens"] = (lead + codec.stored_shape, STORED_DTYPES[token_format.dtype])
    if token_format.scale_shape(token_shape) is not None:
        shapes["token_scales"] = (lead + token_format.scale_shape(token_shape), np.float32)
    if token_basis is not None:
        contents.update(zip(BASIS_DATASETS, (np.asarray(a, np.float32) for a in token_basis)))
    return codec


def _create(path: Path, attrs: dict, shapes: dict, contents: dict, num_blocks: int) -> None:
    """Create the whole file, every dataset and attribute, before any row is written."""
    with atomic_h5(path) as h5:
        # Sorted, so the file's bytes do not depend on the order the caller listed them in.
        h5.attrs.update(sorted({**attrs, "complete": False, "rows_completed": 0}.items()))
        h5.create_dataset("done", data=np.zeros(num_blocks, np.uint8))
        h5.create_dataset("labels", data=contents["labels"])
        for name in ("paths", "classnames"):
            if contents[name] is not None:
                h5.create_dataset(name, data=strings(contents[name]))
        for name in BASIS_DATASETS:
            if name in contents:
                h5.create_dataset(name, data=contents[name])
        for name, (shape, dtype) in shapes.items():  # the large arrays last, at the end of the file
            preallocated(h5, name, shape, dtype)


def _check_resume(path: Path, h5: h5py.File, attrs: dict, shapes: dict, contents: dict) -> None:
    """Refuse to resume a file written for other features, naming the first difference."""
    fix = "use another --out or delete the file"
    stored = {k: v for k, v in file_attrs(h5).items() if k not in STATUS_KEYS}
    for key in list(attrs) + sorted(set(stored) - set(attrs)):
        old, new = stored.get(key, ABSENT), attrs.get(key, ABSENT)
        if not same(old, new):
            raise LtclipError(
                f"{path} was created with {key}={show(old)}, "
                f"this run has {key}={show(new)}; {fix}"
            )
    for name in ("embeds", "pooled", "tokens", "token_scales"):
        old = h5[name].shape if name in h5 else None
        new = shapes[name][0] if name in shapes else None
        if old != new:
            raise LtclipError(f"{path} has {name} shape {old}, this run writes {new}; {fix}")
    if not np.array_equal(h5["labels"][()], contents["labels"]):
        raise LtclipError(f"{path} was created with other labels than this run's; {fix}")
    for name in ("paths", "classnames"):
        if read_strings(h5, name) != contents[name]:
            raise LtclipError(f"{path} was created with other {name} than this run's; {fix}")
    for name in BASIS_DATASETS:
        if (name in h5) != (name in contents) or (name in h5 and not np.array_equal(h5[name][()], contents[name])):
            raise LtclipError(f"{path} was created with another PCA basis ({name}) than this run's; {fix}")


def amend_attribute(path: str | os.PathLike, key: str, old, new) -> bool:
    """Change identity attribute ``key`` of an unfinished cache from ``old`` to ``new``; True if it did.

    For a resumed run whose option is looser than the one that started the file, where every row
    written so far is also what the new option writes (``--bad-images fail`` → ``skip``: the rows
    written under ``fail`` are all of readable images). Called before any further row is written;
    like :meth:`FeatureWriter.finalise`, it overwrites an attribute that exists since creation.
    """
    path = Path(path)
    if not path.is_file():
        return False
    h5 = open_h5(path, "r+")
    try:
        if h5.attrs.get("complete", True) or not same(file_attrs(h5).get(key, ABSENT), old):
            return False
        h5.attrs.modify(key, new)
        sync(h5)
        return True
    except IO_ERRORS as err:
        raise write_error(path, err) from None
    finally:
        h5.close()


def write_arrays(
    path: str | os.PathLike, embeds, labels, classnames: Sequence[str], attrs: dict, tokens=None, *,
    token_format: TokenFormat = TokenFormat(), token_basis: tuple[np.ndarray, np.ndarray] | None = None,
    pooled=None,
) -> Path:
    """A complete cache file from in-memory arrays (features made elsewhere), in one block; ``tokens``
    (the model's sequences) are stored in ``token_format``, ``pooled`` (pre-projection features) as float16."""
    embeds = np.asarray(embeds)
    views = 1 if embeds.ndim == 2 else embeds.shape[1]
    with FeatureWriter.open(
        path, num_rows=len(labels), embed_dim=embeds.shape[-1], block_size=max(1, len(labels)), attrs=attrs,
        labels=labels, classnames=classnames, views=views,
        token_shape=None if tokens is None else tuple(np.asarray(tokens).shape[-2:]),
        token_format=token_format, token_basis=token_basis,
        pooled_dim=None if pooled is None else np.asarray(pooled).shape[-1],
    ) as writer:
        writer.write_block(0, embeds, tokens, pooled)
        writer.finalise()
    return Path(path)
