"""HDF5 feature store: the cache schema, a resumable (and sharded) writer, a validating reader.

The layout and the crash-safety protocol are documented in ``docs/artifacts.md``.
"""

from __future__ import annotations

import errno
import math
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import h5py
import numpy as np

from . import __version__
from .errors import LtclipError

SCHEMA_VERSION = 1
FEATURES_KIND = "features"
TEXT_KIND = "text_embeddings"

# Written by the writer itself; callers may not pass these as identity attributes.
_SHARD_KEYS = ("row_start", "row_stop", "total_rows")
_STATUS_KEYS = ("complete", "rows_completed")
_STRUCTURE_KEYS = (
    "schema_version", "ltclip_version", "kind", "num_classes", "num_rows", "views", "block_size",
)
_RESERVED = frozenset(_STRUCTURE_KEYS + _SHARD_KEYS + _STATUS_KEYS)
# Files are written in the oldest format that holds them (superblock v0): readable by HDF5 >= 1.10,
# and no "file is already open for write" flag that a killed writer would leave behind.
_LIBVER = ("earliest", "v110")
_ABSENT = object()


# ----------------------------------------------------------------------------- small helpers


def _py(value):
    """An attribute value as a plain Python object (h5py returns numpy scalars and arrays)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    return value.decode() if isinstance(value, bytes) else value


def _same(a, b) -> bool:
    return type(a) is type(b) and a == b


def _show(value) -> str:
    return "(absent)" if value is _ABSENT else repr(value)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _reason(err: Exception) -> str:
    """The OS's words for an I/O failure (h5py buries them in a long message)."""
    found = re.search(r"error message = '([^']*)'", str(err))
    return found.group(1) if found else _one_line(err)


def _errno(err: Exception) -> int | None:
    """The OS error number, also when h5py only mentions it in its message."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    found = re.search(r"errno = (\d+)", str(err))
    return int(found.group(1)) if found else None


# h5py reports a failed write as OSError, a failed flush or close as RuntimeError.
_IO_ERRORS = (OSError, RuntimeError)


def _write_error(path: Path, err: Exception) -> LtclipError:
    if _errno(err) in (errno.ENOSPC, errno.EDQUOT):
        return LtclipError(
            f"disk full while writing {path}; free space and rerun the same command to resume"
        )
    return LtclipError(
        f"cannot write {path} ({_reason(err)}); fix the cause and rerun the same command to resume"
    )


def _open_h5(path: Path, mode: str) -> h5py.File:
    """Open an existing HDF5 file ("r" or "r+"), turning failures into one-line errors.

    "r+" turns off HDF5's raw-data buffer: a failed write (disk full) then raises at once and
    leaves nothing pending, whereas a buffered failure surfaces only at a later flush, or is
    swallowed when its dataset closes, and can crash the interpreter at exit.
    """
    try:
        if mode == "r":
            return h5py.File(path, "r")
        fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
        fapl.set_sieve_buf_size(0)
        return h5py.File(h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDWR, fapl=fapl))
    except FileNotFoundError:
        raise LtclipError(
            f"{path} does not exist; check the path or run `ltclip extract`"
        ) from None
    except OSError as err:
        if "lock" in str(err).lower():
            raise LtclipError(
                f"{path} is being written by another process; wait for it to finish "
                "or use another output path"
            ) from None
        raise LtclipError(
            f"cannot open {path} as HDF5 ({_one_line(err)}); the file is damaged: "
            "delete it and rerun"
        ) from None


def _sync(h5: h5py.File) -> None:
    """Push HDF5's buffers to the OS and the OS's to the disk."""
    h5.flush()
    os.fsync(h5.id.get_vfd_handle())


@contextmanager
def _atomic_h5(path: Path) -> Iterator[h5py.File]:
    """Create ``path`` as ``path.partial`` and rename it into place only once it is complete."""
    tmp = path.with_name(path.name + ".partial")
    try:
        with h5py.File(tmp, "w", libver=_LIBVER) as h5:
            yield h5
            _sync(h5)
        os.replace(tmp, path)
    except _IO_ERRORS as err:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, err) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _preallocated(h5: h5py.File, name: str, shape: tuple) -> None:
    """A contiguous float16 dataset whose file space is allocated now (sparse until written), so
    later row writes change raw data only, never the file's metadata."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    h5.create_dataset(name, shape=shape, dtype=np.float16, dcpl=dcpl)


def _strings(values: Sequence[str]) -> np.ndarray:
    return np.array(list(values), dtype=h5py.string_dtype())


def _read_strings(h5: h5py.File, name: str) -> list[str] | None:
    return h5[name].asstr()[()].tolist() if name in h5 else None


def _identity_attrs(attrs: dict) -> dict:
    """Validate caller attributes: str/int/float/bool values, no reserved names."""
    out = {}
    for key, value in attrs.items():
        value = _py(value)
        if key in _RESERVED:
            raise ValueError(f"attribute {key!r} is written by the store itself")
        if not isinstance(value, (str, int, float, bool)):
            raise TypeError(f"attribute {key!r} must be str, int, float or bool, not {type(value)}")
        out[key] = value
    return out


def _check_header(path: Path, attrs: dict, kind: str) -> None:
    """Kind, schema version and class count: the checks every artifact reader starts with."""
    found = attrs.get("kind", kind)
    if found != kind:
        raise LtclipError(f"{path} holds {found!r}, not {kind!r}; pass the right file")
    version = attrs.get("schema_version", _ABSENT)
    if not isinstance(version, int) or version < 1:
        raise LtclipError(
            f"{path} has schema_version {_show(version)}, expected an integer >= 1; "
            "see docs/artifacts.md for the format"
        )
    if version > SCHEMA_VERSION:
        raise LtclipError(
            f"{path} has schema_version {version} but ltclip {__version__} reads up to "
            f"{SCHEMA_VERSION}; upgrade ltclip"
        )
    num_classes = attrs.get("num_classes", _ABSENT)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise LtclipError(
            f"{path} has num_classes {_show(num_classes)}, expected a positive integer; "
            "set the num_classes attribute"
        )


# ----------------------------------------------------------------------------- sharding


def _header(kind: str, num_classes: int) -> dict:
    """The attributes every artifact file starts with."""
    return {"schema_version": SCHEMA_VERSION, "ltclip_version": __version__, "kind": kind, "num_classes": num_classes}


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

    def __init__(self, h5: h5py.File, path: Path, *, block_size: int, row_start: int):
        self._h5 = h5
        self._ds = {name: h5[name] for name in ("embeds", "tokens", "done") if name in h5}
        self.path = path
        self.block_size = block_size
        self.row_start = row_start  # this file's first row in the whole split (shards: > 0)
        self.num_rows = self._ds["embeds"].shape[0]
        self.num_blocks = self._ds["done"].shape[0]
        self.views = int(h5.attrs["views"])
        self.has_tokens = "tokens" in self._ds

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
        views: int = 1,
        shard: tuple[int, int] | None = None,
    ) -> "FeatureWriter":
        """Create the cache at ``path`` (or resume it if it exists with the same identity).

        ``num_rows``, ``labels`` and ``paths`` describe the whole split. With ``shard=(rank,
        world_size)`` the writer covers only that rank's :func:`shard_range`, in the file
        :func:`shard_path` ``(path, rank)``; :func:`join_shards` assembles the shards.
        ``token_shape`` is ``(T, W)`` to store token sequences. ``attrs`` identify the features
        (model, pretrained, preprocess, dataset, split, ...); a resumed file must match them.
        """
        path = Path(path)
        labels = np.asarray(labels)
        if num_rows < 1 or block_size < 1 or views < 1 or embed_dim < 1:
            raise ValueError("num_rows, block_size, views and embed_dim must be positive")
        if labels.shape != (num_rows,) or (paths is not None and len(paths) != num_rows):
            raise ValueError(f"labels and paths must have num_rows={num_rows} entries")
        if labels.size and (labels.min() < 0 or labels.max() >= len(classnames)):
            raise ValueError(f"labels must lie in [0, {len(classnames)})")
        expected = {
            **_header(FEATURES_KIND, len(classnames)),
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
        expected.update(_identity_attrs(attrs))

        rows = expected["num_rows"]
        lead = (rows,) if views == 1 else (rows, views)
        shapes = {"embeds": lead + (embed_dim,)}
        if token_shape is not None:
            shapes["tokens"] = lead + tuple(token_shape)
        contents = {
            "labels": labels.astype(np.int32),
            "classnames": list(classnames),
            "paths": None if paths is None else list(paths),
        }
        if not path.exists():
            _create(path, expected, shapes, contents, math.ceil(rows / block_size))
        h5 = _open_h5(path, "r+")
        try:
            _check_resume(path, h5, expected, shapes, contents)
        except BaseException:
            h5.close()
            raise
        return cls(h5, path, block_size=block_size, row_start=row_start)

    def pending_blocks(self) -> list[int]:
        """The blocks not yet recorded as written, in increasing order."""
        return np.flatnonzero(self._ds["done"][()] == 0).tolist()

    def block_range(self, block: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of ``block`` in this file (add ``row_start`` for split rows)."""
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} is outside [0, {self.num_blocks})")
        start = block * self.block_size
        return start, min(start + self.block_size, self.num_rows)

    def write_block(self, block: int, embeds, tokens=None) -> None:
        """Write the rows of ``block`` (``embeds`` (n, D) or (n, V, D); ``tokens`` (n, [V,] T, W)),
        then record the block as done. Rows of other blocks are untouched."""
        start, stop = self.block_range(block)
        if (tokens is None) == self.has_tokens:
            raise ValueError(f"{self.path} {'needs' if tokens is None else 'has no'} tokens")
        arrays = {"embeds": self._rows("embeds", embeds, stop - start)}
        if tokens is not None:
            arrays["tokens"] = self._rows("tokens", tokens, stop - start)
        for name, array in arrays.items():
            if not np.isfinite(array).all():
                raise LtclipError(
                    f"non-finite {name} for rows {start}..{stop - 1} of {self.path} (NaN from the "
                    "model or float16 overflow); check the model and its inputs"
                )
        try:
            for name, array in arrays.items():
                self._ds[name].write_direct(array, dest_sel=np.s_[start:stop])
            _sync(self._h5)
            self._ds["done"].write_direct(np.ones(1, np.uint8), dest_sel=np.s_[block:block + 1])
            self._h5.flush()
        except _IO_ERRORS as err:
            self._abandon()
            raise _write_error(self.path, err) from None

    def _rows(self, name: str, value, n: int) -> np.ndarray:
        """``value`` as a C-contiguous float16 array shaped like ``n`` rows of dataset ``name``."""
        array = np.asarray(value)
        shape = (n,) + self._ds[name].shape[1:]
        with_views = (n, self.views) + shape[1 + (self.views > 1) :]
        if array.shape not in (shape, with_views):
            raise ValueError(f"{name} for {n} rows must have shape {shape}, got {array.shape}")
        return np.ascontiguousarray(array.reshape(shape), dtype=np.float16)

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
            _sync(self._h5)
        except _IO_ERRORS as err:
            self._abandon()
            raise _write_error(self.path, err) from None

    def _abandon(self) -> None:
        """Drop the file after a failed write; what was recorded as done stays valid."""
        try:
            self._h5.close()
        except _IO_ERRORS:
            pass

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> "FeatureWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _create(path: Path, attrs: dict, shapes: dict, contents: dict, num_blocks: int) -> None:
    """Create the whole file, every dataset and attribute, before any row is written."""
    with _atomic_h5(path) as h5:
        # Sorted, so the file's bytes do not depend on the order the caller listed them in.
        h5.attrs.update(sorted({**attrs, "complete": False, "rows_completed": 0}.items()))
        h5.create_dataset("done", data=np.zeros(num_blocks, np.uint8))
        h5.create_dataset("labels", data=contents["labels"])
        for name in ("paths", "classnames"):
            if contents[name] is not None:
                h5.create_dataset(name, data=_strings(contents[name]))
        for name, shape in shapes.items():  # the large arrays last, at the end of the file
            _preallocated(h5, name, shape)


def _check_resume(path: Path, h5: h5py.File, attrs: dict, shapes: dict, contents: dict) -> None:
    """Refuse to resume a file written for other features, naming the first difference."""
    fix = "use another --out or delete the file"
    stored = {k: _py(v) for k, v in h5.attrs.items() if k not in _STATUS_KEYS}
    for key in list(attrs) + sorted(set(stored) - set(attrs)):
        old, new = stored.get(key, _ABSENT), attrs.get(key, _ABSENT)
        if not _same(old, new):
            raise LtclipError(
                f"{path} was created with {key}={_show(old)}, "
                f"this run has {key}={_show(new)}; {fix}"
            )
    for name in ("embeds", "tokens"):
        old = h5[name].shape if name in h5 else None
        new = shapes.get(name)
        if old != new:
            raise LtclipError(f"{path} has {name} shape {old}, this run writes {new}; {fix}")
    if not np.array_equal(h5["labels"][()], contents["labels"]):
        raise LtclipError(f"{path} was created with other labels than this run's; {fix}")
    for name in ("paths", "classnames"):
        if _read_strings(h5, name) != contents[name]:
            raise LtclipError(f"{path} was created with other {name} than this run's; {fix}")


def join_shards(
    shard_paths: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    *,
    keep_shards: bool = False,
) -> Path:
    """Copy complete shard files into one cache at ``out_path`` (resumable), then delete them.

    Every shard must be complete, carry the same identity, and the shards' row ranges must tile
    ``[0, total_rows)`` exactly; the result equals what a single process would have written.
    """
    out_path = Path(out_path)
    for shard in map(Path, shard_paths):
        if not shard.exists():
            raise LtclipError(
                f"shard {shard} is missing; rerun the extraction with the same number of "
                "processes to resume"
            )
    shards = [FeatureCache(p) for p in shard_paths]
    try:
        shards.sort(key=lambda s: s.attrs.get("row_start", 0))
        _check_shards(out_path, shards)
        first = shards[0]
        paths = None if first.paths is None else [p for s in shards for p in s.paths]
        writer = FeatureWriter.open(
            out_path,
            num_rows=first.attrs["total_rows"],
            embed_dim=first.embed_dim,
            block_size=first.attrs["block_size"],
            attrs={k: v for k, v in first.attrs.items() if k not in _RESERVED},
            labels=np.concatenate([s.labels for s in shards]),
            classnames=first.classnames,
            paths=paths,
            token_shape=first.token_shape,
            views=first.views,
        )
        names = ("embeds", "tokens") if first.has_tokens else ("embeds",)
        with writer:
            for block in writer.pending_blocks():
                start, stop = writer.block_range(block)
                parts = {name: [] for name in names}
                for s in shards:
                    lo = max(start, s.attrs["row_start"]) - s.attrs["row_start"]
                    hi = min(stop, s.attrs["row_stop"]) - s.attrs["row_start"]
                    if lo < hi:
                        for name in names:
                            parts[name].append(s._read(name, lo, hi))
                writer.write_block(block, *(np.concatenate(parts[name]) for name in names))
            writer.finalise()
    finally:
        for s in shards:
            s.close()
    if not keep_shards:
        for shard in shard_paths:
            Path(shard).unlink()
    return out_path


def _check_shards(out_path: Path, shards: list["FeatureCache"]) -> None:
    """Same identity, same shapes, and row ranges that tile [0, total_rows) exactly."""
    per_shard = {"row_start", "row_stop", "num_rows", "rows_completed"}
    first = shards[0]
    identity = {k: v for k, v in first.attrs.items() if k not in per_shard}
    for s in shards:
        if any(key not in s.attrs for key in _SHARD_KEYS):
            raise LtclipError(f"{s.path} is not a shard file (no row_start/row_stop/total_rows)")
        if s.attrs["row_stop"] - s.attrs["row_start"] != s.num_rows:
            raise LtclipError(f"{s.path}: row_start/row_stop do not match its {s.num_rows} rows")
        for key in sorted(set(identity) | set(s.attrs) - per_shard):
            if not _same(identity.get(key, _ABSENT), s.attrs.get(key, _ABSENT)):
                raise LtclipError(
                    f"shards of {out_path} differ: {first.path} has {key}="
                    f"{_show(identity.get(key, _ABSENT))}, {s.path} has "
                    f"{key}={_show(s.attrs.get(key, _ABSENT))}; delete the shards and rerun"
                )
        if (s.embed_dim, s.token_shape, s.classnames) != (
            first.embed_dim, first.token_shape, first.classnames
        ):
            raise LtclipError(
                f"shards of {out_path} differ in shape or class names ({first.path}, {s.path}); "
                "delete the shards and rerun"
            )
    row = 0
    for s in shards:
        if s.attrs["row_start"] != row:
            raise LtclipError(
                f"shards of {out_path} do not cover rows [0, {identity['total_rows']}): "
                f"{s.path} starts at row {s.attrs['row_start']}, expected {row}; "
                "pass every shard of one run"
            )
        row = s.attrs["row_stop"]
    if row != identity["total_rows"]:
        raise LtclipError(
            f"shards of {out_path} end at row {row} of {identity['total_rows']}: a shard is "
            "missing; pass every shard of one run"
        )


def write_arrays(path: str | os.PathLike, embeds, labels, classnames: Sequence[str], attrs: dict, tokens=None) -> Path:
    """A complete cache file from in-memory arrays (features made elsewhere), in one block."""
    embeds = np.asarray(embeds)
    views = 1 if embeds.ndim == 2 else embeds.shape[1]
    with FeatureWriter.open(
        path, num_rows=len(labels), embed_dim=embeds.shape[-1], block_size=max(1, len(labels)), attrs=attrs,
        labels=labels, classnames=classnames, views=views,
        token_shape=None if tokens is None else tuple(np.asarray(tokens).shape[-2:]),
    ) as writer:
        writer.write_block(0, embeds, tokens)
        writer.finalise()
    return Path(path)


# ----------------------------------------------------------------------------- reader


class FeatureCache:
    """A validated, read-only feature cache; embeddings in RAM, token sequences streamed.

    Accepts any file with ``embeds``, ``labels`` and the attributes ``schema_version`` and
    ``num_classes`` (see docs/artifacts.md). Usable from DataLoader workers: each process reopens
    the file for itself.
    """

    def __init__(self, path: str | os.PathLike, *, allow_incomplete: bool = False):
        self.path = Path(path)
        self._h5 = _open_h5(self.path, "r")
        self._pid = os.getpid()
        self._raw = None  # (fd, token offset, pid) for direct reads, opened on first use
        try:
            self._validate(allow_incomplete)
        except BaseException:
            self._h5.close()
            raise

    def _validate(self, allow_incomplete: bool) -> None:
        h5, path = self._h5, self.path
        self.attrs = {k: _py(v) for k, v in h5.attrs.items()}
        _check_header(path, self.attrs, FEATURES_KIND)
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
        self.token_shape = None
        if self.has_tokens:
            tokens = h5["tokens"]
            if tokens.ndim != embeds.ndim + 1 or tokens.shape[:-2] != embeds.shape[:-1]:
                raise LtclipError(
                    f"{path}: tokens shape {tokens.shape} does not match embeds shape "
                    f"{embeds.shape}; the file is inconsistent: re-create it"
                )
            self.token_shape = tuple(tokens.shape[-2:])
        self.paths = _read_strings(h5, "paths")
        self.classnames = _read_strings(h5, "classnames")
        for name, values, size in (("paths", self.paths, self.num_rows),
                                   ("classnames", self.classnames, self.num_classes)):
            if values is not None and len(values) != size:
                raise LtclipError(f"{path}: {name} has {len(values)} entries, expected {size}")
        done = h5["done"][()] if "done" in h5 else np.ones(1, np.uint8)
        self.complete = bool(self.attrs.get("complete", True)) and bool(done.all())
        if not self.complete and not allow_incomplete:
            raise LtclipError(
                f"{path} is incomplete ({int(done.sum())} of {done.size} blocks written); rerun "
                "the same `ltclip extract` command to resume it"
            )

    @property
    def _file(self) -> h5py.File:
        """The open file, reopened once in each process that uses it (fork-safe)."""
        if self._h5 is None or self._pid != os.getpid():
            self._h5, self._pid = _open_h5(self.path, "r"), os.getpid()
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
            have = self.attrs.get(key, _ABSENT)
            if not _same(have, _py(want)):
                raise LtclipError(
                    f"{self.path} was made with {key}={_show(have)} but this run uses "
                    f"{key}={want!r}; re-extract the features with matching options"
                )

    def class_counts(self) -> np.ndarray:
        """Rows per class, shape (num_classes,), int64."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of ``name`` with an explicit views axis."""
        data = self._file[name][start:stop]
        return data.reshape((stop - start, self.views) + data.shape[1 + (self.views > 1) :])

    def load_embeds(self) -> np.ndarray:
        """All embeddings, (N, V, D), in the stored dtype (float16 for extracted caches)."""
        return self._read("embeds", 0, self.num_rows)

    def _tokens(self) -> h5py.Dataset:
        if not self.has_tokens:
            raise LtclipError(f"{self.path} has no tokens; re-extract with token output enabled")
        return self._file["tokens"]

    def _raw_fd(self) -> tuple[int, int] | None:
        """``(fd, byte offset)`` of the tokens when stored contiguously and uncompressed, else None.

        Such rows can be read with plain ``os.preadv`` calls, 1.5–2× faster than h5py's per-call
        overhead for the random single rows a sampler asks for.
        """
        if self._raw is None or self._raw[2] != os.getpid():
            ds = self._tokens()
            offset = ds.id.get_offset() if ds.chunks is None and ds.compression is None else None
            fd = os.open(self.path, os.O_RDONLY) if offset is not None and hasattr(os, "preadv") else None
            self._raw = (fd, offset, os.getpid())
        fd, offset, _ = self._raw
        return None if fd is None else (fd, offset)

    def read_tokens(self, indices) -> np.ndarray:
        """Token sequences of rows ``indices`` (any order, repeats allowed): (len, V, T, W).

        Reads each contiguous run of the sorted unique rows with one read (``os.preadv`` at the
        dataset's file offset when it is contiguous, else one h5py slice — h5py's fancy indexing is
        many times slower) and scatters the rows back into the requested order.
        """
        tokens = self._tokens()
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_rows):
            raise IndexError(f"token rows must lie in [0, {self.num_rows})")
        rows, inverse = np.unique(idx, return_inverse=True)
        buf = np.empty((rows.size,) + tokens.shape[1:], tokens.dtype)
        starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1).tolist()
        raw = self._raw_fd()
        row_bytes = buf[0].nbytes if rows.size else 0
        for lo, hi in zip(starts, starts[1:] + [rows.size]):
            first = int(rows[lo])
            if raw is None:
                tokens.read_direct(buf, np.s_[first : first + hi - lo], np.s_[lo:hi])
                continue
            view = memoryview(buf[lo:hi]).cast("B")
            got = os.preadv(raw[0], [view], raw[1] + first * row_bytes)
            if got != len(view):
                raise LtclipError(f"{self.path}: short read at row {first}; the file is truncated: re-extract it")
        out = buf if np.array_equal(rows, idx) else buf[inverse]
        return out.reshape((idx.size, self.views) + self.token_shape)

    def iter_token_blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, tokens[start:start + block_rows])`` over all rows in order, (n, V, T, W)."""
        self._tokens()
        for start in range(0, self.num_rows, block_rows):
            yield start, self._read("tokens", start, min(start + block_rows, self.num_rows))

    def close(self) -> None:
        if self._raw is not None and self._raw[0] is not None and self._raw[2] == os.getpid():
            os.close(self._raw[0])
        self._raw = None
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- text embeddings


class TextEmbeddings(NamedTuple):
    embeds: np.ndarray  # (C, D) float32
    classnames: list[str]
    templates: list[str]
    attrs: dict


def save_text_embeddings(
    path: str | os.PathLike,
    embeds,
    classnames: Sequence[str],
    templates: Sequence[str],
    attrs: dict,
) -> Path:
    """Write the class text embeddings (C, D) with their class names and prompt templates."""
    path = Path(path)
    embeds = np.asarray(embeds, dtype=np.float32)
    if embeds.ndim != 2 or embeds.shape[0] != len(classnames) or not np.isfinite(embeds).all():
        raise ValueError(f"text embeddings must be finite, shape ({len(classnames)}, D)")
    header = _header(TEXT_KIND, len(classnames))
    with _atomic_h5(path) as h5:
        h5.attrs.update({**header, **_identity_attrs(attrs)})
        h5.create_dataset("embeds", data=embeds)
        h5.create_dataset("classnames", data=_strings(classnames))
        h5.create_dataset("templates", data=_strings(templates))
    return path


def load_text_embeddings(path: str | os.PathLike) -> TextEmbeddings:
    """Read and validate a file written by :func:`save_text_embeddings`."""
    path = Path(path)
    with _open_h5(path, "r") as h5:
        attrs = {k: _py(v) for k, v in h5.attrs.items()}
        _check_header(path, attrs, TEXT_KIND)
        if "embeds" not in h5 or "classnames" not in h5:
            raise LtclipError(f"{path} needs 'embeds' and 'classnames' datasets; re-create it")
        embeds = h5["embeds"][()].astype(np.float32)
        classnames = _read_strings(h5, "classnames")
        templates = _read_strings(h5, "templates") or []
    num_classes = attrs["num_classes"]
    if embeds.ndim != 2 or not len(embeds) == len(classnames) == num_classes:
        raise LtclipError(
            f"{path}: embeds {embeds.shape} and {len(classnames)} classnames do not match "
            f"num_classes={num_classes}; re-create it"
        )
    return TextEmbeddings(embeds, classnames, templates, attrs)
