"""One writer per folder: an exclusive ``flock`` on ``FOLDER/.ltclip.lock`` for as long as a command
writes there (a run, a sweep, a feature cache).

``flock`` is released by the kernel when its process ends in any way, SIGKILL included, so a lock
left by a killed process is simply taken over: no pid liveness guesswork. The file records who
holds it (pid, command, start time, host) for the refusal a second writer gets, and is removed on
release, so a finished folder looks as it did without it. Under torchrun rank 0 takes the lock and
tells the other ranks whether it got it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import LtclipError

LOCK_FILE = ".ltclip.lock"


def _holder(fd: int) -> str:
    """Who holds the lock on ``fd``'s file, as one phrase."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        record = json.loads(os.read(fd, 4096).decode() or "{}")
    except ValueError:
        record = {}
    if not record:
        return "another ltclip process (it is starting)"
    host = "" if record.get("host") == socket.gethostname() else f" on {record.get('host')}"
    return f"pid {record.get('pid')}{host} (ltclip {record.get('command')}, started {record.get('started')})"


def _acquire(folder: Path, command: str, option: str) -> int:
    path = folder / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise LtclipError(f"{option} {folder}: cannot write ({err.strerror}); choose a writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise LtclipError(f"{option} {folder} is being written by {holder}; wait for it or choose another {option}") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed that file as this process opened it: lock the new one
    record = {"pid": os.getpid(), "command": command, "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return fd


def _release(fd: int, folder: Path, created: list[Path]) -> None:
    """Remove the lock file (while still holding it), unlock, and remove the folders this lock made
    (``folder`` and missing parents, deepest first) that stayed empty."""
    try:
        (folder / LOCK_FILE).unlink(missing_ok=True)
    finally:
        os.close(fd)
    remove_empty(created)


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    return [p for p in (folder, *folder.parents) if not p.exists()]


def remove_empty(made: list[Path]) -> None:
    """Remove the folders a command made (:func:`missing_folders`, deepest first) while they are empty."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:
            break  # something was written: this folder and those above it stay


@contextmanager
def folder_lock(folder: str | Path, command: str, ctx=None, option: str = "--out") -> Iterator[None]:
    """Hold ``folder`` (created if missing) exclusively for ``ltclip command``; a second writer gets one
    line naming the holder. ``ctx``: the DistContext under torchrun (only rank 0 locks)."""
    folder = Path(folder)
    error, fd, created = None, None, []
    if ctx is None or ctx.is_main:
        created = missing_folders(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = _acquire(folder, command, option)
        except OSError as err:
            error = f"{option} {folder}: cannot write ({err.strerror}); choose a writable folder"
        except LtclipError as err:
            error = str(err)
    if ctx is not None and ctx.enabled:  # every rank stops alike when rank 0 could not lock
        import torch.distributed as dist

        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        raise LtclipError(error)
    try:
        yield
    finally:
        if fd is not None:
            _release(fd, folder, created)


def is_locked(folder: Path) -> bool:
    """Whether a live process holds ``folder``'s lock now."""
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
