"""``--decode device``: DataLoader workers read the JPEG files' bytes; the main process decodes each batch
with ``torchvision.io.decode_jpeg`` on the device (nvJPEG on CUDA) and runs the views there.

The views are the CPU path's own transform objects run on uint8 tensors instead of PIL images
(:func:`on_tensors`): the same geometry, and training crops drawn from the same seeded parameters
(drawn on the CPU generator, whatever the device). The pixels differ from the CPU path's by the
resampling only (torch's antialiased resize, not PIL's): at most a few 1/255 steps
(tests/test_device_decode.py measures it). The worker keeps the CPU path's checks: regular files
only, the size and aspect bounds read from the header before anything is decoded. The EXIF
orientation is read there too and applied after decoding (:func:`upright`), since the batched CUDA
decoder ignores it. Whatever is not an RGB or greyscale JPEG file read directly (a PNG, a CMYK JPEG,
a symbolic link, an in-memory dataset's image) is decoded on the CPU in the worker as before
(:func:`~ltclip.data.image_files.read_rgb`, through the dataset's opener) and only resized on the device.
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import functional as F

from ..config.values import DECODES
from ..core.errors import LtclipError
from .base import LTDataset
from .image_files import EXIF_ORIENTATION, check_image_size, open_regular
from .images import ImageSplit, read_problem, worker_init
from .views import Views

_JPEG_START = b"\xff\xd8\xff"
# Transforms that take a uint8 [C, H, W] tensor as they take a PIL image (the same parameters drawn).
_ON_TENSORS = (T.Resize, T.CenterCrop, T.RandomResizedCrop, T.RandomHorizontalFlip, T.FiveCrop, T.TenCrop, T.Normalize)
_RGB_CONVERSIONS = ("MaybeConvertMode", "_convert_to_rgb")  # open_clip's: a decoded tensor is RGB already
_VIEW_TRANSFORMS = ("preprocess", "resize", "crop", "finish", "augment", "transform")  # the Views classes' attributes


def check_decode(decode: str) -> str:
    if decode not in DECODES:
        raise LtclipError(f"--decode {decode!r}: choose one of {', '.join(DECODES)}")
    return decode


def tensor_transform(transform):
    """``transform`` (a PIL pipeline) for uint8 ``[3, H, W]`` tensors: ``ToTensor`` becomes a float
    conversion (÷255), RGB conversions are dropped, the geometric steps and ``Normalize`` are kept as they are."""
    if isinstance(transform, T.Compose):
        return T.Compose([s for s in map(tensor_transform, transform.transforms) if s is not None])
    if isinstance(transform, T.ToTensor):
        return T.ConvertImageDtype(torch.float32)
    if type(transform).__name__ in _RGB_CONVERSIONS or getattr(transform, "__name__", "") in _RGB_CONVERSIONS:
        return None
    if isinstance(transform, _ON_TENSORS) or getattr(transform, "takes_tensors", False):
        return transform
    raise LtclipError(f"--decode device: the preprocessing step {transform!r} does not run on tensors; pass --decode cpu")


def on_tensors(views: Views) -> Views:
    """A copy of ``views`` that takes a uint8 ``[3, H, W]`` tensor (on any device) instead of a PIL image."""
    views = copy.copy(views)
    for name in _VIEW_TRANSFORMS:
        if hasattr(views, name):
            setattr(views, name, tensor_transform(getattr(views, name)))
    return views


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """PIL's ``ImageOps.exif_transpose`` of a ``[C, H, W]`` tensor, for EXIF orientations 1–8."""
    if orientation in (5, 7):  # transpose; transverse: transpose, then turn half a turn
        image = image.transpose(-2, -1)
    if orientation in (6, 8):  # a quarter turn clockwise (6) or counter-clockwise (8)
        return image.rot90(1 if orientation == 8 else -1, (-2, -1))
    flips = {2: (-1,), 3: (-2, -1), 4: (-2,), 7: (-2, -1)}.get(orientation)
    return image.flip(flips) if flips else image


def jpeg_file(path: Path) -> tuple[bytes, int] | None:
    """``(bytes, EXIF orientation)`` of an RGB or greyscale JPEG file within the size bounds, or None for
    anything the CPU decode should read (a link, a file of another format or colour space, or one that
    cannot be opened: the dataset's opener then says why). An image too large raises ``ValueError``."""
    if path.is_symlink():  # the dataset's opener checks where it leads
        return None
    try:
        with open_regular(path) as f:
            if f.read(len(_JPEG_START)) != _JPEG_START:  # another format: read once, by the CPU decode
                return None
            data = _JPEG_START + f.read()
    except (OSError, ValueError):
        return None
    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in ("RGB", "L"):  # CMYK/YCCK: PIL's conversion, as on the CPU path
            return None
        check_image_size(*im.size)
        return data, int(im.getexif().get(EXIF_ORIENTATION, 1))


class EncodedSplit(Dataset):
    """Row ``i`` of a split → ``(payload, orientation, label, row, problem)``: the JPEG file's bytes
    (uint8, 1-D) and its EXIF orientation, or the CPU decode's pixels (uint8 ``[3, H, W]``, orientation 1)
    for anything else; an unreadable image gives an empty payload and its one-line ``problem``."""

    def __init__(self, dataset: LTDataset, split: str):
        self.dataset, self.split = dataset, dataset.split(split)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, row: int):
        label = int(self.split.labels[row])
        try:
            jpeg = jpeg_file(Path(self.dataset.data_root) / self.split.keys[row])
            if jpeg is not None:
                return torch.frombuffer(bytearray(jpeg[0]), dtype=torch.uint8), jpeg[1], label, row, ""
            return F.pil_to_tensor(self.dataset.open_image(self.split.name, row)), 1, label, row, ""
        except Exception as err:  # any read failure of one image, as ImageSplit
            return torch.empty(0, dtype=torch.uint8), 1, label, row, read_problem(self.dataset, self.split, row, err)


def collate(items):
    """A batch of :class:`EncodedSplit` items: payloads and orientations as lists (their sizes differ)."""
    payloads, orientations, labels, rows, problems = zip(*items)
    return list(payloads), list(orientations), torch.tensor(labels), torch.tensor(rows), list(problems)


def encoded_loader(dataset: LTDataset, split: str, *, batch_size: int, workers: int, sampler=None,
                   pin_memory: bool = False, persistent: bool = False) -> DataLoader:
    """A DataLoader of :func:`collate` batches of a split's rows (``sampler``: which, in order; default all)."""
    return DataLoader(EncodedSplit(dataset, split), batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate, pin_memory=pin_memory, persistent_workers=persistent and workers > 0,
                      worker_init_fn=worker_init, shuffle=False)


def _decode_each(payloads: list[torch.Tensor], device) -> list[torch.Tensor | Exception]:
    out = []
    for payload in payloads:
        try:
            out.append(decode_jpeg(payload, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as err:
            out.append(err)
    return out


def decode(batch, dataset: LTDataset, split: str, device) -> tuple[list[torch.Tensor | None], list[str]]:
    """A :func:`collate` batch's images, uint8 ``[3, H, W]`` on ``device`` and upright (None where
    unreadable), and its problems (one for each JPEG the device could not decode)."""
    payloads, orientations, _, rows, problems = batch
    problems = list(problems)
    jpegs = [i for i, (p, problem) in enumerate(zip(payloads, problems)) if p.dim() == 1 and not problem]
    images = [p.to(device, non_blocking=True) if p.dim() == 3 and not problem else None for p, problem in zip(payloads, problems)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)  # torchvision 0.29 points at TorchCodec
        try:
            decoded = decode_jpeg([payloads[i] for i in jpegs], mode=ImageReadMode.RGB, device=device) if jpegs else []
        except RuntimeError:  # one bad file fails the whole batch: decode one at a time to name it
            decoded = _decode_each([payloads[i] for i in jpegs], device)
    for i, image in zip(jpegs, decoded):
        if isinstance(image, Exception):
            problems[i] = read_problem(dataset, dataset.split(split), int(rows[i]), image)
        else:
            images[i] = upright(image, orientations[i])
    return images, problems


def stack_views(images: list[torch.Tensor | None], views_of, device) -> torch.Tensor:
    """``[B, V, 3, H, W]``: ``views_of(i, image)`` of each image, zeros where it is None."""
    blank = torch.zeros(3, 8, 8, dtype=torch.uint8, device=device)
    return torch.stack([views_of(i, image) if image is not None else torch.zeros_like(views_of(i, blank))
                        for i, image in enumerate(images)])


def image_loader(dataset: LTDataset, split: str, views: Views, rows, *, batch_size: int, workers: int, decode: str = "cpu",
                 device=None, pin_memory: bool = False):
    """``(views [B, V, 3, H, W], labels, rows, problems)`` batches over ``rows`` of a split, in order: a
    DataLoader over :class:`~ltclip.data.images.ImageSplit`, or with ``decode="device"`` the same decoded
    on ``device`` (``views`` are refused here, before any image is read, if they cannot run on tensors)."""
    if check_decode(decode) == "cpu":
        return DataLoader(ImageSplit(dataset, split, views, list(rows)), batch_size=batch_size, num_workers=workers,
                          pin_memory=pin_memory, shuffle=False, worker_init_fn=worker_init)
    loader = encoded_loader(dataset, split, batch_size=batch_size, workers=workers, sampler=list(rows), pin_memory=pin_memory)
    return _device_batches(loader, dataset, split, on_tensors(views), torch.device(device))


def _device_batches(loader: DataLoader, dataset: LTDataset, split: str, views: Views, device):
    for batch in loader:
        images, problems = decode(batch, dataset, split, device)
        row_ids = batch[3]
        yield stack_views(images, lambda i, image: views(image, int(row_ids[i])), device), batch[2], row_ids, problems
