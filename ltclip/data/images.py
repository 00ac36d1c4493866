"""A torch Dataset over one split of an LTDataset: decode, preprocess into views, bad-image policy."""

from __future__ import annotations

import logging
import signal
import sys
import threading

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..core.errors import LtclipError
from .base import LTDataset
from .views import Views

log = logging.getLogger(__name__)



class ImageSplit(Dataset):
    """Item ``i`` → ``(views [V,3,H,W], label, row, problem)`` for row ``indices[i]`` of the split.

    ``problem`` is ``""`` for a good image; for an unreadable one it is a one-line description
    naming the file, and the views are zeros. Nothing is raised or logged here, so a problem found
    in a DataLoader worker reaches the main process as data (a worker's exception would arrive
    wrapped in its whole traceback); the caller applies the ``--bad-images`` policy.
    """

    def __init__(self, dataset: LTDataset, split: str, views: Views, indices=None):
        self.dataset = dataset
        self.split = dataset.split(split)
        self.views = views
        self.indices = indices if indices is not None else range(len(self.split))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        row = self.indices[i]
        label = int(self.split.labels[row])
        try:
            return self.views(self.dataset.open_image(self.split.name, row), row), label, row, ""
        except Exception as err:  # any decode/IO failure of one image
            return unread_views(self.views, row), label, row, read_problem(self.dataset, self.split, row, err)


def unread_views(views: Views, index: int) -> torch.Tensor:
    """Zeros in the shape of ``views``' output: what stands for an image that could not be read."""
    return torch.zeros_like(views(Image.new("RGB", (8, 8)), index))


def read_problem(dataset: LTDataset, split, row: int, err: Exception) -> str:
    """The one-line description of an image that could not be read: its file and the reason."""
    where = f"{dataset.data_root}/{split.keys[row]}"
    return " ".join(f"{where}: cannot read image ({type(err).__name__}: {err})".split())


def worker_init(_worker_id: int) -> None:
    """``worker_init_fn`` of the DataLoaders that decode images: Ctrl-C is the main process's.

    Ctrl-C in a terminal signals every process of the group. A worker that dies of it races the
    main process, which then fails with "DataLoader worker exited unexpectedly" or on a tensor
    the dead worker was handing over, instead of stopping with one clean line. So workers ignore
    SIGINT (the main process shuts them down, and they exit if it dies), and the thread that hands
    tensors to the main process does not print a traceback when the main process has gone away.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gone = (BrokenPipeError, ConnectionResetError, EOFError)  # the peer (the main process) has left
    thread_hook, process_hook = threading.excepthook, sys.excepthook

    def quiet_thread(args) -> None:
        if not issubclass(args.exc_type, gone):
            thread_hook(args)

    def quiet(exc_type, exc, tb) -> None:  # multiprocessing's resource sharer reports through sys.excepthook
        if not issubclass(exc_type, gone):
            process_hook(exc_type, exc, tb)

    threading.excepthook, sys.excepthook = quiet_thread, quiet


def apply_bad_image_policy(policy: str, problems) -> list[bool]:
    """Per item of a batch, whether its image was read; ``fail`` raises the first problem as a one-line error."""
    ok = [not p for p in problems]
    if not all(ok):
        first = next(p for p in problems if p)
        if policy == "fail":
            raise LtclipError(f"{first}; fix it or pass --bad-images skip")
        for problem in problems:
            if problem:
                log.warning("skipping unreadable image: %s", problem)
    return ok
