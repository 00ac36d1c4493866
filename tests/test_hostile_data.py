"""Hostile data inputs: no file ltclip reads can run code, and class names, image files and image
paths are unambiguous and bounded.

CIFAR pickles that would run code, class-name files that read two ways or repeat a name, images
that are FIFOs, folders, absurdly long strips or sideways phone photos, split-file paths that lead
out of the data root, and Unicode / very long paths. Each refusal is one ``error:`` line (exit 2) or
one ``bad image:`` line per file (``datasets check``, exit 1); docs/reliability.md lists the cases.
"""

from __future__ import annotations

import json
import os
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import TINY_MODEL
from ltclip.artifacts.store import FeatureCache
from ltclip.cli import app
from ltclip.data.cifar import load_cifar100_lt
from ltclip.data.image_files import MAX_ASPECT_RATIO, read_rgb
from ltclip.data.registry import load_dataset

runner = CliRunner()


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result, *fragments: str, code: int = 2) -> str:
    """The one ``error:`` line a refused command ends with (no traceback), holding every fragment."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.output.rstrip().endswith(errors[0]), result.output
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


def info_custom(root: Path, *extra):
    return invoke("datasets", "info", "custom", "--data-root", root, "--train-list", "train.txt", "--json", *extra)


def check_custom(root: Path, *extra):
    return invoke("datasets", "check", "custom", "--data-root", root, "--train-list", "train.txt", "--workers", "1", *extra)


def write_images(root: Path, names: list[str]) -> None:
    """Small PNGs at ``names`` under ``root`` and a train list of them (labels alternate 0/1)."""
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 40 % 256, 90, 200)).save(root / name)
    (root / "train.txt").write_text("".join(f"{name} {i % 2}\n" for i, name in enumerate(names)), encoding="utf-8")


# ============================================================================ CIFAR pickles


class Payload:
    """Unpickling this calls ``call(*args)``: what a planted file would run."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def write_cifar(root: Path, protocol: int = 2, **replace) -> Path:
    """A 2-class CIFAR-100 stand-in (3 train / 2 test images per class); ``replace`` swaps a file's object."""
    base = root / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    objects = {"meta": {"fine_label_names": ["apple", "maple_tree"]}}
    for split, per_class in (("train", 3), ("test", 2)):
        labels = np.repeat([0, 1], per_class)
        objects[split] = {"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), "fine_labels": labels.tolist()}
    for name, obj in {**objects, **replace}.items():
        (base / name).write_bytes(pickle.dumps(obj, protocol=protocol))
    return root


@pytest.mark.parametrize("planted_as", ["meta", "train"])
@pytest.mark.parametrize("payload", ["os.system", "builtins.exec"])
def test_a_cifar_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, planted_as, payload):
    marker = tmp_path / "PAYLOAD"
    attack = Payload(os.system, f"touch {marker}") if payload == "os.system" else \
        Payload(exec, f"open({str(marker)!r}, 'w').close()")
    root = write_cifar(tmp_path / "data", **{planted_as: {"data": attack}})
    result = invoke("datasets", "info", "cifar100_lt", "--data-root", root)
    error_line(result, f"cifar-100-python/{planted_as}: not a CIFAR-100 python file (it refers to ",
               f".{attack.call.__name__}, which a CIFAR-100 file never holds); delete it and pass --download")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_files_pickled_by_any_numpy_and_protocol_still_load(tmp_path, protocol):
    dataset = load_cifar100_lt(write_cifar(tmp_path, protocol), imbalance=1)
    assert dataset.classnames == ["apple", "maple tree"] and len(dataset.split("test")) == 4
    assert np.asarray(dataset.open_image("test", 0)).shape == (32, 32, 3)


def test_cifar_files_naming_numpy_core_as_python2_wrote_them_load(tmp_path):
    """The official files were written by Python 2's numpy: their arrays name numpy.core.multiarray."""
    root = write_cifar(tmp_path)
    for name in ("train", "test"):
        path = root / "cifar-100-python" / name
        data = path.read_bytes()
        assert b"numpy._core.multiarray\n_reconstruct" in data
        path.write_bytes(data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    assert len(load_cifar100_lt(root, imbalance=1).split("train")) == 6


# ============================================================================ class-name files


def names_of(tmp_path: Path, train: str, names: str) -> list[str]:
    (tmp_path / "train.txt").write_text(train, encoding="utf-8")
    (tmp_path / "names.txt").write_text(names, encoding="utf-8")
    return load_dataset("custom", tmp_path, split_files={"train": "train.txt"}, classnames_file="names.txt").classnames


def test_a_two_word_class_name_keeps_both_words(tmp_path):
    assert names_of(tmp_path, "x/a.png 0\nx/b.png 1\n", "sea lion\nsea_otter\n") == ["sea lion", "sea otter"]
    # two-word names whose first words differ are still whole names: they name no train folder
    assert names_of(tmp_path, "x/a.png 0\nx/b.png 1\n", "sea lion\nbrown bear\n") == ["sea lion", "brown bear"]


def test_a_first_column_is_a_key_only_when_it_names_the_train_folders(tmp_path):
    train = "train/n02/a.jpg 0\ntrain/n01/b.jpg 1\n"
    assert names_of(tmp_path, train, "n01 tench\nn02 goldfish\n") == ["goldfish", "tench"]  # by folder, not line order
    assert names_of(tmp_path, "x/a.jpg 0\nx/b.jpg 1\n", "n01 tench\nn02 goldfish\n") == ["n01 tench", "n02 goldfish"]


@pytest.mark.parametrize("names, line", [
    ("circle\nsquare\ncircle\n", "names.txt:3: class name 'circle' again (first on line 1)"),
    ("Red circle\nsquare\nred_circle\n", "names.txt:3: class name 'red circle' again (first on line 1)"),
])
def test_duplicate_class_names_are_refused_in_one_line(tmp_path, names, line):
    (tmp_path / "train.txt").write_text("a.png 0\nb.png 1\nc.png 2\n")
    (tmp_path / "names.txt").write_text(names)
    error_line(info_custom(tmp_path, "--classnames", "names.txt"), line, "class names must differ")


def test_duplicate_keyed_names_name_both_lines(tmp_path):
    with pytest.raises(Exception, match=r"names.txt:3: class name 'crane' again \(first on line 1\)"):
        names_of(tmp_path, "f/k1/a.jpg 0\nf/k2/b.jpg 1\nf/k3/c.jpg 2\n", "k1 crane\nk2 heron\nk3 crane\n")


@pytest.mark.slow
def test_a_class_list_of_100000_names_is_read_quickly(tmp_path):
    classes = 100_000
    start = time.perf_counter()
    names = names_of(tmp_path, "".join(f"img/{i}.jpg {i}\n" for i in range(classes)),
                     "".join(f"species number {i}\n" for i in range(classes)))
    assert len(names) == classes and names[-1] == f"species number {classes - 1}"
    assert time.perf_counter() - start < 10  # linear: about a second on one core


# ============================================================================ image files


def read_in_thread(path: Path, seconds: float = 10) -> str:
    """The error ``read_rgb(path)`` raises, or fail if it does not return within ``seconds`` (a hang)."""
    outcome: list[str] = []

    def read():
        try:
            read_rgb(path)
            outcome.append("decoded")
        except (ValueError, OSError) as err:
            outcome.append(str(err))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"read_rgb({path}) hangs"
    return outcome[0]


def test_a_fifo_or_a_folder_listed_as_an_image_is_a_bad_image_not_a_hang(tmp_path):
    write_images(tmp_path, ["a.png", "b.png"])
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "folder.png").mkdir()
    assert read_in_thread(tmp_path / "pipe.png") == "not a regular file (a FIFO)"
    assert read_in_thread(tmp_path / "folder.png") == "not a regular file (a folder)"
    with open(tmp_path / "train.txt", "a") as f:
        f.write("pipe.png 0\nfolder.png 1\n")
    result = check_custom(tmp_path)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    bad = [line for line in result.output.splitlines() if line.startswith("bad image:")]
    assert bad == ["bad image: train:pipe.png: ValueError: not a regular file (a FIFO)",
                   "bad image: train:folder.png: ValueError: not a regular file (a folder)"]


def test_a_device_file_is_not_read(tmp_path):
    assert read_in_thread(Path("/dev/zero")) == "not a regular file (a device or socket)"


@pytest.mark.parametrize("size, reason", [
    ((400_000, 1), "400000×1 pixels is more elongated than ltclip resizes (at most 256:1); crop it"),
    ((1, 300_000), "1×300000 pixels is more elongated than ltclip resizes (at most 256:1); crop it"),
    ((70_000, 300), "70000×300 pixels: a side is longer than ltclip decodes (65,535 px)"),
])
def test_images_that_would_blow_up_when_resized_are_refused_before_decoding(tmp_path, size, reason):
    path = tmp_path / "strip.png"
    Image.new("L", size).save(path)  # a few KB on disk
    assert path.stat().st_size < 200_000
    assert read_in_thread(path).startswith(reason)


def test_the_most_elongated_image_allowed_decodes(tmp_path):
    path = tmp_path / "banner.png"
    Image.new("RGB", (MAX_ASPECT_RATIO * 4, 4), (10, 20, 30)).save(path)
    assert read_rgb(path).size == (1024, 4)


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo taken sideways (EXIF Orientation 6): decoded upright, as a viewer shows it."""
    rng = np.random.default_rng(0)
    picture = Image.fromarray(np.kron(rng.integers(0, 256, (3, 5, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8)))
    exif = Image.Exif()
    exif[0x0112] = 6
    picture.save(tmp_path / "plain.jpg", quality=95)
    picture.save(tmp_path / "rotated.jpg", quality=95, exif=exif)
    plain, rotated = read_rgb(tmp_path / "plain.jpg"), read_rgb(tmp_path / "rotated.jpg")
    assert plain.size == (40, 24) and rotated.size == (24, 40)
    expected = Image.open(tmp_path / "plain.jpg").convert("RGB").transpose(Image.Transpose.ROTATE_270)
    np.testing.assert_array_equal(np.asarray(rotated), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(rotated), np.rot90(np.asarray(plain), k=-1))  # 90° clockwise


# ============================================================================ paths outside the data root


@pytest.mark.parametrize("case", ["absolute", "dotdot", "linked folder"])
def test_paths_leading_out_of_the_data_root_are_refused_unless_allowed(tmp_path, case):
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "secret.png")
    Image.new("RGB", (8, 8)).save(root / "a.png")
    (root / "linked").symlink_to(outside)
    path = {"absolute": str(outside / "secret.png"), "dotdot": "../elsewhere/secret.png", "linked folder": "linked/secret.png"}[case]
    (root / "train.txt").write_text(f"a.png 0\n{path} 1\n")
    reason = {"absolute": "an absolute path", "dotdot": "a '..' component", "linked folder": f"its folder is a link to {outside}"}
    error_line(info_custom(root), f"{root}/train.txt:2: image path {path!r} leads outside --data-root {root}",
               reason[case], "pass --allow-outside-root")
    error_line(check_custom(root), "train.txt:2", "pass --allow-outside-root")
    assert info_custom(root, "--allow-outside-root").exit_code == 0
    result = check_custom(root, "--allow-outside-root")
    assert result.exit_code == 0 and "all 2 images of train decode" in result.output, result.output


def test_an_image_linked_out_of_the_root_is_a_bad_image_unless_allowed(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "secret.png")
    write_images(root, ["a.png", "sub/b.png"])
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "inside.png").symlink_to(root / "a.png")  # a link that stays inside is fine
    with open(root / "train.txt", "a") as f:
        f.write("link.png 0\ninside.png 1\n")
    result = check_custom(root)
    assert result.exit_code == 1, result.output
    bad = [line for line in result.output.splitlines() if line.startswith("bad image:")]
    assert bad == [f"bad image: train:link.png: ValueError: a link to {outside / 'secret.png'}, outside --data-root; "
                   "pass --allow-outside-root"]
    assert check_custom(root, "--allow-outside-root").exit_code == 0


def test_links_inside_a_linked_data_root_are_inside(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    write_images(real, ["cls/a.png", "cls/b.png"])
    (tmp_path / "root").symlink_to(real)
    result = check_custom(tmp_path / "root")
    assert result.exit_code == 0, result.output


# ============================================================================ Unicode and long paths


def test_unicode_spaces_and_long_names_work_end_to_end(tmp_path):
    root = tmp_path / "données d'été 猫"
    long_name = "é" * 120 + ".png"  # 244 bytes of UTF-8: near the 255-byte limit of a file name
    deep = "/".join(["dossier très profond " + "x" * 60] * 30)  # 30 folders, about 2,500 bytes
    names = ["naïve 猫/photo 1.png", f"deep/{deep}/{long_name}", "plain.png", "Ωmega/ünïcode ☃.png"]
    root.mkdir()
    write_images(root, names)
    (root / "names.txt").write_text("chat noir\nchien blanc\n", encoding="utf-8")
    profile = json.loads(info_custom(root, "--classnames", "names.txt").output)
    assert profile["splits"] == {"train": 4} and profile["classes"] == 2
    result = check_custom(root)
    assert result.exit_code == 0 and "all 4 images of train decode" in result.output, result.output
    dataset = load_dataset("custom", root, split_files={"train": "train.txt"}, classnames_file="names.txt")
    assert dataset.classnames == ["chat noir", "chien blanc"] and dataset.open_image("train", 1).size == (8, 8)


def test_a_name_or_path_longer_than_the_system_allows_is_a_bad_image(tmp_path):
    write_images(tmp_path, ["a.png", "b.png"])
    # a 304-byte file name, a 300-byte folder name, a 5,000-byte path (Linux: 255 and 4,095 bytes at most)
    too_long = ["x" * 300 + ".png", "y" * 300 + "/c.png", "/".join(["d" * 200] * 25) + "/c.png"]
    with open(tmp_path / "train.txt", "a") as f:
        f.write("".join(f"{name} 0\n" for name in too_long))
    result = check_custom(tmp_path)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    bad = [line for line in result.output.splitlines() if line.startswith("bad image:")]
    assert len(bad) == 3 and all("File name too long" in line for line in bad), bad


@pytest.mark.slow
def test_extract_with_a_fifo_among_the_images_fails_in_one_line_or_skips_it(tmp_path):
    write_images(tmp_path, ["a.png", "b.png", "c.png"])
    os.mkfifo(tmp_path / "pipe.png")
    with open(tmp_path / "train.txt", "a") as f:
        f.write("pipe.png 1\n")
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    args = ["extract", "--dataset", "custom", "--data-root", tmp_path, "--train-list", "train.txt", "--classnames", "names.txt",
            "--model", TINY_MODEL, "--pretrained", "none", "--device", "cpu", "--workers", "0", "--out", tmp_path / "feat"]
    error_line(invoke(*args), f"{tmp_path}/pipe.png: cannot read image (ValueError: not a regular file (a FIFO))",
               "pass --bad-images skip")
    result = invoke(*args, "--bad-images", "skip")
    assert result.exit_code == 0, result.output
    with FeatureCache(tmp_path / "feat" / "train.h5") as cache:
        embeds = cache.load_embeds()[:, 0]
    assert all(embeds[i].any() for i in range(3)) and not embeds[3].any()  # the FIFO's row is left empty
