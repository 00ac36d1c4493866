"""``--decode device`` run on the CPU (the code path CUDA runs), against the PIL path; and the finetune
DataLoader kept between epochs (persistent workers) still drawing each epoch's own crops.

Tolerance: the device path decodes the same JPEG pixels as PIL (both are libjpeg; EXIF orientation
applied) and resamples with torch's antialiased resize instead of PIL's. Measured on the images below
(odd sizes, greyscale, EXIF-rotated, 500×375 → 32): every view differs from PIL's by at most one 8-bit
step (1/255 ÷ the smallest std = 0.0150 in normalised units), 0.002–0.003 on average.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.io import decode_jpeg
from torchvision.transforms import functional as F

from ltclip.config import DataConfig
from ltclip.core.errors import LtclipError
from ltclip.data import device_decode
from ltclip.data.device_decode import EncodedSplit, collate, decode, jpeg_file, on_tensors
from ltclip.data.image_batches import ImageSource, train_transform
from ltclip.data.image_files import read_rgb
from ltclip.data.registry import open_dataset
from ltclip.data.views import make_views
from ltclip.models.backbone import load_backbone

from conftest import TINY_MODEL
from test_bad_inputs import invoke, ok, one_error_line

MEAN_TOLERANCE = 0.005


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(TINY_MODEL, "none")


def one_step(preprocess_cfg: dict) -> float:
    """One 8-bit step in normalised units (the largest: over the smallest std), plus float rounding."""
    return 1 / 255 / min(preprocess_cfg["std"]) + 1e-5


def smooth_image(height: int, width: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A photo-like image (smooth gradients, unlike noise that JPEG and resampling would mangle)."""
    coarse = np.random.default_rng(seed).random((height // 8 + 2, width // 8 + 2, 3 if mode == "RGB" else 1))
    return Image.fromarray((coarse * 255).astype(np.uint8).squeeze(), mode).resize((width, height), Image.BICUBIC)


def save_jpeg(path: Path, image: Image.Image, orientation: int = 1) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, quality=92, exif=exif.tobytes())
    return path


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list[Path]:
    """Odd sizes, a greyscale one, an EXIF-rotated one and one downscaled ×12."""
    folder = tmp_path_factory.mktemp("jpegs")
    shapes = [(37, 53, "RGB", 1), (101, 67, "L", 1), (64, 200, "RGB", 1), (50, 80, "RGB", 6), (375, 500, "RGB", 1)]
    return [save_jpeg(folder / f"{i}.jpg", smooth_image(h, w, mode, seed=i), orientation)
            for i, (h, w, mode, orientation) in enumerate(shapes)]


def decoded(path: Path, device="cpu") -> torch.Tensor:
    data, orientation = jpeg_file(path)
    batch = collate([(torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation, 0, 0, "")])
    images, problems = decode(batch, None, "train", device)
    assert problems == [""]
    return images[0]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pil_applies_it(tmp_path, orientation):
    path = save_jpeg(tmp_path / "o.jpg", smooth_image(20, 30), orientation)
    assert torch.equal(decoded(path), F.pil_to_tensor(read_rgb(path)))


@pytest.mark.parametrize("kind", ["center", "flip", "fivecrop", "tencrop", "train"])
def test_device_views_equal_the_pil_views_within_one_8bit_step(backbone, jpegs, kind):
    views = make_views(kind, backbone.preprocess, backbone.preprocess_cfg, count=2, seed=3)
    on_device = on_tensors(views)
    for path in jpegs:
        cpu, device = views(read_rgb(path), 7), on_device(decoded(path), 7)
        assert device.shape == cpu.shape and device.dtype == cpu.dtype
        diff = (device - cpu).abs()
        assert diff.max() <= one_step(backbone.preprocess_cfg), path
        assert diff.mean() <= MEAN_TOLERANCE, path


def test_greyscale_jpeg_becomes_rgb_and_an_elongated_one_is_refused_from_its_header(jpegs, tmp_path):
    grey = decoded(jpegs[1])
    assert grey.shape == (3, 101, 67) and torch.equal(grey[0], grey[2])
    strip = tmp_path / "strip.jpg"
    Image.new("L", (2, 600)).save(strip)  # 300:1, over MAX_ASPECT_RATIO
    with pytest.raises(ValueError, match="more elongated than ltclip resizes"):
        jpeg_file(strip)


@pytest.fixture(scope="module")
def jpeg_root(synthetic_root, tmp_path_factory) -> Path:
    """The synthetic set with its images stored as JPEGs (and its split files naming them)."""
    root = tmp_path_factory.mktemp("synthetic_jpeg")
    for path in synthetic_root.rglob("*"):
        target = root / path.relative_to(synthetic_root)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.suffix == ".png":
            Image.open(path).convert("RGB").save(target.with_suffix(".jpg"), quality=95)
        elif path.suffix == ".txt":
            target.write_text(path.read_text().replace(".png ", ".jpg "))
        else:
            shutil.copy(path, target)
    return root


def test_a_file_of_another_format_is_not_read_whole_before_the_cpu_decode_reads_it(tmp_path, monkeypatch):
    png = tmp_path / "big.png"
    smooth_image(512, 512).save(png)
    read = []

    class Counted:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            data = self.f.read(n)
            read.append(len(data))
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(device_decode, "open_regular", lambda path: Counted(open(path, "rb")))
    assert jpeg_file(png) is None and sum(read) == 3  # its signature only
    read.clear()
    jpg = save_jpeg(tmp_path / "a.jpg", smooth_image(64, 64))
    assert jpeg_file(jpg)[0] == jpg.read_bytes() and sum(read) == jpg.stat().st_size


def test_png_and_cmyk_files_fall_back_to_the_cpu_decode(jpeg_root, tmp_path):
    jpeg_root = shutil.copytree(jpeg_root, tmp_path / "root")
    dataset = open_dataset(DataConfig(dataset="synthetic", data_root=str(jpeg_root)))
    keys = dataset.split("train").keys
    Image.open(jpeg_root / keys[0]).save(jpeg_root / "png.jpg.png", format="PNG")
    Image.open(jpeg_root / keys[1]).convert("CMYK").save(jpeg_root / "cmyk.jpg", quality=95)
    (jpeg_root / keys[0]).unlink()
    (jpeg_root / keys[0]).symlink_to(jpeg_root / "png.jpg.png")  # a link is read by the dataset's opener
    shutil.copy(jpeg_root / "cmyk.jpg", jpeg_root / keys[1])
    split = EncodedSplit(dataset, "train")
    for row in (0, 1):
        payload, orientation, _, _, problem = split[row]
        assert problem == "" and payload.dim() == 3  # pixels, not bytes
        assert torch.equal(payload, F.pil_to_tensor(dataset.open_image("train", row)))
    assert split[2][0].dim() == 1  # a JPEG: its bytes


def test_an_undecodable_jpeg_is_a_problem_naming_its_file_and_the_rest_of_the_batch_decodes(jpeg_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(jpeg_root, root)
    dataset = open_dataset(DataConfig(dataset="synthetic", data_root=str(root)))
    bad = root / dataset.split("train").keys[1]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3] + b"\x00" * 16)  # header intact, scan data cut short
    batch = collate([EncodedSplit(dataset, "train")[row] for row in range(3)])
    images, problems = decode(batch, dataset, "train", "cpu")
    assert images[1] is None and str(bad) in problems[1] and "cannot read image" in problems[1]
    assert problems[0] == problems[2] == "" and images[0].shape[0] == 3 and images[2].shape[0] == 3


def source(dataset, backbone, crop: str, *, decode: str = "cpu", workers: int = 0) -> ImageSource:
    transform = train_transform(backbone.preprocess, backbone.preprocess_cfg, "model", True, "bilinear", crop, epochs=3)
    return ImageSource(dataset, "train", transform, seed=5, workers=workers, decode=decode, device="cpu")


def epoch_batches(images: ImageSource, epoch: int, rows: int = 24) -> torch.Tensor:
    order = np.random.default_rng(epoch).permutation(len(images.labels))[:rows]
    return torch.cat([x for x, _ in images.batches(order, 8, epoch, np.arange(rows))])


@pytest.mark.parametrize("crop", ["random", "mda"])
def test_device_training_crops_are_the_cpu_paths_seeded_crops(jpeg_root, backbone, crop):
    dataset = open_dataset(DataConfig(dataset="synthetic", data_root=str(jpeg_root)))
    cpu, device = source(dataset, backbone, crop), source(dataset, backbone, crop, decode="device")
    for epoch in (0, 2):
        a, b = epoch_batches(cpu, epoch), epoch_batches(device, epoch)
        assert (a - b).abs().max() <= one_step(backbone.preprocess_cfg) and (a - b).abs().mean() <= MEAN_TOLERANCE


@pytest.mark.slow
def test_workers_kept_between_epochs_draw_each_epochs_own_crops(synthetic_root, backbone):
    """mda's crops depend on the epoch: with the workers kept, epoch 2 must still get epoch 2's crops."""
    dataset = open_dataset(DataConfig(dataset="synthetic", data_root=str(synthetic_root)))
    kept = source(dataset, backbone, "mda", workers=2)
    first, second = epoch_batches(kept, 0), epoch_batches(kept, 2)
    assert len(kept.loaders) == 1 and kept.loaders[8].persistent_workers
    fresh = source(dataset, backbone, "mda", workers=2)
    same_order = np.random.default_rng(2).permutation(len(kept.labels))[:24]
    first_again = torch.cat([x for x, _ in kept.batches(same_order, 8, 0, np.arange(24))])  # epoch 2's order, epoch 0's crops
    assert not torch.equal(second, first_again)
    assert torch.equal(second, epoch_batches(fresh, 2))
    assert torch.equal(first, epoch_batches(source(dataset, backbone, "mda"), 0))  # and the same without workers


def extract(root: Path, out: Path, decode: str) -> None:
    ok("extract", "--dataset", "synthetic", "--data-root", root, "--model", TINY_MODEL, "--pretrained", "none",
       "--device", "cpu", "--workers", "0", "--splits", "train,test", "--test-views", "flip", "--no-tokens",
       "--decode", decode, "--out", out)


@pytest.mark.slow
def test_extract_on_the_device_gives_the_cpu_paths_embeddings(jpeg_root, tmp_path, monkeypatch):
    extract(jpeg_root, tmp_path / "cpu", "cpu")
    calls = []

    def counted(data, **options):
        calls.append(len(data))
        return decode_jpeg(data, **options)

    monkeypatch.setattr(device_decode, "decode_jpeg", counted)
    extract(jpeg_root, tmp_path / "device", "device")
    assert sum(calls) == sum(len(open_dataset(DataConfig(data_root=str(jpeg_root))).split(s)) for s in ("train", "test"))
    for split in ("train", "test"):
        with h5py.File(tmp_path / "cpu" / f"{split}.h5") as a, h5py.File(tmp_path / "device" / f"{split}.h5") as b:
            x, y = (torch.from_numpy(f["embeds"][:]).float().flatten(0, 1) for f in (a, b))
        cosine = torch.nn.functional.cosine_similarity(x, y, dim=-1)
        assert cosine.min() > 0.999, cosine.min()  # measured: 0.9999995 at least (the tiny model, random weights)


@pytest.mark.slow
def test_finetune_and_its_eval_on_the_device(jpeg_root, tmp_path, monkeypatch):
    run = tmp_path / "run"
    ok("finetune", "--dataset", "synthetic", "--data-root", jpeg_root, "--model", TINY_MODEL, "--pretrained", "none",
       "--tune", "lora", "--head", "linear", "--train-crop", "mda", "--steps", "2", "--batch-size", "16",
       "--workers", "0", "--device", "cpu", "--decode", "device", "--out", run)
    assert (run / "train_log.jsonl").read_text().strip()
    scores, calls = {}, []
    monkeypatch.setattr(device_decode, "decode_jpeg", lambda data, **options: calls.append(len(data)) or decode_jpeg(data, **options))
    for decode in ("cpu", "device"):  # eval views the run's test images on the device too
        ok("eval", run, "--workers", "0", "--device", "cpu", "--test-views", "flip", "--decode", decode, "--json", tmp_path / f"{decode}.json")
        scores[decode] = json.loads((tmp_path / f"{decode}.json").read_text())["results"][0]
    test_images = len(open_dataset(DataConfig(data_root=str(jpeg_root))).split("test"))
    assert sum(calls) == test_images
    assert abs(scores["cpu"]["top1"] - scores["device"]["top1"]) <= 100 / test_images, scores  # one image may flip


@pytest.mark.parametrize("command", ["extract", "finetune"])
def test_an_unknown_decode_is_refused_in_one_line(synthetic_root, tmp_path, command):
    out = tmp_path / "out"
    result = invoke(command, "--dataset", "synthetic", "--data-root", synthetic_root, "--model", TINY_MODEL,
                    "--pretrained", "none", "--device", "cpu", "--decode", "gpu", "--out", out)
    one_error_line(result.output, result.exit_code, "--decode 'gpu'", "cpu, device")
    assert not out.exists()


def test_a_preprocessing_step_without_a_tensor_version_is_refused_in_one_line(backbone):
    views = make_views("center", T.Compose([T.Lambda(lambda image: image), *backbone.preprocess.transforms]), backbone.preprocess_cfg)
    with pytest.raises(LtclipError, match=r"^--decode device: the preprocessing step Lambda\(\) does not run on tensors; "
                                          r"pass --decode cpu$"):
        on_tensors(views)
