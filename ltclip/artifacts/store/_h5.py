"""HDF5 plumbing shared by the store's writers and readers.

Opening (one-line errors), syncing, atomic creation, preallocated datasets, attribute and string
helpers, I/O error translation, and the header every artifact file starts with (kind, schema
version, class count) together with its check.
"""

from __future__ import annotations

import errno
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

from ... import __version__
from ...core.errors import LtclipError

# 2: token formats (pooling, PCA, int8/fp8 with scales; docs/artifacts.md). Version 1 files hold plain tokens.
SCHEMA_VERSION = 2
FEATURES_KIND = "features"
TEXT_KIND = "text_embeddings"

# Written by the writer itself; callers may not pass these as identity attributes.
SHARD_KEYS = ("row_start", "row_stop", "total_rows")
STATUS_KEYS = ("complete", "rows_completed")
_STRUCTURE_KEYS = (
    "schema_version", "ltclip_version", "kind", "num_classes", "num_rows", "views", "block_size",
)
TOKEN_KEYS = ("token_dtype", "token_pca", "token_pool", "token_scale", "token_source_tokens")
RESERVED = frozenset(_STRUCTURE_KEYS + SHARD_KEYS + STATUS_KEYS + TOKEN_KEYS)
# Files are written in the oldest format that holds them (superblock v0): readable by HDF5 >= 1.10,
# and no "file is already open for write" flag that a killed writer would leave behind.
_LIBVER = ("earliest", "v110")
ABSENT = object()


# ----------------------------------------------------------------------------- values and messages


def plain(value):
    """An attribute value as a plain Python object (h5py returns numpy scalars and arrays)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    return value.decode() if isinstance(value, bytes) else value


def file_attrs(h5: h5py.File) -> dict:
    """The file's attributes as plain Python values."""
    return {k: plain(v) for k, v in h5.attrs.items()}


def same(a, b) -> bool:
    return type(a) is type(b) and a == b


def show(value) -> str:
    return "(absent)" if value is ABSENT else repr(value)


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _reason(err: Exception) -> str:
    """The OS's words for an I/O failure (h5py buries them in a long message)."""
    found = re.search(r"error message = '([^']*)'", str(err))
    return found.group(1) if found else one_line(err)


def _errno(err: Exception) -> int | None:
    """The OS error number, also when h5py only mentions it in its message."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    found = re.search(r"errno = (\d+)", str(err))
    return int(found.group(1)) if found else None


# h5py reports a failed write as OSError, a failed flush or close as RuntimeError.
IO_ERRORS = (OSError, RuntimeError)


def write_error(path: Path, err: Exception) -> LtclipError:
    if _errno(err) in (errno.ENOSPC, errno.EDQUOT):
        return LtclipError(
            f"disk full while writing {path}; free space and rerun the same command to resume"
        )
    return LtclipError(
        f"cannot write {path} ({_reason(err)}); fix the cause and rerun the same command to resume"
    )


# ----------------------------------------------------------------------------- files and datasets


def open_h5(path: Path, mode: str) -> h5py.File:
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
        text = str(err).lower()
        if "unable to lock file" in text or "file locking" in text:
            raise LtclipError(
                f"{path} is being written by another process; wait for it to finish "
                "or use another output path"
            ) from None
        truncated = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", text)
        if truncated:
            raise LtclipError(
                f"{path} is truncated ({int(truncated.group(1)):,} of {int(truncated.group(2)):,} bytes; "
                "an interrupted copy?): copy it again, or delete it and rerun `ltclip extract`"
            ) from None
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise LtclipError(f"{path} is empty (0 bytes): delete it and rerun `ltclip extract`") from None
        raise LtclipError(
            f"cannot open {path} as HDF5 ({one_line(err)}); the file is damaged: "
            "delete it and rerun"
        ) from None


def sync(h5: h5py.File) -> None:
    """Push HDF5's buffers to the OS and the OS's to the disk."""
    h5.flush()
    os.fsync(h5.id.get_vfd_handle())


@contextmanager
def atomic_h5(path: Path) -> Iterator[h5py.File]:
    """Create ``path`` as ``path.partial`` and rename it into place only once it is complete."""
    tmp = path.with_name(path.name + ".partial")
    try:
        with h5py.File(tmp, "w", libver=_LIBVER) as h5:
            yield h5
            sync(h5)
        os.replace(tmp, path)
    except IO_ERRORS as err:
        tmp.unlink(missing_ok=True)
        raise write_error(path, err) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def preallocated(h5: h5py.File, name: str, shape: tuple, dtype=np.float16) -> None:
    """A contiguous dataset whose file space is allocated now (sparse until written), so later row
    writes change raw data only, never the file's metadata."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    h5.create_dataset(name, shape=shape, dtype=dtype, dcpl=dcpl)


def strings(values: Sequence[str]) -> np.ndarray:
    return np.array(list(values), dtype=h5py.string_dtype())


def read_strings(h5: h5py.File, name: str) -> list[str] | None:
    return h5[name].asstr()[()].tolist() if name in h5 else None


# ----------------------------------------------------------------------------- header


def header(kind: str, num_classes: int) -> dict:
    """The attributes every artifact file starts with."""
    return {"schema_version": SCHEMA_VERSION, "ltclip_version": __version__, "kind": kind, "num_classes": num_classes}


def identity_attrs(attrs: dict) -> dict:
    """Validate caller attributes: str/int/float/bool values, no reserved names."""
    out = {}
    for key, value in attrs.items():
        value = plain(value)
        if key in RESERVED:
            raise ValueError(f"attribute {key!r} is written by the store itself")
        if not isinstance(value, (str, int, float, bool)):
            raise TypeError(f"attribute {key!r} must be str, int, float or bool, not {type(value)}")
        out[key] = value
    return out


def check_header(path: Path, attrs: dict, kind: str) -> None:
    """Kind, schema version and class count: the checks every artifact reader starts with."""
    found = attrs.get("kind", kind)
    if found != kind:
        raise LtclipError(f"{path} holds {found!r}, not {kind!r}; pass the right file")
    version = attrs.get("schema_version", ABSENT)
    if not isinstance(version, int) or version < 1:
        raise LtclipError(
            f"{path} has schema_version {show(version)}, expected an integer >= 1; "
            "see docs/artifacts.md for the format"
        )
    if version > SCHEMA_VERSION:
        raise LtclipError(
            f"{path} has schema_version {version} but ltclip {__version__} reads up to "
            f"{SCHEMA_VERSION}; upgrade ltclip"
        )
    num_classes = attrs.get("num_classes", ABSENT)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise LtclipError(
            f"{path} has num_classes {show(num_classes)}, expected a positive integer; "
            "set the num_classes attribute"
        )
