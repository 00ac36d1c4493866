"""Reading feature caches: :class:`FeatureCache` validates a file when it opens it, keeps the
labels and metadata in RAM, and reads embeddings and token rows on demand (fork-safe).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import torch

from ...core.errors import LtclipError
from ._h5 import ABSENT, FEATURES_KIND, TOKEN_KEYS, check_header, file_attrs, open_h5, plain, read_strings, same, show
from .tokens import BASIS_DATASETS, STORED_DTYPES, EncodedTokens, TokenCodec, TokenFormat

ROW_DATASETS = ("embeds", "pooled", "tokens", "token_scales")
# What every file of one cache folder shares: the features of one model on one dataset, whose
# tokens are stored (and so read back) the same way, its images normalised the same way and its
# val/test images read with the same view (extract's --normalize and --test-views/--eval-resize/--interpolation).
SHARED_IDENTITY = ("model", "pretrained", "checkpoint_sha256", "quick_gelu", "preprocess", "dataset", "num_classes",
                   "normalize", "eval_view", *TOKEN_KEYS)
# The extract options that set an identity key, where they are not --model, --pretrained and --dataset.
_OPTIONS_OF = {"normalize": "--normalize", "eval_view": "--test-views, --eval-resize and --interpolation"}


def check_cache_folder(path: Path, attrs: dict, embed_dim: int | None, classnames: list[str] | None,
                       basis: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """A file beside a ``train.h5`` must hold features of the same model and dataset as it.

    A folder's ``val.h5``, ``test.h5`` and ``text.h5`` are used together with its ``train.h5``
    (model selection, evaluation, the zero-shot classifier), so a file copied in from another
    extraction would silently mix two feature spaces. Only attributes both files carry are
    compared (hand-made caches may lack them); an unreadable ``train.h5`` is left to its own reader.
    """
    train = path.with_name("train.h5")
    if path.name == train.name or not train.is_file():
        return
    try:
        with h5py.File(train, "r") as h5:
            ref = file_attrs(h5)
            ref_dim = h5["embeds"].shape[-1] if isinstance(h5.get("embeds"), h5py.Dataset) else None
            ref_names = read_strings(h5, "classnames")
            ref_basis = [h5[name][()] if name in h5 else None for name in BASIS_DATASETS]
    except (OSError, KeyError, ValueError):
        return
    fix = f"re-extract {path.name} with the same --model, --pretrained and --dataset, or move it out of {path.parent}"
    for key in SHARED_IDENTITY:
        if key in attrs and key in ref and not same(plain(attrs[key]), ref[key]):
            if key in _OPTIONS_OF:
                fix = f"re-extract {path.name} with the same {_OPTIONS_OF[key]}, or move it out of {path.parent}"
            raise LtclipError(f"{path} was made with {key}={show(plain(attrs[key]))} but {train.name} beside it with "
                              f"{key}={show(ref[key])}: the folder mixes two extractions; {fix}")
    if embed_dim is not None and ref_dim is not None and embed_dim != ref_dim:
        raise LtclipError(f"{path} holds {embed_dim}-d embeddings but {train.name} beside it {ref_dim}-d: "
                          f"the folder mixes two extractions; {fix}")
    if classnames is not None and ref_names is not None and classnames != ref_names:
        raise LtclipError(f"{path} has other class names than {train.name} beside it; {fix}")
    if basis is not None and ref_basis[0] is not None and not all(map(np.array_equal, basis, ref_basis)):
        raise LtclipError(f"{path} was stored with another token PCA basis than {train.name} beside it; {fix}")


class FeatureCache:
    """A validated, read-only feature cache; embeddings in RAM, token sequences streamed.

    Accepts any file with ``embeds``, ``labels`` and the attributes ``schema_version`` and
    ``num_classes`` (see docs/artifacts.md). Embeddings and plain tokens are handed out in the
    stored dtype, ``embed_dtype`` / ``token_dtype`` (float16 for extracted caches, float32 allowed
    in user files); tokens stored in a compressed ``token_format`` are decoded to float32 by
    :meth:`read_tokens`, or read as stored by :meth:`read_token_parts` (for decoding on a device with
    ``codec``). ``token_shape`` is what a head sees: ``(T', W)`` after pooling. An optional ``pooled``
    dataset (``extract --pooled``) holds the ViT's pre-projection feature: ``has_pooled``,
    ``pooled_dim`` (W), ``pooled_dtype``, :meth:`load_pooled`.
    Usable from DataLoader workers: each process reopens the file for itself.
    """

    def __init__(self, path: str | os.PathLike, *, allow_incomplete: bool = False):
        self.path = Path(path)
        self._h5 = open_h5(self.path, "r")
        self._pid = os.getpid()
        self._raw = None  # (fd, token offset, pid) for direct reads, opened on first use
        try:
            self._validate(allow_incomplete)
        except BaseException:
            self._h5.close()
            raise

    def _validate(self, allow_incomplete: bool) -> None:
        h5, path = self._h5, self.path
        self.attrs = file_attrs(h5)
        check_header(path, self.attrs, FEATURES_KIND)
        self.num_classes = self.attrs["num_classes"]
        for name in ("embeds", "labels"):
            if name not in h5 or not isinstance(h5[name], h5py.Dataset):
                raise LtclipError(f"{path} has no {name!r} dataset; see docs/artifacts.md")
        embeds = h5["embeds"]
        if embeds.ndim not in (2, 3) or not np.issubdtype(embeds.dtype, np.floating):
            raise LtclipError(
                f"{path}: embeds must be a float array (N, D) or (N, V, D), "
                f"got {embeds.dtype} {embeds.shape}"
            )
        self.num_rows = embeds.shape[0]
        self.views = 1 if embeds.ndim == 2 else embeds.shape[1]
        self.embed_dim = embeds.shape[-1]
        self.embed_dtype = embeds.dtype
        for key, value in (("num_rows", self.num_rows), ("views", self.views)):
            if self.attrs.get(key, value) != value:
                raise LtclipError(
                    f"{path}: attribute {key}={self.attrs[key]} but embeds has shape "
                    f"{embeds.shape}; the file is inconsistent: re-create it"
                )
        labels = h5["labels"]
        if labels.shape != (self.num_rows,) or not np.issubdtype(labels.dtype, np.integer):
            raise LtclipError(
                f"{path}: labels must be integers of shape ({self.num_rows},), "
                f"got {labels.dtype} {labels.shape}"
            )
        self.labels = labels[()].astype(np.int64)
        bad = (self.labels < 0) | (self.labels >= self.num_classes)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise LtclipError(
                f"{path}: label {self.labels[row]} of row {row} is outside "
                f"[0, {self.num_classes}); fix the labels or the num_classes attribute"
            )
        self.has_tokens = "tokens" in h5
        self.token_shape = self.token_dtype = self.codec = self.token_format = self.token_row_bytes = None
        if self.has_tokens:
            self._validate_tokens(h5, embeds)
        self.has_pooled = "pooled" in h5
        self.pooled_dim = self.pooled_dtype = None
        if self.has_pooled:
            pooled = h5["pooled"]
            if (not isinstance(pooled, h5py.Dataset) or pooled.ndim != embeds.ndim
                    or pooled.shape[:-1] != embeds.shape[:-1] or not np.issubdtype(pooled.dtype, np.floating)):
                raise LtclipError(f"{path}: pooled must be a float array (N, [V,] W) with the rows of embeds "
                                  f"{embeds.shape}, got {getattr(pooled, 'dtype', None)} {getattr(pooled, 'shape', None)}; "
                                  "the file is inconsistent: re-create it")
            self.pooled_dim, self.pooled_dtype = pooled.shape[-1], pooled.dtype
        self.paths = read_strings(h5, "paths")
        self.classnames = read_strings(h5, "classnames")
        for name, values, size in (("paths", self.paths, self.num_rows),
                                   ("classnames", self.classnames, self.num_classes)):
            if values is not None and len(values) != size:
                raise LtclipError(f"{path}: {name} has {len(values)} entries, expected {size}")
        check_cache_folder(path, self.attrs, self.embed_dim, self.classnames, self.codec and self.codec.basis)
        done = h5["done"][()] if "done" in h5 else np.ones(1, np.uint8)
        self.complete = bool(self.attrs.get("complete", True)) and bool(done.all())
        if not self.complete and not allow_incomplete:
            raise LtclipError(
                f"{path} is incomplete ({int(done.sum())} of {done.size} blocks written); rerun "
                "the same `ltclip extract` command to resume it"
            )

    def _validate_tokens(self, h5: h5py.File, embeds: h5py.Dataset) -> None:
        """The token datasets agree with each other, with ``embeds`` and with the recorded format."""
        path, tokens = self.path, h5["tokens"]
        fmt = TokenFormat.from_attrs(path, self.attrs)
        inconsistent = "the file is inconsistent: re-create it"
        if tokens.ndim != embeds.ndim + 1 or tokens.shape[:-2] != embeds.shape[:-1]:
            raise LtclipError(f"{path}: tokens shape {tokens.shape} does not match embeds shape {embeds.shape}; {inconsistent}")
        plain_floats = "token_dtype" not in self.attrs and np.issubdtype(tokens.dtype, np.floating)
        if tokens.dtype != STORED_DTYPES[fmt.dtype] and not plain_floats:
            raise LtclipError(f"{path}: tokens are {tokens.dtype} but token_dtype is {fmt.dtype!r}; {inconsistent}")
        stored = tuple(tokens.shape[-2:])
        basis = tuple(h5[name][()] for name in BASIS_DATASETS) if fmt.pca else None
        if basis is not None and (basis[1].shape != (fmt.pca, basis[0].shape[0]) or stored[1] != fmt.pca):
            raise LtclipError(f"{path}: the token PCA basis does not fit {fmt.pca}-wide tokens; {inconsistent}")
        width = basis[0].shape[0] if basis is not None else stored[1]
        source = (int(self.attrs.get("token_source_tokens", stored[0])), width)
        expected_scales = fmt.scale_shape(source)
        scales = h5["token_scales"].shape if "token_scales" in h5 else None
        if fmt.stored_shape(source) != stored or (expected_scales is not None) != (scales is not None) or (
            scales is not None and scales != tokens.shape[:-2] + expected_scales
        ):
            raise LtclipError(f"{path}: token rows {tokens.shape} (scales {scales}) do not fit the format "
                              f"{fmt.describe()}; {inconsistent}")
        self.token_format, self.token_dtype = fmt, tokens.dtype
        self.codec = TokenCodec(fmt, source, basis)
        self.token_shape = self.codec.decoded_shape
        item = tokens.dtype.itemsize * int(np.prod(tokens.shape[1:]))
        self.token_row_bytes = item + (4 * int(np.prod(scales[1:])) if scales is not None else 0)

    @property
    def _file(self) -> h5py.File:
        """The open file, reopened once in each process that uses it (fork-safe)."""
        if self._h5 is None or self._pid != os.getpid():
            self._h5, self._pid = open_h5(self.path, "r"), os.getpid()
        return self._h5

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_h5": None, "_raw": None}

    @property
    def nbytes_on_disk(self) -> int:
        """Size of the file in bytes."""
        return self.path.stat().st_size

    def expect(self, **attrs) -> None:
        """Refuse features made differently: every given attribute must equal the file's."""
        for key, want in attrs.items():
            have = self.attrs.get(key, ABSENT)
            if not same(have, plain(want)):
                raise LtclipError(
                    f"{self.path} was made with {key}={show(have)} but this run uses "
                    f"{key}={want!r}; re-extract the features with matching options"
                )

    def class_counts(self) -> np.ndarray:
        """Rows per class, shape (num_classes,), int64."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of ``"embeds"``, ``"pooled"`` or ``"tokens"``, read with one slice, in the
        stored dtype and with an explicit views axis: (n, V, D), (n, V, W) or (n, V, T, W), also when V = 1."""
        if name not in ROW_DATASETS:
            raise ValueError(f"dataset must be one of {ROW_DATASETS}, not {name!r}")
        if not 0 <= start <= stop <= self.num_rows:
            raise IndexError(f"rows [{start}, {stop}) are not within [0, {self.num_rows})")
        if name == "pooled" and not self.has_pooled:
            raise LtclipError(f"{self.path} has no pooled features (the ViT's feature before the projection); "
                              "re-extract with --pooled")
        data = (self._file[name] if name in ("embeds", "pooled") else self._tokens(name))[start:stop]
        return self._with_views(data)

    def _with_views(self, data: np.ndarray) -> np.ndarray:
        return data.reshape((len(data), self.views) + data.shape[1 + (self.views > 1) :])

    def load_embeds(self) -> np.ndarray:
        """All embeddings, (N, V, D), in the stored dtype (float16 for extracted caches)."""
        return self.read_rows("embeds", 0, self.num_rows)

    def load_pooled(self) -> np.ndarray:
        """All pre-projection pooled features, (N, V, W), in the stored dtype (float16 when extracted)."""
        return self.read_rows("pooled", 0, self.num_rows)

    def _tokens(self, name: str = "tokens") -> h5py.Dataset:
        if not self.has_tokens:
            raise LtclipError(f"{self.path} has no tokens; re-extract with token output enabled")
        if name not in self._file:
            raise LtclipError(f"{self.path} stores {self.token_format.describe()} tokens, which have no {name}")
        return self._file[name]

    def _raw_fd(self, name: str) -> tuple[int, int] | None:
        """``(fd, byte offset)`` of dataset ``name`` when stored contiguously and uncompressed, else None.

        Such rows can be read with plain ``os.preadv`` calls, 1.5–2× faster than h5py's per-call
        overhead for the random single rows a sampler asks for.
        """
        if self._raw is None or self._raw[2] != os.getpid():
            self._raw = ({}, os.open(self.path, os.O_RDONLY) if hasattr(os, "preadv") else None, os.getpid())
        offsets, fd, _ = self._raw
        if name not in offsets:
            ds = self._tokens(name)
            offsets[name] = ds.id.get_offset() if ds.chunks is None and ds.compression is None else None
        return None if fd is None or offsets[name] is None else (fd, offsets[name])

    def _read_indexed(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (sorted, unique) of a row dataset, one read per contiguous run.

        ``os.preadv`` at the dataset's file offset when it is contiguous, else one h5py slice per
        run (h5py's fancy indexing is many times slower)."""
        ds = self._tokens(name)
        buf = np.empty((rows.size,) + ds.shape[1:], ds.dtype)
        starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1).tolist()
        raw = self._raw_fd(name)
        row_bytes = buf[0].nbytes if rows.size else 0
        for lo, hi in zip(starts, starts[1:] + [rows.size]):
            first = int(rows[lo])
            if raw is None:
                ds.read_direct(buf, np.s_[first : first + hi - lo], np.s_[lo:hi])
                continue
            view = memoryview(buf[lo:hi]).cast("B")
            got = os.preadv(raw[0], [view], raw[1] + first * row_bytes)
            if got != len(view):
                raise LtclipError(f"{self.path}: short read at row {first}; the file is truncated: re-extract it")
        return buf

    def read_token_parts(self, indices) -> EncodedTokens:
        """Token rows ``indices`` (any order, repeats allowed) as stored: values (len, V, T', W') and
        scales (len, V, ...) or None; ``codec.decode`` turns them into tokens on any device.

        Each contiguous run of the sorted unique rows is read with one read, and the rows are put
        back into the requested order."""
        self._tokens()
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_rows):
            raise IndexError(f"token rows must lie in [0, {self.num_rows})")
        rows, inverse = np.unique(idx, return_inverse=True)
        in_order = np.array_equal(rows, idx)
        parts = []
        for name in ("tokens", "token_scales") if self.codec.format.scale != "none" else ("tokens",):
            buf = self._read_indexed(name, rows)
            parts.append(self._with_views(buf if in_order else buf[inverse]))
        return EncodedTokens(parts[0], parts[1] if len(parts) > 1 else None)

    def _decoded(self, parts: EncodedTokens) -> np.ndarray:
        """Plain tokens as stored; other formats decoded to float32."""
        if self.codec.format.is_plain:
            return parts.values
        scales = None if parts.scales is None else torch.from_numpy(parts.scales)
        return self.codec.decode(torch.from_numpy(parts.values), scales).numpy()

    def read_tokens(self, indices) -> np.ndarray:
        """Token sequences of rows ``indices`` (any order, repeats allowed): (len, V, T', W), in the
        stored dtype for plain float tokens, decoded to float32 for other formats."""
        return self._decoded(self.read_token_parts(indices))

    def iter_token_blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, tokens of rows [start, start + block_rows))`` over all rows in order, (n, V, T', W),
        like :meth:`read_tokens`."""
        self._tokens()
        for start in range(0, self.num_rows, block_rows):
            yield start, self.read_tokens(np.arange(start, min(start + block_rows, self.num_rows)))

    def close(self) -> None:
        if self._raw is not None and self._raw[1] is not None and self._raw[2] == os.getpid():
            os.close(self._raw[1])
        self._raw = None
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
