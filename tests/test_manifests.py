"""Split-file parsing and validation, class names, the dataset registry and its kinds.

Real files: every test of them runs on the committed excerpts and profile in tests/fixtures/ and,
when ``../shared/data_manifests`` is present (conftest.SHARED_MANIFESTS), on the full files too.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, SHARED_MANIFESTS, places_lt_train_counts, shared_files
from ltclip.data import registry
from ltclip.data.base import LTDataset
from ltclip.data.manifests import (
    align_classnames,
    check_train_covers_classes,
    classnames_from_folders,
    manifest_from_inat_json,
    read_classnames,
    read_manifest,
)
from ltclip.data.registry import CUSTOM, DatasetRequest, list_dataset_kinds, list_datasets, load_dataset
from ltclip.core.errors import LtclipError
from ltclip.core.registry import Registry

PLACES_COUNTS = places_lt_train_counts()
EXCERPT_COUNTS = -(-PLACES_COUNTS // 200)  # the train excerpt keeps ceil(n / 200) lines per class
INAT_CLASSES = 8142


def names(path, keyed=True):
    """The names read from a class-name file, its first column taken as a key (``keyed``) or not."""
    return [line.keyed_name if keyed else line.name for line in read_classnames(path)]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def as_manifest_dir(folder: Path, files: dict[str, str]) -> Path:
    """``folder`` holding the fixtures ``files`` under the real files' names (as a spec names them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for real_name, fixture in files.items():
        shutil.copyfile(FIXTURES / fixture, folder / real_name)
    return folder


def test_places_profile_fixture_is_the_published_profile():
    profile = json.loads((FIXTURES / "places_lt_train_counts.json").read_text())
    assert profile["source_sha256"] == "726c4871dcbf07ce2f857703bfe32e9a83ffbf52d704239f6d95c4f4f4c247f7"
    assert PLACES_COUNTS.dtype == np.int64 and len(PLACES_COUNTS) == profile["classes"] == 365
    assert PLACES_COUNTS.sum() == profile["images"] == 62_500
    assert PLACES_COUNTS.max() == 4980 and PLACES_COUNTS.min() == 5


@pytest.mark.parametrize(
    "path, expected",
    [pytest.param(FIXTURES / "Places_LT_train_excerpt.txt", EXCERPT_COUNTS, id="excerpt")]
    + [pytest.param(p, PLACES_COUNTS, id="full") for p in shared_files("Places_LT_train.txt")],
)
def test_places_lt_train_profile(path, expected):
    split = read_manifest(path, "train", 365)
    counts = split.class_counts(365)
    assert len(split) == expected.sum() and counts.tolist() == expected.tolist()
    # independent count: a plain loop over the file
    loop = [0] * 365
    for line in open(path):
        loop[int(line.split()[-1])] += 1
    assert counts.tolist() == loop


# sha256 of the committed excerpts (tests/fixtures/README.md) and the published ones of real files
# (shared/data_manifests/README.md)
EXCERPT_SHA256 = {
    "Places_LT_train_excerpt.txt": "fc723a4b34867d315b6b2c18eae9848b0c7e81a5a0e1f33acd6cbe8b8b6e3aca",
    "iNaturalist18_val_excerpt.txt": "3ada4f30b640bcc4ee45ebff01ce30ed16a90a56f59f4511a0a12a533f6e76c1",
}
PUBLISHED_SHA256 = {
    "Places_LT_val.txt": "719e3cf3766c09134ea28f56f1036c78def511ac1ed2c2532a6beef78f2439ba",
    "iNaturalist18_val.txt": "efaeff65f80641b60864470e6f255aa69453406ef5717eec8c6681748f3a61f3",
}


@pytest.mark.parametrize(
    "path, sha256",
    [pytest.param(FIXTURES / name, sha, id=name) for name, sha in EXCERPT_SHA256.items()]
    + [pytest.param(p, sha, id=name) for name, sha in PUBLISHED_SHA256.items() for p in shared_files(name)],
)
def test_split_hashes_match_recorded(path, sha256):
    split = read_manifest(path, "val")
    assert split.sha256 == sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "text, problem",
    [
        ("a.jpg 0\nb.jpg\n", "malformed line"),
        ("a.jpg 0\nb.jpg x\n", "not an integer"),
        ("a.jpg 0\nb.jpg -1\n", "negative label"),
        ("a.jpg 0\nb.jpg 3\n", ">= number of classes 3"),
        ("a.jpg 0\na.jpg 1\n", "duplicate path"),
        ("\n\n", "empty"),
    ],
)
def test_bad_manifest_lines_name_file_and_line(tmp_path, text, problem):
    path = write(tmp_path, "split.txt", text)
    with pytest.raises(LtclipError) as err:
        read_manifest(path, "train", 3)
    message = str(err.value)
    assert problem in message and str(path) in message and "\n" not in message
    if problem != "empty":
        assert f"{path}:2:" in message


def test_missing_manifest(tmp_path):
    with pytest.raises(LtclipError, match="split file not found"):
        read_manifest(tmp_path / "nope.txt", "train")


def test_paths_with_spaces_keep_their_spaces(tmp_path):
    split = read_manifest(write(tmp_path, "s.txt", "my dir/a b.jpg 1\n"), "train", 2)
    assert split.keys == ["my dir/a b.jpg"] and split.labels.tolist() == [1]


def test_classes_absent_from_train(tmp_path):
    split = read_manifest(write(tmp_path, "s.txt", "a 0\nb 2\n"), "train", 3)
    with pytest.raises(LtclipError, match="1 of 3 classes have no training image"):
        check_train_covers_classes(split, 3)


CLASSNAME_EXCERPTS = ("ImageNet_LT_classnames_excerpt.txt", "Places_LT_classnames_excerpt.txt", "iNaturalist18_categories_excerpt.json")
CLASSNAME_FILES = [pytest.param([FIXTURES / f for f in CLASSNAME_EXCERPTS], (10, 150, 50), id="excerpt")] + [
    pytest.param(paths, (1000, 365, INAT_CLASSES), id="full")
    for paths in [shared_files("ImageNet_LT_classnames.txt", "Places_LT_classnames.txt", "iNaturalist18_categories.json")]
    if paths
]


@pytest.mark.parametrize("paths, sizes", CLASSNAME_FILES)
def test_real_classname_formats(paths, sizes):
    imagenet, places, inat = (names(p) for p in paths)
    assert (len(imagenet), len(places), len(inat)) == sizes
    assert imagenet[:2] == ["tench", "goldfish"]
    assert places[2] == "airport terminal"
    assert inat[0] == "Hermodice carunculata"


def test_classname_formats(tmp_path):
    assert names(write(tmp_path, "n.txt", "/a/abbey\nred_triangle\n"), keyed=False) == ["abbey", "red triangle"]
    assert names(write(tmp_path, "k.txt", "n01440764 tench\nn01443537 goldfish\n")) == ["tench", "goldfish"]


@pytest.mark.parametrize(
    "train, classnames",
    [pytest.param(FIXTURES / "Places_LT_train_excerpt.txt", FIXTURES / "Places_LT_classnames_excerpt.txt", id="excerpt")]
    + [pytest.param(*paths, id="full") for paths in [shared_files("Places_LT_train.txt", "Places_LT_classnames.txt")] if paths],
)
def test_places_class_file_is_aligned_to_labels_by_folder(tmp_path, train, classnames):
    """The published class file's line order differs from the labels for 5 classes.

    The class-file excerpt is its first 150 lines, so the split is the train lines of labels 0-149.
    """
    pairs = read_classnames(classnames)
    classes = len(pairs)
    lines = [line for line in open(train) if int(line.split()[-1]) < classes]
    split = read_manifest(write(tmp_path, "train.txt", "".join(lines)), "train", classes)
    from_folders = classnames_from_folders(split, classes)
    assert sum(a != b for a, b in zip(from_folders, [line.keyed_name for line in pairs])) == 5
    aligned = align_classnames(pairs, split, "Places_LT_classnames.txt")
    assert aligned == from_folders
    assert aligned[116] == "desert road" and split.keys[split.labels.tolist().index(116)].startswith("train/desert_road/")
    assert (aligned[141], aligned[142]) == ("field road", "field-wild")
    # and so does a dataset built from these files
    ds = load_dataset("custom", tmp_path, split_files={"train": "train.txt"}, classnames_file=str(classnames))
    assert ds.classnames == aligned


def test_class_file_without_folder_keys_keeps_line_order(tmp_path):
    split = read_manifest(write(tmp_path, "s.txt", "x/a.jpg 1\nx/b.jpg 0\n"), "train", 2)
    assert align_classnames(read_classnames(write(tmp_path, "n.txt", "cat\ndog\n")), split, "n") == ["cat", "dog"]


def test_inat_split_from_official_json(tmp_path):
    data = {
        "images": [{"id": 10, "file_name": "train_val2018/a/1.jpg"}, {"id": 11, "file_name": "train_val2018/b/2.jpg"}],
        "annotations": [{"image_id": 11, "category_id": 0}, {"image_id": 10, "category_id": 1}],
    }
    split = manifest_from_inat_json(write(tmp_path, "val2018.json", json.dumps(data)), "val")
    assert split.keys == ["train_val2018/a/1.jpg", "train_val2018/b/2.jpg"]
    assert split.labels.tolist() == [1, 0]
    with pytest.raises(LtclipError, match="not an iNaturalist annotation JSON"):
        manifest_from_inat_json(write(tmp_path, "bad.json", "{}"), "val")


def test_registry_lists_every_spec():
    names = {s.name for s in list_datasets()}
    assert {"imagenet_lt", "places_lt", "inat18", "cifar100_lt", "synthetic"} <= names


def test_every_spec_names_a_registered_kind_and_every_kind_is_used():
    kinds = list_dataset_kinds()
    assert {"manifest", "cifar100_lt", "custom"} <= set(kinds)
    used = {spec.kind for spec in list_datasets()} | {CUSTOM.kind}
    assert used == set(kinds)


def test_load_dataset_dispatches_by_the_spec_kind(tmp_path, monkeypatch):
    """A new kind is one registered loader plus a spec file naming it."""
    kinds = Registry("dataset kind")
    calls = []

    @kinds.register("toy")
    def toy(spec, request):
        calls.append((spec, request))
        return LTDataset(spec.name, 1, ["thing"], spec.templates, {}, open_image=None)

    specs = tmp_path / "specs"
    specs.mkdir()
    write(specs, "toy.toml", 'name = "toy"\ntitle = "Toy"\nkind = "toy"\ntemplates = "cifar"\n')
    monkeypatch.setattr(registry, "spec_dir", lambda: specs)
    monkeypatch.setattr(registry, "DATASET_KINDS", kinds)
    ds = load_dataset("toy", tmp_path, manifest_dir="m", split_files={"train": "t.txt"}, imbalance=5, seed=3)
    (spec, request), = calls
    assert spec.name == "toy" and spec.path == str(specs / "toy.toml") and ds.templates == "cifar"
    assert request == DatasetRequest(
        data_root=tmp_path, manifest_dir=Path("m"), split_files={"train": "t.txt"}, classnames_file=None,
        imbalance=5, download=False, seed=3,
    )
    assert load_dataset("toy", tmp_path, templates="simple").templates == "simple"  # the caller's override
    write(specs, "odd.toml", 'name = "odd"\ntitle = "Odd"\nkind = "tarball"\n')
    with pytest.raises(LtclipError, match=r"odd.toml: kind 'tarball' is not a dataset kind; choose one of: toy$"):
        load_dataset("toy", tmp_path)


@pytest.mark.parametrize(
    "manifests, expected_splits, train_counts",
    [pytest.param({"Places_LT_train.txt": "Places_LT_train_excerpt.txt"}, {"train": EXCERPT_COUNTS.sum()}, EXCERPT_COUNTS, id="excerpt")]
    + [
        pytest.param(SHARED_MANIFESTS, {"train": 62_500, "val": 7_300, "test": 36_500}, PLACES_COUNTS, id="full")
        for paths in [shared_files("Places_LT_train.txt", "Places_LT_val.txt", "Places_LT_test.txt", "Places_LT_classnames.txt")]
        if paths
    ],
)
def test_load_places_lt_from_real_split_files(tmp_path, manifests, expected_splits, train_counts):
    if isinstance(manifests, dict):  # the excerpt, under the name the spec looks for; no class file
        manifests = as_manifest_dir(tmp_path / "manifests", manifests)
    ds = load_dataset("places_lt", tmp_path, manifest_dir=manifests)
    assert ds.num_classes == 365 and {k: len(v) for k, v in ds.splits.items()} == expected_splits
    assert ds.train_counts().tolist() == train_counts.tolist()
    # from the class file (aligned to the folders) or, without it, from the train paths' folders
    assert ds.classnames[0] == "airfield" and ds.classnames[116] == "desert road"
    assert len(ds.prompt_templates()) == 80  # OpenAI's ImageNet templates


@pytest.mark.parametrize(
    "val, categories, val_size",
    [pytest.param(FIXTURES / "iNaturalist18_val_excerpt.txt", FIXTURES / "iNaturalist18_categories_excerpt.json", 150, id="excerpt")]
    + [pytest.param(*paths, 24_426, id="full") for paths in [shared_files("iNaturalist18_val.txt", "iNaturalist18_categories.json")] if paths],
)
def test_load_inat18_val_as_test(tmp_path, val, categories, val_size):
    # stand-ins: a train list that covers every class once, and names for the classes an excerpt lacks
    (tmp_path / "iNaturalist18_train.txt").write_text("".join(f"t/{i}.jpg {i}\n" for i in range(INAT_CLASSES)))
    cats = json.loads(categories.read_text())
    cats += [{"id": i, "name": f"species {i}"} for i in range(len(cats), INAT_CLASSES)]
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    shutil.copyfile(val, manifests / "iNaturalist18_val.txt")
    names_file = write(tmp_path, "categories.json", json.dumps(cats))
    ds = load_dataset("inat18", tmp_path, manifest_dir=manifests, classnames_file=str(names_file))
    assert len(ds.split("val")) == val_size and ds.split("test").keys == ds.split("val").keys
    assert ds.classnames[0] == "Hermodice carunculata" and ds.num_classes == INAT_CLASSES


def test_custom_dataset_and_its_errors(tmp_path):
    write(tmp_path, "train.txt", "a.png 0\nb.png 1\n")
    write(tmp_path, "test.txt", "c.png 1\n")
    write(tmp_path, "names.txt", "cat\ndog\n")
    ds = load_dataset("custom", tmp_path, split_files={"train": "train.txt", "test": "test.txt"}, classnames_file=str(tmp_path / "names.txt"))
    assert ds.classnames == ["cat", "dog"] and ds.num_classes == 2
    np.testing.assert_array_equal(ds.train_counts(), [1, 1])
    with pytest.raises(LtclipError, match="needs --train-list"):
        load_dataset("custom", tmp_path)
    with pytest.raises(LtclipError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", tmp_path)
    write(tmp_path, "names3.txt", "cat\ndog\nbird\n")
    with pytest.raises(LtclipError, match="have no training image"):
        load_dataset("custom", tmp_path, split_files={"train": "train.txt"}, classnames_file=str(tmp_path / "names3.txt"))


def test_synthetic_through_the_registry(synthetic_root):
    ds = load_dataset("synthetic", synthetic_root)
    counts = ds.train_counts()
    assert ds.num_classes == 10 and counts[0] == 40 and counts[-1] == 2
    image = ds.open_image("test", 0)
    assert image.mode == "RGB" and image.size == (32, 32)


def test_template_sets_and_files(tmp_path):
    from ltclip.data.templates import resolve_templates

    assert len(resolve_templates("openai_imagenet")) == 80
    assert all(t.count("{}") == 1 for t in resolve_templates("openai_imagenet"))
    path = write(tmp_path, "t.txt", "a photo of a {}.\n\nart of the {}\n")
    assert resolve_templates(str(path)) == ["a photo of a {}.", "art of the {}"]
    with pytest.raises(LtclipError, match="exactly one"):
        resolve_templates(str(write(tmp_path, "bad.txt", "no slot here\n")))
    with pytest.raises(LtclipError, match="neither a template file nor one of"):
        resolve_templates("openai")


FIXTURE_SOURCES = ("Places_LT_train.txt", "Places_LT_classnames.txt", "ImageNet_LT_classnames.txt",
                   "iNaturalist18_val.txt", "iNaturalist18_categories.json")

if shared_files(*FIXTURE_SOURCES):
    # Only with the real files beside the repository: without them this test does not exist.

    def test_fixtures_regenerate_exactly_from_the_real_files(tmp_path):
        """tests/fixtures/make_fixtures.py reproduces every committed fixture byte for byte."""
        out = tmp_path / "fixtures"
        script = FIXTURES / "make_fixtures.py"
        subprocess.run([sys.executable, str(script), "--source", str(SHARED_MANIFESTS), "--out", str(out)], check=True, capture_output=True)
        made = sorted(p.name for p in out.iterdir())
        committed = sorted(p.name for p in FIXTURES.iterdir() if p.name not in ("README.md", "make_fixtures.py") and p.is_file())
        assert made == committed
        for name in made:
            assert (out / name).read_bytes() == (FIXTURES / name).read_bytes(), name
