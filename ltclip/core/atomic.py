"""Atomic file writes: a temporary file beside the target, renamed onto it only when complete,
so a kill at any moment leaves either the old file or the new one, never half of one.

A write that fails (disk full, a folder that cannot be written) removes its temporary file, leaves
the old file as it was, and raises :class:`WriteError`: one line naming the file.
"""

from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import LtclipError

# A write that more free space would let through (EFBIG: a file-size limit, as with RLIMIT_FSIZE).
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_UMASK = os.umask(0o022)  # read once (the call sets it): files get the permissions open() would give them
os.umask(_UMASK)


class WriteError(LtclipError):
    """A file could not be written; ``problem`` says what, ``fix`` what to do (``disk_full``: free space).

    The CLI's error guard completes ``fix`` with how the command continues (``rerun the same
    command``, or ``--resume`` for a training run).
    """

    def __init__(self, path: str | os.PathLike, err: OSError):
        self.path = Path(path)
        self.disk_full = err.errno in FULL_ERRNOS
        reason = err.strerror or type(err).__name__
        if self.disk_full:
            self.problem, self.fix = f"disk full while writing {path} ({reason})", "free space"
        else:
            self.problem, self.fix = f"cannot write {path} ({reason})", "choose a writable path"
        super().__init__(f"{self.problem}; {self.fix}" + (" and rerun the same command" if self.disk_full else ""))


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    A missing parent folder is created. An ``OSError`` while writing becomes :class:`WriteError`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder, not a file")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide reports and runs from other users
    except OSError as err:
        raise WriteError(path, err) from None
    try:
        yield Path(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise WriteError(path, err) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync(path: str) -> None:
    """The file's bytes on disk before the rename publishes it (a power cut then keeps old or new)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_json(path: str | os.PathLike, data) -> None:
    """Write ``data`` as indented JSON, atomically (values JSON cannot hold are written as strings)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def save_torch(path: str | os.PathLike, obj) -> None:
    """``torch.save`` atomically: a kill never leaves half a checkpoint.

    The object is serialised in memory and written with one plain file write, so a failing write
    reports the OS's reason (torch's own file writer only says that a write failed).
    """
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
